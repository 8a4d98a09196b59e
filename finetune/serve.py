"""``finetune serve``: a page on 127.0.0.1 (the standard library's server, no scripts) to upload images to a run or
an export and see the top-k labels and, with ``finetune[explain]``, where the model looked."""
from __future__ import annotations

import base64
import email.parser
import email.policy
import html
import io
import tempfile
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np

MAX_UPLOAD = 64 << 20  # bytes per request
STYLE = ("body{font:15px system-ui,sans-serif;max-width:1000px;margin:20px auto;color:#222}section{border-top:1px "
         "solid #ddd;padding:10px 0}img{height:224px;image-rendering:pixelated}td{padding:2px 12px}.err{color:#a00}")


def make_server(path: str | Path, port: int = 8000, top_k: int = 3) -> HTTPServer:
    """The server for a run or export folder on 127.0.0.1:``port`` (0: any free port); not started."""
    from .predict import Predictor
    predictor = Predictor.load(path)
    try:
        from .explain import Explainer
        explainer, note = Explainer(predictor), ""
    except (ImportError, ValueError) as e:
        explainer, note = None, f"No maps: {e}"
    title = f"{Path(path).resolve().name}: {', '.join(predictor.classes)}"

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._send(200, "") if self.path in ("/", "/index.html") else self._send(404, "<p class=err>not found")

        def do_POST(self) -> None:
            size = int(self.headers.get("Content-Length") or 0)
            if size > MAX_UPLOAD:
                return self._send(413, f"<p class=err>upload over {MAX_UPLOAD >> 20} MB; send fewer images at once")
            msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                f"Content-Type: {self.headers.get('Content-Type', '')}\r\n\r\n".encode() + self.rfile.read(size))
            files = [(p.get_filename(), p.get_payload(decode=True)) for p in msg.iter_parts() if p.get_filename()]
            if not files:
                return self._send(400, "<p class=err>choose one or more image files first")
            try:
                self._send(200, self._results(files))
            except Exception as e:  # noqa: BLE001 - a bad upload is shown on the page, the server goes on
                self._send(400, f"<p class=err>{html.escape(str(e))}")

        def _results(self, files: list[tuple[str, bytes]]) -> str:
            with tempfile.TemporaryDirectory() as tmp:
                paths = [Path(tmp) / f"{i}{Path(name).suffix.lower()}" for i, (name, _) in enumerate(files)]
                for path, (_, data) in zip(paths, files):
                    path.write_bytes(data)
                table = predictor.predict_paths(paths, top_k=top_k)
                pictures = ([_png(np.concatenate(pair, axis=1)) for pair in explainer.overlays(
                    paths, [predictor.classes.index(c) for c in table["label_1"]])] if explainer else [])
            out = [f"<p>{html.escape(note)}</p>"] if note else []
            for i, (name, _) in enumerate(files):
                row = table.iloc[i]
                rows = "".join(f"<tr><td class=label>{html.escape(str(row[f'label_{j}']))}</td>"
                               f"<td class=prob>{row[f'prob_{j}']:.3f}</td></tr>" for j in range(1, top_k + 1)
                               if f"label_{j}" in row)
                img = (f"<img alt='{html.escape(name)} as the model read it, and where it looked' "
                       f"src='data:image/png;base64,{pictures[i]}'>" if pictures else "")
                out.append(f"<section><h2>{html.escape(name)}</h2>{img}<table class=top>{rows}</table></section>")
            return "".join(out)

        def _send(self, code: int, body: str) -> None:
            page = (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
                    f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><form method=post "
                    f"enctype=multipart/form-data><input type=file name=images multiple> <button>Predict</button>"
                    f"</form>{body}</body></html>").encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args) -> None:  # quiet: no line per request
            pass

    return HTTPServer(("127.0.0.1", port), Page)


def serve(path: str | Path, port: int = 8000, top_k: int = 3) -> None:
    """Serve until interrupted (Ctrl-C)."""
    with make_server(path, port, top_k) as server:
        print(f"serving {path} on http://127.0.0.1:{server.server_port}/ (this computer only; Ctrl-C stops)")
        server.serve_forever()


def _png(image: np.ndarray) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
