"""read_image, probe and intensity scaling on tiny files made here: every mode, 16-bit, TIFF layouts, bad files."""
import builtins
import os
import struct
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageFile

import finetune.images as images
from finetune.images import ImageError, dataset_percentiles, probe, read_image, to_unit_float

RNG = np.random.default_rng(0)


def noise(h, w, c=3, dtype=np.uint8):
    top = np.iinfo(dtype).max
    return RNG.integers(0, top, (h, w, c) if c else (h, w), endpoint=True).astype(dtype)


def fake_png(path, width, height):
    """A valid PNG header claiming width x height, with almost no pixel data behind it."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def truncate(path, fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


# -- modes -------------------------------------------------------------------------------------------------------

def test_rgb_png_exact(tmp_path):
    a = noise(5, 7)
    Image.fromarray(a).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, a)


@pytest.mark.parametrize("ext", ["png", "jpg", "bmp", "webp", "gif", "tif"])
def test_formats_read_as_hwc(tmp_path, ext):
    Image.fromarray(noise(6, 9)).save(tmp_path / f"a.{ext}")
    out = read_image(tmp_path / f"a.{ext}")
    assert out.shape == (6, 9, 3) and out.dtype == np.uint8
    assert probe(tmp_path / f"a.{ext}") == images.ImageInfo(9, 6, 3, np.dtype("uint8"))


def test_gray_replicated_to_three_and_kept_as_one(tmp_path):
    g = noise(4, 5, c=0)
    Image.fromarray(g).save(tmp_path / "g.png")
    three = read_image(tmp_path / "g.png", channels=3)
    assert three.shape == (4, 5, 3)
    for c in range(3):
        np.testing.assert_array_equal(three[..., c], g)
    np.testing.assert_array_equal(read_image(tmp_path / "g.png", channels=1)[..., 0], g)


def test_rgb_to_one_channel_is_luminance(tmp_path):
    a = noise(8, 8)
    Image.fromarray(a).save(tmp_path / "a.png")
    gray = read_image(tmp_path / "a.png", channels=1)
    expected = np.asarray(Image.fromarray(a).convert("L")).astype(int)
    assert gray.shape == (8, 8, 1) and gray.dtype == np.uint8
    assert np.abs(gray[..., 0].astype(int) - expected).max() <= 1


def test_rgba_drops_alpha_or_keeps_it_for_four_channels(tmp_path):
    a = noise(4, 4, 4)
    a[..., 3] = 0  # fully transparent: dropping alpha must still give the colour values
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png", 3), a[..., :3])
    np.testing.assert_array_equal(read_image(tmp_path / "a.png", 4), a)
    assert read_image(tmp_path / "a.png", 1).shape == (4, 4, 1)
    assert probe(tmp_path / "a.png") == images.ImageInfo(4, 4, 4, np.dtype("uint8"), alpha=True)


def test_la_gray_alpha(tmp_path):
    a = noise(4, 4, 2)
    Image.fromarray(a, "LA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png", 1)[..., 0], a[..., 0])
    np.testing.assert_array_equal(read_image(tmp_path / "a.png", 3)[..., 2], a[..., 0])
    np.testing.assert_array_equal(read_image(tmp_path / "a.png", 2), a)


def test_palette_and_palette_with_transparency(tmp_path):
    rgb = Image.fromarray(noise(6, 6))
    pal = rgb.quantize(8)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), np.asarray(pal.convert("RGB")))
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pt.png", transparency=0)
    out = read_image(tmp_path / "pt.png")
    np.testing.assert_array_equal(out, np.asarray(pal.convert("RGBA"))[..., :3])
    assert probe(tmp_path / "pt.png").alpha


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (5, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # pure red in ink
    out = read_image(tmp_path / "c.jpg")
    assert out.shape == (4, 5, 3)
    assert out[..., 0].min() > 200 and out[..., 1:].max() < 60


def test_bilevel_becomes_0_255(tmp_path):
    Image.fromarray(noise(4, 4, c=0) > 127).save(tmp_path / "b.png")
    out = read_image(tmp_path / "b.png", 1)
    assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 255}


def test_16bit_gray_png_stays_16bit(tmp_path):
    a = noise(6, 5, c=0, dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode == "I;16"
    out = read_image(tmp_path / "a.png", 1)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out[..., 0], a)
    assert read_image(tmp_path / "a.png", 3).dtype == np.uint16
    assert probe(tmp_path / "a.png").dtype == np.uint16


def test_16bit_pgm_mode_i_becomes_uint16(tmp_path):
    a = (np.arange(12).reshape(3, 4) * 5000).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "a.pgm")
    assert Image.open(tmp_path / "a.pgm").mode == "I"
    out = read_image(tmp_path / "a.pgm", 1)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out[..., 0], a)


def test_16bit_colour_png_stays_16bit_in_rgb_order(tmp_path):
    cv2 = pytest.importorskip("cv2")
    a = noise(5, 6, 3, np.uint16)
    assert cv2.imwrite(str(tmp_path / "a.png"), a[..., ::-1])
    assert Image.open(tmp_path / "a.png").mode == "RGB"  # Pillow alone would give 8 bits
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, a)
    rgba = noise(5, 6, 4, np.uint16)
    assert cv2.imwrite(str(tmp_path / "b.png"), rgba[..., [2, 1, 0, 3]])
    np.testing.assert_array_equal(read_image(tmp_path / "b.png"), rgba[..., :3])
    assert probe(tmp_path / "b.png") == images.ImageInfo(6, 5, 4, np.dtype("uint16"), alpha=True)


def test_exif_orientation_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, 20:] = 255
    a[:10, :10] = 128
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: rotate 90 degrees clockwise to view
    Image.fromarray(a).save(tmp_path / "r.jpg", exif=exif, quality=95)
    stored = np.asarray(Image.open(tmp_path / "r.jpg").convert("RGB"))
    out = read_image(tmp_path / "r.jpg")
    assert out.shape == (40, 20, 3)
    np.testing.assert_array_equal(out, np.rot90(stored, k=-1))
    info = probe(tmp_path / "r.jpg")
    assert (info.width, info.height) == (20, 40)


# -- TIFF ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_tiff_gray_native_dtype(tmp_path, dtype):
    a = (RNG.random((5, 6)) * 60000).astype(dtype)
    tifffile.imwrite(tmp_path / "a.tif", a)
    out = read_image(tmp_path / "a.tif", 1)
    assert out.dtype == dtype and out.shape == (5, 6, 1)
    np.testing.assert_array_equal(out[..., 0], a)


def test_tiff_rgb_yxs(tmp_path):
    a = noise(5, 6, 3, np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", a, photometric="rgb")
    np.testing.assert_array_equal(read_image(tmp_path / "a.tif"), a)


def test_tiff_cyx_channels_moved_last(tmp_path):
    a = noise(4, 5, 6, np.uint16).transpose(2, 0, 1)  # C, Y, X
    tifffile.imwrite(tmp_path / "a.tif", a, photometric="minisblack")
    out = read_image(tmp_path / "a.tif", 6)
    assert out.shape == (4, 5, 6)
    np.testing.assert_array_equal(out, a.transpose(1, 2, 0))
    assert probe(tmp_path / "a.tif").channels == 6


def test_tiff_imagej_hyperstack_cyx(tmp_path):
    a = noise(4, 5, 2, np.uint16).transpose(2, 0, 1)
    tifffile.imwrite(tmp_path / "a.tif", a, imagej=True, metadata={"axes": "CYX"})
    with pytest.raises(ImageError, match="file has 2 channels, the recipe reads 3"):
        read_image(tmp_path / "a.tif", 3)
    np.testing.assert_array_equal(read_image(tmp_path / "a.tif", 2), a.transpose(1, 2, 0))


def test_tiff_pages_written_one_by_one_become_channels(tmp_path):
    planes = [noise(5, 6, c=0, dtype=np.uint16) for _ in range(4)]
    with tifffile.TiffWriter(tmp_path / "a.tif") as w:
        for p in planes:
            w.write(p)
    out = read_image(tmp_path / "a.tif", 4)
    np.testing.assert_array_equal(out, np.stack(planes, axis=-1))


def test_tiff_zyx_pages_as_channels(tmp_path):
    a = noise(5, 6, 3, np.uint8).transpose(2, 0, 1)
    tifffile.imwrite(tmp_path / "a.tif", a, photometric="minisblack", metadata={"axes": "ZYX"})
    np.testing.assert_array_equal(read_image(tmp_path / "a.tif", 3), a.transpose(1, 2, 0))


def test_four_channel_tiff_read_as_three_names_both_sides(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", noise(4, 4, 4), photometric="minisblack", planarconfig="contig")
    with pytest.raises(ImageError) as e:
        read_image(tmp_path / "a.tif", 3)
    msg = str(e.value)
    assert "a.tif" in msg and "file has 4 channels" in msg and "reads 3" in msg and "image.channels: 4" in msg
    assert e.value.kind == "wrong channels"
    assert read_image(tmp_path / "a.tif", 4).shape == (4, 4, 4)


def test_rgba_tiff_is_four_channels_not_rgb(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", noise(4, 4, 4))  # tifffile tags this RGB + alpha
    with pytest.raises(ImageError, match="wrong channels"):
        read_image(tmp_path / "a.tif", 3)


def test_three_channel_image_read_as_five_fails(tmp_path):
    Image.fromarray(noise(4, 4)).save(tmp_path / "a.png")
    with pytest.raises(ImageError, match="file has 3 channels, the recipe reads 5: set image.channels: 3"):
        read_image(tmp_path / "a.png", 5)


def test_tiff_with_two_extra_axes_is_unsupported(tmp_path):
    a = noise(5, 6, 6, np.uint16).transpose(2, 0, 1).reshape(2, 3, 5, 6)
    tifffile.imwrite(tmp_path / "a.tif", a, imagej=True, metadata={"axes": "ZCYX"})
    with pytest.raises(ImageError, match="unsupported: .*ZCYX"):
        read_image(tmp_path / "a.tif", 3)


def test_tiff_other_dtypes(tmp_path):
    tifffile.imwrite(tmp_path / "i.tif", np.array([[0, 7], [300, 9]], np.int16))
    tifffile.imwrite(tmp_path / "n.tif", np.array([[-1, 7], [300, 9]], np.int16))
    tifffile.imwrite(tmp_path / "d.tif", np.array([[0.5, 2.0]], np.float64))
    tifffile.imwrite(tmp_path / "b.tif", np.array([[True, False]]))
    assert read_image(tmp_path / "i.tif", 1).dtype == np.uint16
    n = read_image(tmp_path / "n.tif", 1)
    assert n.dtype == np.float32 and n.min() == -1
    assert read_image(tmp_path / "d.tif", 1).dtype == np.float32
    np.testing.assert_array_equal(read_image(tmp_path / "b.tif", 1)[..., 0], [[255, 0]])


def test_lzw_tiff_reads_without_imagecodecs(tmp_path):
    a = noise(6, 7, c=0, dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "a.tif", compression="tiff_lzw")
    out = read_image(tmp_path / "a.tif", 1)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out[..., 0], a)


def test_tiff_named_png_is_read_as_tiff(tmp_path):
    a = noise(4, 5, 3, np.uint16).transpose(2, 0, 1)
    tifffile.imwrite(tmp_path / "a.png", a, photometric="minisblack")
    assert read_image(tmp_path / "a.png", 3).dtype == np.uint16


# -- bad files -----------------------------------------------------------------------------------------------------

def reason(path, **kw):
    with pytest.raises(ImageError) as e:
        read_image(path, **kw)
    assert str(path) in str(e.value)
    return e.value.reason


def test_empty_file(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    assert reason(tmp_path / "a.png") == "empty file"
    with pytest.raises(ImageError, match="empty file"):
        probe(tmp_path / "a.png")


def test_text_named_jpg_is_not_an_image(tmp_path):
    (tmp_path / "a.jpg").write_text("these are my notes\n")
    (tmp_path / "b.jpg").write_text("<!DOCTYPE html><html>404</html>")
    (tmp_path / "c.jpg").write_bytes(bytes(range(200, 256)))
    assert reason(tmp_path / "a.jpg") == "not an image: a text file"
    assert reason(tmp_path / "b.jpg").startswith("not an image: an HTML page")
    assert reason(tmp_path / "c.jpg") == "not an image: unknown format"
    (tmp_path / "d.heic").write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0")
    assert reason(tmp_path / "d.heic") == "not an image: unsupported format (heic); convert it to PNG or JPEG"


def test_image_magic_with_garbage_is_corrupt(tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(RNG.integers(0, 256, 200, dtype=np.uint8)))
    assert reason(tmp_path / "a.png").startswith("corrupt")


@pytest.mark.parametrize("ext", ["png", "jpg", "tif"])
def test_truncated(tmp_path, ext):
    Image.fromarray(noise(64, 64)).save(tmp_path / f"a.{ext}")
    truncate(tmp_path / f"a.{ext}")
    assert reason(tmp_path / f"a.{ext}").startswith("truncated")
    assert probe(tmp_path / f"a.{ext}").width == 64  # the header alone looks fine


def test_truncated_check_leaves_pil_global_alone(tmp_path):
    Image.fromarray(noise(64, 64)).save(tmp_path / "a.jpg")
    truncate(tmp_path / "a.jpg")
    before = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    reason(tmp_path / "a.jpg")
    assert (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS) == before == (False, images.MAX_PIXELS)


def test_missing_file_and_directory(tmp_path):
    assert reason(tmp_path / "nope.png").startswith("missing file")
    (tmp_path / "d.png").mkdir()
    assert reason(tmp_path / "d.png").startswith("not an image")
    os.symlink(tmp_path / "gone.png", tmp_path / "link.png")
    assert reason(tmp_path / "link.png") == "missing file: broken symlink"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_by_permissions(tmp_path):
    Image.fromarray(noise(4, 4)).save(tmp_path / "a.png")
    os.chmod(tmp_path / "a.png", 0)
    try:
        assert reason(tmp_path / "a.png").startswith("unreadable")
    finally:
        os.chmod(tmp_path / "a.png", 0o644)


def test_unreadable_when_open_is_refused(tmp_path, monkeypatch):
    """The same path as chmod 000, for runs as root: opening raises PermissionError."""
    Image.fromarray(noise(4, 4)).save(tmp_path / "a.png")

    def refuse(path, *args, **kw):
        if str(path) == str(tmp_path / "a.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *args, **kw)

    monkeypatch.setattr(images, "open", refuse, raising=False)
    assert reason(tmp_path / "a.png") == "unreadable: permission denied (check the file's permissions)"


def test_bomb_guard_before_decoding(tmp_path):
    fake_png(tmp_path / "big.png", 10_000, 10_000)  # over our default, under twice Pillow's: Pillow only warns
    with pytest.warns(Image.DecompressionBombWarning):
        r = reason(tmp_path / "big.png")
        with pytest.raises(ImageError, match="too large"):
            probe(tmp_path / "big.png")
    assert r.startswith("too large: 10000x10000 > 89478485 pixels")


def test_bomb_guard_catches_pillows_own_error(tmp_path):
    fake_png(tmp_path / "huge.png", 20_000, 20_000)
    assert reason(tmp_path / "huge.png").startswith("too large")
    assert Image.MAX_IMAGE_PIXELS == images.MAX_PIXELS


def test_bomb_guard_is_configurable(tmp_path):
    Image.fromarray(noise(10, 10)).save(tmp_path / "a.png")
    assert reason(tmp_path / "a.png", max_pixels=99) == (
        "too large: 10x10 > 99 pixels (raise image.max_pixels if you trust it)")
    assert read_image(tmp_path / "a.png", max_pixels=100).shape == (10, 10, 3)
    tifffile.imwrite(tmp_path / "a.tif", noise(10, 10, 3, np.uint16).transpose(2, 0, 1), photometric="minisblack")
    assert reason(tmp_path / "a.tif", max_pixels=299).startswith("too large: 3 planes of 10x10")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bomb_guard_raised_limit_lets_the_file_through_to_decoding(tmp_path):
    fake_png(tmp_path / "big.png", 10_000, 10_000)
    assert reason(tmp_path / "big.png", max_pixels=200_000_000).startswith(("truncated", "corrupt"))


def test_bad_channels_argument():
    with pytest.raises(ValueError):
        read_image("whatever.png", 0)


# -- intensity -----------------------------------------------------------------------------------------------------

def test_range_scaling_by_dtype():
    assert to_unit_float(np.array([[[0, 255]]], np.uint8)).tolist() == [[[0.0, 1.0]]]
    u16 = to_unit_float(np.array([[[1000, 1100, 65535]]], np.uint16))
    assert u16.dtype == np.float32
    np.testing.assert_allclose(u16[0, 0], [1000 / 65535, 1100 / 65535, 1.0], rtol=1e-6)
    assert u16[0, 0, 0] != u16[0, 0, 1]  # 8-bit squashing would make these equal (both 3/255 or 4/255)
    f = np.array([[[0.25, 0.5]]], np.float32)
    np.testing.assert_array_equal(to_unit_float(f), f)


def test_percentile_scaling_is_per_channel_and_clipped():
    a = np.zeros((10, 10, 2), np.uint16)
    a[..., 0] = np.arange(100).reshape(10, 10)
    a[..., 1] = 1000 + 40 * np.arange(100).reshape(10, 10)
    out = to_unit_float(a, "percentile", percentiles=(10, 90))
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1
    np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-6)  # same shape of data, different range
    assert (out[..., 0] == 0).sum() == 10 and (out[..., 0] == 1).sum() == 10  # 0..9 and 90..99


def test_percentile_flat_channel_is_zero_not_nan():
    out = to_unit_float(np.full((4, 4, 1), 7, np.uint8), "percentile")
    assert np.isfinite(out).all() and (out == 0).all()


def test_percentile_on_2d_image():
    out = to_unit_float(np.arange(16, dtype=np.uint16).reshape(4, 4), "percentile", percentiles=(0, 100))
    assert out.shape == (4, 4) and out[0, 0] == 0 and out[-1, -1] == 1


def test_dataset_scaling_with_stats():
    a = np.array([[[100, 2000], [300, 4000]]], np.uint16)
    out = to_unit_float(a, "dataset", stats=([100, 2000], [300, 3000]))
    np.testing.assert_allclose(out, [[[0, 0], [1, 1]]])
    with pytest.raises(ValueError, match="stats"):
        to_unit_float(a, "dataset")
    with pytest.raises(ValueError, match="unknown intensity mode"):
        to_unit_float(a, "minmax")


def test_dataset_percentiles_per_channel(tmp_path):
    paths = []
    for i in range(3):
        a = np.zeros((10, 10, 2), np.uint16)
        a[..., 0] = i * 100 + np.arange(100).reshape(10, 10)  # 0..299 over the three
        a[..., 1] = 5000
        tifffile.imwrite(tmp_path / f"{i}.tif", a, photometric="minisblack", planarconfig="contig")
        paths.append(tmp_path / f"{i}.tif")
    low, high = dataset_percentiles(paths, channels=2, percentiles=(0, 100))
    assert low == [0.0, 5000.0] and high == [299.0, 5000.0]
    low, high = dataset_percentiles(paths, channels=2, percentiles=(0, 100), max_images=1)
    assert high[0] - low[0] == 99
    with pytest.raises(ValueError):
        dataset_percentiles([], channels=1)
