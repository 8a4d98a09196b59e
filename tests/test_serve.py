"""finetune serve: a real headless Chromium uploads images to the page and reads the right labels; an exported
model serves too (without maps). Bound to 127.0.0.1, each request bounded in time."""
import shutil
import threading
import urllib.request
import uuid

import pytest

from finetune.predict import Predictor
from finetune.serve import make_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture
def served(request):
    servers = []

    def start(path):
        server = make_server(path, port=0, top_k=2)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def _right(run, n=2):
    """Validation images the run classifies right, with their labels."""
    items = run.items[run.items["split"] == "val"]
    table = Predictor.load(run.path).predict_paths(items["path"].tolist())
    ok = items.reset_index(drop=True)[table["label_1"] == items["label"].to_numpy()]
    assert len(ok) >= n
    return list(ok.groupby("label").head(1).head(n).itertuples(index=False))


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (apt-get install -y chromium)")
def test_upload_in_headless_chromium_shows_the_right_labels(tiny_run, served):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    pytest.importorskip("pytorch_grad_cam")
    url, images = served(tiny_run.path), _right(tiny_run)
    assert url.startswith("http://127.0.0.1:")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(url)
            page.set_input_files("input[type=file]", [im.path for im in images])
            page.click("button")
            page.wait_for_selector("table.top")
            tops = page.eval_on_selector_all("table.top", "ts => ts.map(t => t.querySelector('td.label').textContent)")
            assert tops == [im.label for im in images]
            probs = page.eval_on_selector_all("td.prob", "ts => ts.map(t => parseFloat(t.textContent))")
            assert len(probs) == 4 and all(0 <= v <= 1 for v in probs) and probs[0] >= probs[1]
            sizes = page.eval_on_selector_all("img", "is => is.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
            assert sizes == [[True, 64, 32]] * 2  # the image as the model read it beside its map, 32 px each
        finally:
            browser.close()


def test_an_exported_model_serves_without_maps(tiny_run, served, tmp_path):
    from finetune.export import export
    pytest.importorskip("onnxruntime")
    url = served(export(tiny_run, "onnx", out=tmp_path / "onnx"))
    (im,) = _right(tiny_run, 1)
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=images; filename=a.png\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + open(im.path, "rb").read() + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    page = urllib.request.urlopen(req, timeout=60).read().decode()
    assert f"<td class=label>{im.label}</td>" in page.split("table class=top")[1] and "No maps" in page
    with pytest.raises(urllib.error.HTTPError, match="400"):
        urllib.request.urlopen(urllib.request.Request(url, b"", {"Content-Type": "text/plain"}), timeout=60)
