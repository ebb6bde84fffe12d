"""`dconnx serve` as a subprocess on 127.0.0.1, exercised with a real HTTP client (httpx).

Every request loop is bounded in count and time, traffic goes only to 127.0.0.1, and each server
is terminated (then killed if needed) when its fixture ends. The micro-batcher's queueing, grouping
and timeout logic is also tested in-process with a fake model.
"""
import asyncio
import base64
import io
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import dconnx
from dconnx.errors import InputError
from dconnx.runtime import Explainer
from dconnx.serve.batching import MicroBatcher, QueueFull

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "models" / "fixture_cnn.onnx"
METHODS = ["splitgrad", "splitcam", "splitlrp"]

for _mod in ("fastapi", "uvicorn", "httpx", "multipart", "prometheus_client"):
    pytest.importorskip(_mod, reason=f"the serve extra is not installed ({_mod}): pip install '.[test]'")
import httpx  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m dconnx ARGS --host 127.0.0.1 --port P` until stop(); logs go to a file."""

    def __init__(self, args, log_path: Path, cwd=None, startup_s: float = 90.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "dconnx", *args, "--host", "127.0.0.1",
                                      "--port", str(self.port)], stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=cwd)
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                pytest.fail(f"dconnx serve exited with {self.proc.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"dconnx serve did not come up in {startup_s} s:\n{log_path.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self._log.close()

    def log_records(self) -> list[dict]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "fixture.dc.onnx"
    dconnx.convert(str(FIXTURE), str(out), methods=",".join(METHODS), layer=10)
    return out


@pytest.fixture(scope="module")
def ex(model) -> Explainer:
    return Explainer(model, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    srv = Server(["serve", str(model), "--max-batch", "16", "--max-delay-ms", "3", "--max-request-samples", "8",
                  "--max-body-bytes", str(1 << 20), "--timeout", "30"],
                 tmp_path_factory.mktemp("serve-log") / "serve.log")
    yield srv
    srv.stop()


def b64(x: np.ndarray) -> dict:
    return {"b64": base64.b64encode(np.ascontiguousarray(x, np.float32).tobytes()).decode(),
            "shape": list(x.shape), "dtype": "float32"}


def unpack(enc: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(enc["b64"]), dtype=enc["dtype"]).reshape(enc["shape"])


def close(a, b) -> bool:
    """Equal up to float32 reordering (a batch of 8 and a batch of 1 differ in the last bits)."""
    return a.shape == b.shape and np.allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(b).max())))


def inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 64, 64)).astype(np.float32)


def png_bytes(seed: int = 0, size=(80, 96)) -> bytes:
    from PIL import Image
    rgb = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- the server, end to end

def test_healthz_and_model(server):
    r = httpx.get(server.url + "/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    info = httpx.get(server.url + "/model").json()
    assert info["methods"] == METHODS and info["n_classes"] == 4 and info["input_shape"][1:] == [3, 64, 64]
    assert info["limits"]["max_request_samples"] == 8


def test_explain_equals_explainer(server, ex):
    x = inputs(3, seed=1)
    ref = ex(x, target=[1, -1, 3], alpha=0.25)
    r = httpx.post(server.url + "/explain", json={"inputs": b64(x), "target": [1, -1, 3], "alpha": 0.25},
                   timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["n"] == 3 and body["alpha"] == 0.25
    assert body["target"] == [1, int(ref["logits"][1].argmax()), 3]
    assert set(body["maps"]) == set(METHODS)
    for m in METHODS:
        assert close(unpack(body["maps"][m]), ref[m]), m
    assert close(np.asarray(body["logits"], np.float32), ref["logits"])
    # nested lists, a method subset, the model's default alpha and argmax target
    r = httpx.post(server.url + "/explain", json={"inputs": x[:1].tolist(), "methods": ["splitcam"]}, timeout=30)
    assert r.status_code == 200, r.text
    assert list(r.json()["maps"]) == ["splitcam"] and r.json()["alpha"] == pytest.approx(0.35)
    assert close(unpack(r.json()["maps"]["splitcam"]), ex.maps(x[:1])["splitcam"])


def test_predict_equals_explainer(server, ex):
    x = inputs(2, seed=2)
    r = httpx.post(server.url + "/predict", json={"inputs": b64(x)}, timeout=30)
    assert r.status_code == 200, r.text
    logits = ex(x)["logits"]
    assert close(np.asarray(r.json()["outputs"]["logits"], np.float32), logits)
    assert r.json()["argmax"] == logits.argmax(-1).tolist()


def test_image_uploads_equal_explainer(server, ex):
    from dconnx.images import ImageInput
    png = png_bytes(3)
    x, _ = ImageInput.from_explainer(ex).load(png)
    ref = ex.maps(x[None], target=2)
    raw = httpx.post(server.url + "/explain?target=2", content=png, headers={"content-type": "image/png"},
                     timeout=30)
    multi = httpx.post(server.url + "/explain", files=[("image", ("a.png", png, "image/png")),
                                                         ("image", ("b.png", png, "image/png"))],
                       data={"target": "2", "methods": "splitgrad,splitlrp"}, timeout=30)
    inline = httpx.post(server.url + "/explain", json={"images": [base64.b64encode(png).decode()], "target": 2},
                        timeout=30)
    for r in (raw, multi, inline):
        assert r.status_code == 200, r.text
    for m in METHODS:
        assert close(unpack(raw.json()["maps"][m]), ref[m])
        assert close(unpack(inline.json()["maps"][m]), ref[m])
    assert list(multi.json()["maps"]) == ["splitgrad", "splitlrp"] and multi.json()["n"] == 2
    assert close(unpack(multi.json()["maps"]["splitgrad"])[1], ref["splitgrad"][0])


def test_png_overlays(server):
    from PIL import Image
    r = httpx.post(server.url + "/explain?format=png", content=png_bytes(4), headers={"content-type": "image/png"},
                   timeout=30)
    assert r.status_code == 200, r.text
    assert "maps" not in r.json() and set(r.json()["overlays"]) == set(METHODS)
    im = Image.open(io.BytesIO(base64.b64decode(r.json()["overlays"]["splitcam"][0])))
    assert im.format == "PNG" and im.size == (64, 64) and im.mode == "RGB"
    r = httpx.post(server.url + "/explain", json={"inputs": b64(inputs(2)), "format": "both"}, timeout=30)
    assert r.status_code == 200 and len(r.json()["overlays"]["splitgrad"]) == 2 and "maps" in r.json()


def test_concurrent_clients(server, ex):
    """8 clients × 200 requests each, every answer checked against the Explainer; 0 errors."""
    pool = inputs(16, seed=7)
    ref = ex(pool)     # per-sample results do not depend on the batch they run in (up to rounding)
    encoded = [b64(pool[i:i + 1]) for i in range(16)]
    errors: list[str] = []
    lock = threading.Lock()

    def client(c: int) -> int:
        done = 0
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for k in range(200):
                i = (c * 200 + k) % 16
                try:
                    if k % 4 == 3:
                        r = http.post("/predict", json={"inputs": encoded[i]})
                        ok = r.status_code == 200 and close(np.asarray(r.json()["outputs"]["logits"], np.float32),
                                                            ref["logits"][i:i + 1])
                    else:
                        m = METHODS[k % 3]
                        r = http.post("/explain", json={"inputs": encoded[i], "methods": [m]})
                        ok = r.status_code == 200 and close(unpack(r.json()["maps"][m]), ref[m][i:i + 1])
                    if not ok:
                        raise AssertionError(f"{r.status_code} {r.text[:300]}")
                    done += 1
                except Exception as e:   # noqa: BLE001 - counted, reported below
                    with lock:
                        errors.append(f"client {c} request {k}: {e}")
        return done

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool_:
        done = sum(pool_.map(client, range(8)))
    seconds = time.perf_counter() - t0
    assert not errors, f"{len(errors)} errors, first: {errors[:3]}"
    assert done == 1600
    metrics = _metrics(server)
    batches = metrics["dconnx_batch_size"]
    assert batches["count"] < 1600, "concurrent requests were never merged into one batch"
    assert batches["sum"] >= 1600
    print(f"1600 requests in {seconds:.1f} s; {batches['count']:.0f} onnxruntime calls")


def test_errors_are_json_4xx_and_server_stays_healthy(server):
    url = server.url
    good = {"inputs": b64(inputs(1))}
    cases = [
        ("malformed image body", dict(content=b"\x89PNG not really", headers={"content-type": "image/png"}), 400),
        ("malformed multipart image", dict(files=[("image", ("x.png", b"garbage", "image/png"))]), 400),
        ("malformed base64 image", dict(json={"images": ["***"]}), 400),
        ("malformed JSON", dict(content=b'{"inputs": [1, 2', headers={"content-type": "application/json"}), 400),
        ("malformed array base64", dict(json={"inputs": {"b64": "@@", "shape": [1, 3, 64, 64]}}), 400),
        ("wrong shape", dict(json={"inputs": b64(np.zeros((1, 3, 32, 32), np.float32))}), 422),
        ("wrong rank", dict(json={"inputs": [1.0, 2.0]}), 422),
        ("bytes do not match shape", dict(json={"inputs": {"b64": b64(inputs(1))["b64"], "shape": [2, 3, 64, 64]}}),
         422),
        ("NaN input", dict(json={"inputs": b64(np.full((1, 3, 64, 64), np.nan, np.float32))}), 422),
        ("unknown method", dict(json={**good, "methods": ["gradcam"]}), 422),
        ("target out of range", dict(json={**good, "target": 9}), 422),
        ("alpha out of range", dict(json={**good, "alpha": 0.9}), 422),
        ("too many samples", dict(json={"inputs": b64(inputs(9))}), 422),
        ("no inputs", dict(json={"alpha": 0.3}), 422),
        ("unknown format", dict(json={**good, "format": "jpeg"}), 422),
        ("oversize body", dict(content=b"0" * ((1 << 20) + 1), headers={"content-type": "application/json"}), 413),
        ("unsupported media type", dict(content=b"hello", headers={"content-type": "text/plain"}), 415),
    ]
    with httpx.Client(base_url=url, timeout=30) as http:
        for name, kwargs, status in cases:
            r = http.post("/explain", **kwargs)
            assert r.status_code == status, f"{name}: {r.status_code} {r.text[:300]}"
            body = r.json()
            assert isinstance(body.get("error"), str) and len(body["error"]) > 10, f"{name}: {body}"
            assert "Traceback" not in body["error"], name
            assert r.headers.get("x-request-id"), name
        assert "gradcam" in http.post("/explain", json={**good, "methods": ["gradcam"]}).json()["error"]
        r = http.get("/nope")
        assert r.status_code == 404 and "error" in r.json()
        r = http.get("/explain")
        assert r.status_code == 405 and "error" in r.json()
        assert http.get("/healthz").json()["status"] == "ok"
        assert http.post("/explain", json=good).status_code == 200
    assert server.proc.poll() is None


def _metrics(server) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        entry = out.setdefault(fam.name, {"type": fam.type, "samples": fam.samples})
        for s in fam.samples:
            if s.name.endswith("_count"):
                entry["count"] = entry.get("count", 0) + s.value
            if s.name.endswith("_sum"):
                entry["sum"] = entry.get("sum", 0) + s.value
    return out


def test_metrics_prometheus_text(server):
    httpx.post(server.url + "/explain", json={"inputs": b64(inputs(1))}, timeout=30)
    httpx.post(server.url + "/explain", json={"inputs": [0]}, timeout=30)
    m = _metrics(server)
    assert m["dconnx_requests"]["type"] == "counter"
    labels = {(s.labels["route"], s.labels["status"]) for s in m["dconnx_requests"]["samples"]}
    assert ("/explain", "200") in labels and ("/explain", "422") in labels
    assert m["dconnx_request_duration_seconds"]["type"] == "histogram"
    assert m["dconnx_batch_size"]["type"] == "histogram" and m["dconnx_batch_size"]["count"] >= 1
    assert m["dconnx_queue_depth"]["type"] == "gauge"


def test_structured_logs(server):
    httpx.post(server.url + "/predict", json={"inputs": b64(inputs(1))}, headers={"x-request-id": "abc-123"},
               timeout=30)
    for _ in range(50):       # the log line is written after the response is sent
        recs = [r for r in server.log_records() if r.get("request_id") == "abc-123"]
        if recs:
            break
        time.sleep(0.1)
    assert recs and recs[0]["path"] == "/predict" and recs[0]["status"] == 200 and recs[0]["ms"] > 0
    assert any(r.get("msg") == "ready" for r in server.log_records())


def test_timeout_is_504_and_server_survives(model, tmp_path):
    srv = Server(["serve", str(model), "--timeout", "0.0005", "--max-delay-ms", "20"], tmp_path / "serve.log")
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            r = http.post("/explain", json={"inputs": b64(inputs(4))})
            assert r.status_code == 504 and "longer than" in r.json()["error"]
            assert http.get("/healthz").json()["status"] == "ok"
    finally:
        srv.stop()


def test_readme_serving_example(tmp_path):
    """The README's `dconnx serve` console example, started as written (on a free port), and its curl."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```console\n(.*?)```", readme, flags=re.S)
    lines = [ln[2:].strip() for b in blocks for ln in b.replace("\\\n", " ").splitlines() if ln.startswith("$ ")]
    serve_cmd = next(ln for ln in lines if ln.startswith("dconnx serve "))
    curls = [ln for ln in lines if ln.startswith("curl ")]
    for name in ("models", "docs"):
        (tmp_path / name).symlink_to(ROOT / name)
    dconnx.convert(str(FIXTURE), str(tmp_path / "fixture.dc.onnx"), methods="splitgrad,splitcam,splitlrp",
                   layer=10)
    args = shlex.split(serve_cmd)[1:]
    port_at = args.index("--port")
    documented = args[port_at + 1]
    del args[port_at:port_at + 2]
    srv = Server(args, tmp_path / "serve.log", cwd=tmp_path)
    try:
        assert curls, "the README shows no curl example"
        if shutil.which("curl") is None:
            pytest.skip("curl is not installed")
        for cmd in curls:
            cmd = cmd.replace(f"localhost:{documented}", f"127.0.0.1:{srv.port}")
            proc = subprocess.run(cmd, shell=True, cwd=tmp_path, capture_output=True, timeout=60)
            assert proc.returncode == 0, proc.stderr
            out = proc.stdout.decode()
            assert out and "error" not in out[:200], f"{cmd}\n{out[:500]}"
    finally:
        srv.stop()


def test_core_import_needs_no_serving_stack():
    code = ("import sys, argparse, dconnx, dconnx.serve, dconnx.serve.triton, dconnx.dataset, dconnx.serve.cli; "
            "dconnx.serve.cli.add_deploy_parsers(argparse.ArgumentParser().add_subparsers()); "
            "bad = [m for m in ('fastapi', 'uvicorn', 'starlette', 'prometheus_client', 'ray', 'quantus', 'torch') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------- the micro-batcher, in-process

def _fake_run(calls):
    def run(x, target, alpha):
        calls.append((x.shape[0], None if target is None else target.tolist(), alpha))
        time.sleep(0.01)
        if np.any(x < 0):
            raise InputError("negative input")
        return {"y": x.sum(axis=(1, 2)) + (alpha or 0), "t": target if target is not None else np.zeros(len(x))}
    return run


def _rows(values, n_each=1):
    return np.asarray(values, np.float32).reshape(-1, 1, 1) * np.ones((1, n_each, 1), np.float32)


def test_batcher_merges_groups_and_scatters():
    async def main():
        calls = []
        b = MicroBatcher(_fake_run(calls), max_batch=8, max_delay_s=0.05)
        await b.start()
        try:
            jobs = [b.submit(_rows([i]), target=None if i % 2 else np.array([i], np.int64),
                             alpha=0.1 if i < 4 else 0.2, timeout=5) for i in range(6)]
            res = await asyncio.gather(*jobs)
        finally:
            await b.stop()
        return calls, res
    calls, res = asyncio.run(main())
    assert [r["y"][0] for r in res] == pytest.approx([0.1, 1.1, 2.1, 3.1, 4.2, 5.2])
    assert [int(r["t"][0]) for r in res] == [0, -1, 2, -1, 4, -1]
    assert sorted((n, a) for n, _, a in calls) == [(2, 0.2), (4, 0.1)]     # one call per alpha


def test_batcher_respects_max_batch_and_isolates_failures():
    async def main():
        calls = []
        b = MicroBatcher(_fake_run(calls), max_batch=4, max_delay_s=0.05)
        await b.start()
        try:
            ok = [b.submit(_rows([i, i]), timeout=5) for i in range(1, 6)]         # 5 requests of 2 samples
            bad = b.submit(_rows([-1]), timeout=5)
            res = await asyncio.gather(*ok, bad, return_exceptions=True)
        finally:
            await b.stop()
        return calls, res
    calls, res = asyncio.run(main())
    assert all(n <= 4 for n, _, _ in calls)
    assert isinstance(res[-1], InputError)
    assert [float(r["y"][1]) for r in res[:-1]] == [1, 2, 3, 4, 5]


def test_batcher_timeout_and_queue_limit():
    release = threading.Event()
    calls = []

    def blocking_run(x, target, alpha):
        calls.append(x.shape[0])
        release.wait(10)
        return {"y": x.sum(axis=(1, 2))}

    async def main():
        b = MicroBatcher(blocking_run, max_batch=1, max_delay_s=0.0, max_queue=1)
        await b.start()
        try:
            first = asyncio.ensure_future(b.submit(_rows([1]), timeout=10))
            for _ in range(200):             # until the first request is inside the model
                if calls:
                    break
                await asyncio.sleep(0.01)
            waiting = asyncio.ensure_future(b.submit(_rows([2]), timeout=0.05))
            await asyncio.sleep(0)
            with pytest.raises(QueueFull):
                await b.submit(_rows([3]), timeout=10)
            with pytest.raises(asyncio.TimeoutError):
                await waiting
            release.set()
            assert (await first)["y"][0] == 1
            await asyncio.sleep(0.05)
        finally:
            release.set()
            await b.stop()

    asyncio.run(main())
    assert calls == [1]      # the timed-out request was never run


def test_overlay_colormap_follows_the_method():
    """The server colours a map by its method, as `dconnx explain` does: a positive-only SplitGrad
    map still gets the diverging map centred at 0, not the sequential one its sign would pick."""
    from dconnx.serve.app import _overlay
    from dconnx.viz import MapStyle, overlay
    rng = np.random.default_rng(3)
    picture = rng.uniform(size=(16, 16, 3))
    heat = rng.uniform(0.1, 1.0, size=(16, 16))
    by_method = overlay(picture, heat, style=MapStyle.of("splitgrad", heat, warn=False))
    by_sign = overlay(picture, heat)
    assert not np.array_equal(by_method, by_sign)
    assert np.array_equal(_overlay(picture, heat, "splitgrad"), by_method)
    assert np.array_equal(_overlay(picture, -heat, "splitcam"),
                          overlay(picture, -heat, style=MapStyle.of("splitcam", -heat, warn=False)))
