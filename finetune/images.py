"""Read one image file into an HxWxC array in its native dtype (Pillow; TIFF through tifffile; 16-bit colour PNG
through OpenCV, which Pillow squashes to 8 bits: timm issue 831), and scale its intensities to [0, 1]."""
from __future__ import annotations

import codecs
import contextlib
import io
import os
import struct
from typing import Iterable, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageMode, ImageOps, UnidentifiedImageError

__all__ = ["IMAGE_EXTENSIONS", "MAX_PIXELS", "ImageError", "ImageInfo", "dataset_percentiles", "examine", "probe",
           "read_image", "to_unit_float"]

MAX_PIXELS = 89_478_485  # Pillow's own default limit
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"})

# Pillow may only pick these decoders; EPS (Ghostscript), PSD & co. are refused as "not an image".
_PIL_FORMATS = ("PNG", "JPEG", "BMP", "DIB", "WEBP", "GIF", "PPM", "TIFF")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"BM", b"GIF8", b"P5", b"P6", *_TIFF_MAGIC)


class ImageError(Exception):
    """A file that cannot be read; ``reason``: a kind ("corrupt", "truncated", "not an image", ...), then ": detail"."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(str(path), reason)
        self.path, self.reason = str(path), reason

    @property
    def kind(self) -> str:
        return self.reason.split(":", 1)[0]

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class ImageInfo(NamedTuple):
    """What a file's header says: size after EXIF rotation, native channels (alpha included) and the stored dtype
    (a tuple: a scan makes a million of them from its cache)."""

    width: int
    height: int
    channels: int
    dtype: np.dtype
    alpha: bool = False


def read_image(path: str | os.PathLike, channels: int = 3, *, max_pixels: int = MAX_PIXELS,
               data: bytes | None = None) -> np.ndarray:
    """Decode a file (or its bytes, ``data``) into HxWx``channels`` uint8, uint16 or float32, EXIF-rotated, alpha
    dropped unless asked for (kept in TIFF), gray to RGB or RGB to luminance as asked; else ImageError."""
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    arr, alpha = _read_native(path, max_pixels, data)
    _check_channels(path, arr.shape[-1], alpha, channels)
    if alpha and arr.shape[-1] != channels:
        arr = np.ascontiguousarray(arr[..., :-1])
    if arr.shape[-1] == channels:
        return arr
    if channels == 3:
        return np.repeat(arr, 3, axis=-1)
    gray = arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return (gray if arr.dtype.kind == "f" else np.rint(gray)).astype(arr.dtype)[..., None]


def probe(path: str | os.PathLike, *, max_pixels: int = MAX_PIXELS) -> ImageInfo:
    """Read only the header: size, native channels and dtype, without decoding pixels (a truncated file passes)."""
    with _open(path) as (f, head):
        try:
            if head[:4] in _TIFF_MAGIC:
                import tifffile
                with tifffile.TiffFile(f) as tf:
                    series, axes, k = _tiff_layout(tf, path, max_pixels)
                shape, dtype = series[0].shape, series[0].dtype
                dtype = np.dtype("uint8") if dtype == bool else (np.dtype("float32") if dtype.kind == "f" else dtype)
                return ImageInfo(shape[axes.index("X")], shape[axes.index("Y")], k, dtype)
            if size := _png16_size(path, head, max_pixels):
                return ImageInfo(*size, {2: 3, 4: 2, 6: 4}[head[25]], np.dtype("uint16"), alpha=head[25] != 2)
            im = _open_pil(f, path, head)
            _check_size(path, *im.size, max_pixels)
            mode = ImageMode.getmode(_pil_mode(im))
            width, height = im.size
            with contextlib.suppress(Exception):  # a broken EXIF block: read_image keeps such pixels as stored too
                # PNG is skipped: Pillow decodes it to find a late eXIf chunk; 5-8 are rotations by 90 degrees
                if im.format != "PNG" and int(im.getexif().get(0x0112, 1)) in (5, 6, 7, 8):
                    width, height = height, width
            dtype = np.dtype(mode.typestr).newbyteorder("=")
            return ImageInfo(width, height, len(mode.bands), dtype, mode.bands[-1] == "A")
        except ImageError:
            raise
        except Exception as e:  # a header parser tripping on garbage
            raise ImageError(path, f"corrupt: {type(e).__name__}: {e}") from e


def examine(path: str, decode: bool = True, max_pixels: int = MAX_PIXELS) -> ImageInfo | str:
    """The file's ImageInfo (pixels decoded, else the header only) or why it is bad; never raises: scans pool it."""
    try:
        if not decode:
            return probe(path, max_pixels=max_pixels)
        arr, alpha = _read_native(path, max_pixels)
        return ImageInfo(arr.shape[1], arr.shape[0], arr.shape[-1], arr.dtype, alpha)
    except ImageError as e:
        return e.reason
    except Exception as e:  # MemoryError on a huge-but-allowed file, a decoder bug...
        return f"corrupt: {type(e).__name__}: {e}"


def to_unit_float(img: np.ndarray, mode: str = "range", percentiles: Sequence[float] = (1.0, 99.8),
                  stats: tuple[Sequence[float], Sequence[float]] | None = None) -> np.ndarray:
    """An image to float32 in [0, 1], never through 8 bits: 'range' divides integers by their dtype's max, 'percentile'
    maps each image's channel percentiles to 0/1, 'dataset' the fixed ``stats=(low, high)`` (clipped)."""
    if mode == "range":
        return img.astype(np.float32) / np.float32(np.iinfo(img.dtype).max if img.dtype.kind in "ui" else 1)
    flat = img.reshape(-1, img.shape[-1] if img.ndim == 3 else 1)
    if mode == "percentile":
        low, high = np.percentile(flat, percentiles, axis=0)
    elif mode == "dataset":
        if stats is None:
            raise ValueError("to_unit_float(mode='dataset') needs stats=(low, high), e.g. from dataset_percentiles()")
        low, high = (np.broadcast_to(np.asarray(s, np.float64), flat.shape[1:]) for s in stats)
    else:
        raise ValueError(f"unknown intensity mode {mode!r}: use 'range', 'percentile' or 'dataset'")
    span = np.where(high > low, high - low, np.inf)  # a flat channel becomes 0, not NaN
    return np.clip((img.astype(np.float32) - low.astype(np.float32)) / span.astype(np.float32), 0, 1)


def dataset_percentiles(paths: Iterable[str | os.PathLike], channels: int, percentiles: Sequence[float] = (1.0, 99.8),
                        max_images: int = 256, pixels_per_image: int = 65536, seed: int = 0,
                        max_pixels: int = MAX_PIXELS) -> tuple[list[float], list[float]]:
    """Per-channel (low, high) intensity percentiles over a seeded sample of images, in the files' own units,
    for ``to_unit_float(mode='dataset', stats=...)``."""
    paths = list(paths)
    if not paths:
        raise ValueError("dataset_percentiles needs at least one image path")
    rng = np.random.default_rng(seed)
    if len(paths) > max_images:
        paths = [paths[i] for i in np.sort(rng.choice(len(paths), max_images, replace=False))]
    samples = []
    for path in paths:
        flat = read_image(path, channels, max_pixels=max_pixels).reshape(-1, channels)
        if len(flat) > pixels_per_image:
            flat = flat[rng.choice(len(flat), pixels_per_image, replace=False)]
        samples.append(flat.astype(np.float64))
    low, high = np.percentile(np.concatenate(samples), percentiles, axis=0)
    return low.tolist(), high.tolist()


# -- reading ---------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _open(path, data: bytes | None = None):
    """The open file (or ``data`` as one) and its first 32 bytes; an ImageError says why it cannot be read."""
    try:
        f = io.BytesIO(data) if data is not None else open(path, "rb")
    except FileNotFoundError:
        reason = "broken symlink" if os.path.islink(path) else "no such file (deleted or moved since the scan?)"
        raise ImageError(path, f"missing file: {reason}") from None
    except IsADirectoryError:
        raise ImageError(path, "not an image: a directory") from None
    except PermissionError:
        raise ImageError(path, "unreadable: permission denied (check the file's permissions)") from None
    except OSError as e:
        raise ImageError(path, f"unreadable: {e.strerror or e}") from None
    with f:
        try:
            head = f.read(32)
            f.seek(0)
        except OSError as e:
            raise ImageError(path, f"unreadable: {e.strerror or e}") from None
        if not head:
            raise ImageError(path, "empty file")
        yield f, head


def _read_native(path, max_pixels: int, data: bytes | None = None) -> tuple[np.ndarray, bool]:
    """HxWxK array as stored (after EXIF rotation), and whether its last channel is alpha."""
    with _open(path, data) as (f, head):
        if head[:4] in _TIFF_MAGIC:
            return _read_tiff(f, path, head, max_pixels)
        if _png16_size(path, head, max_pixels):
            return _read_png16(f, path, head[25])
        return _read_pil(f, path, head, max_pixels)


def _check_size(path, width: int, height: int, max_pixels: int, planes: int = 1) -> None:
    if width * height * planes > max_pixels:
        size = f"{width}x{height}" if planes == 1 else f"{planes} planes of {width}x{height}"
        raise ImageError(path, f"too large: {size} > {max_pixels} pixels (raise image.max_pixels if you trust it)")


def _not_image_reason(head: bytes) -> str:
    if head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "corrupt: cannot identify image file"
    if head[4:8] == b"ftyp":  # HEIC, AVIF, MP4...
        brand = head[8:12].decode("ascii", "replace").strip()
        return f"not an image: unsupported format ({brand}); convert it to PNG or JPEG"
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "not an image: an HTML page (a failed download?)"
    try:  # incremental: a character cut at the end of ``head`` is no reason to call it binary
        text = codecs.getincrementaldecoder("utf-8")().decode(head).lstrip("\ufeff")
    except UnicodeDecodeError:
        return "not an image: unknown format"
    if all(c.isprintable() or c in "\t\n\r" for c in text):
        return "not an image: a text file"
    return "not an image: unknown format"


def _load_failure(e: Exception) -> str:
    if "truncated" in str(e).lower():
        return f"truncated: {e}"
    return f"corrupt: {e}" if isinstance(e, OSError) else f"corrupt: {type(e).__name__}: {e}"


def _open_pil(f, path, head: bytes) -> Image.Image:
    try:
        return Image.open(f, formats=_PIL_FORMATS)
    except Image.DecompressionBombError as e:
        raise ImageError(path, f"too large: {str(e).split(', could')[0]} (Pillow's own guard)") from None
    except UnidentifiedImageError:
        raise ImageError(path, _not_image_reason(head)) from None
    except Exception as e:
        raise ImageError(path, _load_failure(e)) from None


def _pil_mode(im: Image.Image) -> str:
    """The Pillow mode read_image converts an image to: it gives the native channels, dtype and alpha."""
    if im.mode == "P":
        return "RGBA" if "transparency" in im.info else "RGB"
    if im.mode in ("L", "LA", "RGB", "RGBA", "I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return im.mode
    return {"1": "L", "La": "LA", "PA": "RGBA", "RGBa": "RGBA"}.get(im.mode, "RGB")  # RGB: CMYK, YCbCr, LAB, ...


def _read_pil(f, path, head: bytes, max_pixels: int) -> tuple[np.ndarray, bool]:
    im = _open_pil(f, path, head)
    _check_size(path, *im.size, max_pixels)
    try:
        im.load()
    except Exception as e:  # OSError, SyntaxError, ValueError, zlib.error, EOFError... from a damaged stream
        raise ImageError(path, _load_failure(e)) from None
    with contextlib.suppress(Exception):  # broken EXIF block: keep the pixels as stored
        im = ImageOps.exif_transpose(im)
    mode = _pil_mode(im)
    arr = _native_dtype(np.asarray(im if im.mode == mode else im.convert(mode)))  # astype: big-endian I;16B
    return arr.reshape(*arr.shape[:2], -1), mode in ("LA", "RGBA")


def _png16_size(path, head: bytes, max_pixels: int) -> tuple[int, int] | None:
    """(width, height) of a 16-bit PNG with colour or alpha, which Pillow would read as 8-bit; None for other files."""
    if not (head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR" and head[24] == 16
            and head[25] in (2, 4, 6)):
        return None
    width, height = struct.unpack(">II", head[16:24])
    _check_size(path, width, height, max_pixels)
    return width, height


def _read_png16(f, path, color_type: int) -> tuple[np.ndarray, bool]:
    import cv2

    arr = cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ImageError(path, "corrupt: OpenCV cannot decode this 16-bit PNG (truncated or damaged)")
    order = [0, 3] if color_type == 4 else [2, 1, 0, 3][:arr.shape[-1]]  # gray+alpha comes as BGRA, gray thrice
    return np.ascontiguousarray(arr[..., order]), arr.shape[-1] == 4


def _tiff_layout(tf, path, max_pixels: int):
    """The series to read (several same-shape 2-D series are stacked as channels), its axes and channels."""
    series = tf.series[0]
    axes, shape = series.axes, tuple(series.shape)
    if "Y" not in axes or "X" not in axes:
        raise ImageError(path, f"corrupt: no readable image in this TIFF (axes {axes!r})")
    extra = [a for a in axes if a not in "YX"]
    if len(extra) > 1:
        raise ImageError(path, f"unsupported: TIFF with axes {axes!r} and shape {shape} has more than one "
                               f"non-spatial axis; save one 2-D (multi-channel) image per file")
    same = [s for s in tf.series if tuple(s.shape) == shape and s.dtype == series.dtype]
    stack = axes == "YX" and len(tf.series) > 1 and len(same) == len(tf.series)
    height, width = shape[axes.index("Y")], shape[axes.index("X")]
    k = len(tf.series) if stack else (shape[axes.index(extra[0])] if extra else 1)
    planes = 1 if (extra == ["S"] or not (stack or extra)) else k
    _check_size(path, width, height, max_pixels, planes)
    return (tf.series if stack else [series]), axes, k


def _read_tiff(f, path, head: bytes, max_pixels: int) -> tuple[np.ndarray, bool]:
    import tifffile

    try:
        with tifffile.TiffFile(f) as tf:
            series, axes, _ = _tiff_layout(tf, path, max_pixels)
            try:
                arrays = [s.asarray() for s in series]
            except (KeyError, ValueError) as e:
                if "imagecodecs" not in str(e):
                    raise
                if len(series) == 1 and axes in ("YX", "YXS"):  # LZW, JPEG...: Pillow decodes plain images
                    f.seek(0)
                    return _read_pil(f, path, head, max_pixels)[0], False  # TIFF alpha stays a channel
                raise ImageError(path, f"unsupported: {e}: pip install imagecodecs") from None
    except ImageError:
        raise
    except Exception as e:
        kind = "truncated" if "failed to read" in str(e) else "corrupt"  # tifffile's short read
        raise ImageError(path, f"{kind}: {type(e).__name__}: {e}") from None
    if len(arrays) > 1:
        arr = np.stack(arrays, axis=-1)
    else:
        arr = np.moveaxis(arrays[0], [axes.index("Y"), axes.index("X")], [0, 1])
    return np.ascontiguousarray(_native_dtype(arr.reshape(*arr.shape[:2], -1))), False


def _native_dtype(arr: np.ndarray) -> np.ndarray:
    """uint8/uint16/float32 as they are; bool to 0/255; other integers to uint16 if they fit, else float32."""
    if arr.dtype in (np.uint8, np.uint16, np.float32):
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * np.uint8(255)
    if arr.dtype.kind in "ui" and arr.size and arr.min() >= 0 and arr.max() <= 65535:
        return arr.astype(np.uint16)
    return arr.astype(np.float32)


def _check_channels(path, k: int, alpha: bool, channels: int) -> None:
    """Raise unless a file with ``k`` channels (the last one alpha if ``alpha``) can be read as ``channels``."""
    color = k - alpha
    if channels in (k, color) or (channels, color) in ((3, 1), (1, 3)):
        return
    has = f"{color} channels + alpha" if alpha else f"{k} channel{'s' * (k != 1)}"
    fix = f"set image.channels: {color} in the recipe" + (f" (or {k} to keep alpha)" if alpha else "")
    raise ImageError(path, f"wrong channels: file has {has}, the recipe reads {channels}: {fix}, or convert the file")
