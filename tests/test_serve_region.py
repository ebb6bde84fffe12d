"""`dconnx serve` with a dense (segmentation) model: the `region` option of /explain and /predict.

The U-Net of tests/test_segmentation.py, converted with three methods, served as a subprocess on
127.0.0.1. A box (JSON list, "x0,y0,x1,y1" text, form field) or a mask (nested lists or an
encoded array, one for all samples or one per sample) gives what `Explainer.maps` gives for the
same mask; a bad region is a 4xx JSON error with a message, never a 5xx, and the server stays
up. Also: the batcher merges regions, and `dconnx view` runs with serve's header timeout.
"""
import asyncio
import io
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import dconnx
from dconnx.runtime import Explainer
from dconnx.serve.batching import MicroBatcher

for _mod in ("fastapi", "uvicorn", "httpx", "multipart", "prometheus_client"):
    pytest.importorskip(_mod, reason=f"the serve extra is not installed ({_mod}): pip install '.[test]'")
import httpx  # noqa: E402

from test_serve import FIXTURE, Server, b64, close, free_port, inputs, unpack  # noqa: E402

SIZE = 16
METHODS = "splitgrad,splitcam,splitlrp"


@pytest.fixture(scope="module")
def unet(tmp_path_factory) -> Path:
    from test_segmentation import converted_unet_file
    return converted_unet_file(tmp_path_factory.mktemp("serve-unet"), SIZE, METHODS)


@pytest.fixture(scope="module")
def ex(unet) -> Explainer:
    return Explainer(unet, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def server(unet, tmp_path_factory):
    srv = Server(["serve", str(unet), "--max-batch", "8", "--max-request-samples", "4", "--log-level", "warning"],
                 tmp_path_factory.mktemp("serve-unet-log") / "serve.log")
    yield srv
    srv.stop()


def seg_inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)


def box_mask(x0, y0, x1, y1) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), np.float32)
    m[y0:y1, x0:x1] = 1
    return m


def assert_like_explainer(body: dict, want, label: str) -> None:
    np.testing.assert_array_equal(body["target"], want.target, err_msg=label)
    np.testing.assert_allclose(body["scores"], want.scores, rtol=1e-5, atol=1e-5, err_msg=label)
    rows = np.arange(len(want.target))
    np.testing.assert_allclose(body["f"], want.scores[rows, want.target], rtol=1e-5, atol=1e-5, err_msg=label)
    np.testing.assert_allclose(np.subtract(body["g"], body["h"]), body["f"], rtol=1e-4, atol=1e-4, err_msg=label)
    for m, enc in body["maps"].items():
        assert close(unpack(enc), want[m]), (label, m)


def test_model_and_page_config_describe_the_region(server):
    info = httpx.get(server.url + "/model").json()
    assert info["region"]["shape"] == [SIZE, SIZE] and info["n_classes"] == 4
    assert httpx.get(server.url + "/page/config").json()["dense"] == {"output_shape": [SIZE, SIZE]}


def test_region_box_and_mask_equal_explainer(server, ex):
    x = seg_inputs(2)
    alpha = 0.35
    full = ex.maps(x, alpha=alpha)
    r = httpx.post(server.url + "/explain", json={"inputs": b64(x), "alpha": alpha}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["region"]["kind"] == "all" and "logits" not in r.json()
    assert_like_explainer(r.json(), full, "every position")

    box = box_mask(3, 2, 12, 9)
    want = ex.maps(x, alpha=alpha, region=box)
    for label, region in (("list", [3, 2, 12, 9]), ("text", "3,2,12,9"), ("mask", box.tolist()),
                          ("encoded mask", b64(box))):
        r = httpx.post(server.url + "/explain", json={"inputs": b64(x), "alpha": alpha, "region": region},
                       timeout=30)
        assert r.status_code == 200, (label, r.text)
        assert_like_explainer(r.json(), want, f"box as {label}")
        assert r.json()["region"]["positions"] == [63.0, 63.0]
    assert not close(unpack(r.json()["maps"]["splitgrad"]), full["splitgrad"])    # the box reaches the maps

    per_sample = np.stack([box_mask(0, 0, 5, 16), box_mask(8, 8, 16, 16) * 0.5])
    r = httpx.post(server.url + "/explain", json={"inputs": b64(x), "alpha": alpha, "region": b64(per_sample),
                                                  "target": [1, 2]}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["region"]["kind"] == "mask"
    assert_like_explainer(r.json(), ex.maps(x, target=[1, 2], alpha=alpha, region=per_sample), "per-sample masks")

    # a form field, as the page sends it, and a query parameter with a raw image body
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(1).uniform(size=(SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    from dconnx.images import ImageInput
    xi, _ = ImageInput.from_explainer(ex).load(buf.getvalue())
    want = ex.maps(xi[None], alpha=alpha, region=box_mask(1, 1, 6, 4))
    r = httpx.post(server.url + "/explain", files={"image": ("a.png", buf.getvalue(), "image/png")},
                   data={"region": "1,1,6,4", "alpha": str(alpha)}, timeout=30)
    assert r.status_code == 200, r.text
    assert_like_explainer(r.json(), want, "form field")
    r = httpx.post(server.url + f"/explain?region=1,1,6,4&alpha={alpha}", content=buf.getvalue(),
                   headers={"content-type": "image/png"}, timeout=30)
    assert r.status_code == 200, r.text
    assert_like_explainer(r.json(), want, "query")
    # /predict ranks by the region sum too
    r = httpx.post(server.url + "/predict", json={"inputs": b64(x), "region": "3,2,12,9"}, timeout=30)
    assert r.status_code == 200 and r.json()["argmax"] == ex.maps(x, region=box).target.tolist()
    # the panel PNG of a dense model
    r = httpx.post(server.url + "/panel?region=3,2,12,9", content=buf.getvalue(),
                   headers={"content-type": "image/png"}, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


def test_concurrent_regions_are_batched_per_request(server, ex):
    """Requests with and without regions merged into one onnxruntime call each get their own."""
    from concurrent.futures import ThreadPoolExecutor
    x = seg_inputs(4, seed=5)
    regions = [None, [0, 0, 8, 8], None, [4, 4, 16, 12]]

    def one(i):
        body = {"inputs": b64(x[i:i + 1]), "alpha": 0.35}
        if regions[i] is not None:
            body["region"] = regions[i]
        return httpx.post(server.url + "/explain", json=body, timeout=30).json()
    for _ in range(3):
        with ThreadPoolExecutor(4) as pool:
            bodies = list(pool.map(one, range(4)))
        for i, body in enumerate(bodies):
            region = None if regions[i] is None else box_mask(*regions[i])
            assert_like_explainer(body, ex.maps(x[i:i + 1], alpha=0.35, region=region), f"request {i}")


BAD = [
    ("box outside the input", {"region": [0, 0, 17, 4]}, 422, "outside the model input's 16x16"),
    ("empty box", {"region": "9,9,3,3"}, 422, "empty or outside"),
    ("negative box", {"region": [-1, 0, 4, 4]}, 422, "outside"),
    ("fractional box", {"region": [0.5, 0, 4, 4]}, 422, "integers"),
    ("boolean box", {"region": [True, 0, 4, 4]}, 422, "integers"),
    ("mask of another size", {"region": np.ones((SIZE, SIZE + 1)).tolist()}, 422, "spatial size is [16, 16]"),
    ("mask for another batch", {"region": np.ones((3, SIZE, SIZE)).tolist()}, 422, "region has shape [3, 16, 16]"),
    ("NaN in the mask", {"region": b64(np.full((SIZE, SIZE), np.nan, np.float32))}, 422, "NaN"),
    ("ragged mask", {"region": [[1, 2], [3]]}, 422, "region"),
    ("mask of strings", {"region": [["a"] * SIZE] * SIZE}, 422, "region"),
    ("a number", {"region": 3}, 422, "box x0,y0,x1,y1 or a mask"),
    ("three numbers", {"region": "1,2,3"}, 400, "neither a box"),
    ("words", {"region": "everything"}, 400, "neither a box"),
    ("bad base64", {"region": {"b64": "%%%", "shape": [SIZE, SIZE]}}, 400, "base64"),
]


@pytest.mark.parametrize("name,extra,status,text", BAD, ids=[b[0] for b in BAD])
def test_bad_regions_are_4xx_with_a_message(server, name, extra, status, text):
    r = httpx.post(server.url + "/explain", json={"inputs": b64(seg_inputs(2)), **extra}, timeout=30)
    assert r.status_code == status, (name, r.status_code, r.text)
    body = r.json()
    assert text in body["error"] and "Traceback" not in body["error"], (name, body)
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_a_region_as_large_as_the_limits_allow(server):
    """A mask in JSON lists of the largest request (4 samples) is within the JSON value limit."""
    x = seg_inputs(4)
    r = httpx.post(server.url + "/explain", json={"inputs": x.tolist(), "region": np.ones((4, SIZE, SIZE)).tolist()},
                   timeout=30)
    assert r.status_code == 200, r.text
    r = httpx.post(server.url + "/explain", content=json.dumps({"inputs": b64(x[:1]), "region": [0] * 100_000}),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413, r.text


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    model = tmp_path_factory.mktemp("serve-cls") / "fixture.dc.onnx"
    dconnx.convert(str(FIXTURE), str(model), methods="splitgrad", layer=10)
    srv = Server(["serve", str(model), "--log-level", "warning"], tmp_path_factory.mktemp("serve-cls-log") / "s.log")
    yield srv
    srv.stop()


def test_region_on_a_classifier_is_422(classifier):
    r = httpx.post(classifier.url + "/explain", json={"inputs": b64(inputs(1)), "region": [0, 0, 4, 4]},
                   timeout=30)
    assert r.status_code == 422 and "not dense" in r.json()["error"], r.text
    assert "region" not in httpx.post(classifier.url + "/explain", json={"inputs": b64(inputs(1))},
                                      timeout=30).json()


def test_batcher_merges_regions():
    calls = []

    def run(x, target, alpha, region=None):
        calls.append(None if region is None else region.copy())
        r = np.ones((x.shape[0], 2, 2), np.float32) if region is None else region
        return {"s": (x.reshape(len(x), -1).sum(1)[:, None, None] * r).sum((1, 2))}

    async def main():
        b = MicroBatcher(run, max_batch=8, max_delay_s=0.05)
        await b.start()
        try:
            x = np.ones((1, 3), np.float32)
            return await asyncio.gather(b.submit(x, timeout=5),
                                        b.submit(x, region=np.array([[[1, 0], [0, 0]]], np.float32), timeout=5),
                                        b.submit(x, timeout=5))
        finally:
            await b.stop()
    res = asyncio.run(main())
    assert [float(r["s"][0]) for r in res] == [12.0, 3.0, 12.0]
    assert len(calls) == 1 and calls[0].shape == (3, 2, 2)      # one call: the others got every position
    alone = []
    asyncio.run(_one(MicroBatcher(lambda x, t, a: alone.append(1) or {"y": x}, max_delay_s=0)))
    assert alone == [1]     # a model without regions is called with three arguments


async def _one(b):
    await b.start()
    try:
        await b.submit(np.ones((1, 2), np.float32), timeout=5)
    finally:
        await b.stop()


def test_view_runs_serve_server_with_the_header_timeout(unet, tmp_path):
    """`dconnx view` runs the server `dconnx serve` runs: a client that does not finish its
    headers gets a JSON 408 and the connection closes after --header-timeout."""
    port = free_port()
    log = tmp_path / "view.log"
    code = ("import sys; from dconnx.serve import ServeConfig; from dconnx.serve.view import view; "
            f"view(sys.argv[1], '127.0.0.1', {port}, ServeConfig(header_timeout_s=1.0, log_level='warning'), "
            "open_browser=False)")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", code, str(unet)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            if f"127.0.0.1:{port}/" in log.read_text():
                break
            time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            t = time.perf_counter()
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")       # never the blank line
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
            took = time.perf_counter() - t
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert json.loads(reply.partition(b"\r\n\r\n")[2])["type"] == "HeaderTimeout"
        assert 0.9 <= took < 8
    finally:
        proc.terminate()
        proc.wait(15)


def test_region_fuzz_no_5xx(server):
    """Random JSON values as `region` (in the body, as a form field, as a query value): 200 or a
    4xx JSON error, never a 5xx."""
    pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-40, 40), st.floats(allow_nan=True),
                        st.text(max_size=12))
    values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=18),
                                                           st.dictionaries(st.sampled_from(["b64", "shape", "dtype"]),
                                                                           inner, max_size=3)),
                          max_leaves=40)
    x = b64(seg_inputs(1))
    with httpx.Client(base_url=server.url, timeout=30) as http:
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(region=values, how=st.sampled_from(["json", "form", "query"]))
        def check(region, how):
            if how == "json":
                r = http.post("/explain", content=json.dumps({"inputs": x, "region": region}),
                              headers={"content-type": "application/json"})
            else:
                text = region if isinstance(region, str) else json.dumps(region)
                png = io.BytesIO()
                from PIL import Image
                Image.new("RGB", (SIZE, SIZE), (90, 40, 200)).save(png, "PNG")
                if how == "form":
                    r = http.post("/explain", files={"image": ("a.png", png.getvalue(), "image/png")},
                                  data={"region": text})
                else:
                    r = http.post("/explain", params={"region": text}, content=png.getvalue(),
                                  headers={"content-type": "image/png"})
            assert r.status_code < 500, (region, how, r.status_code, r.text[:300])
            if r.status_code >= 400:
                assert isinstance(r.json().get("error"), str), r.text[:300]
        check()
    assert httpx.get(server.url + "/healthz").status_code == 200
