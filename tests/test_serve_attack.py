"""`dconnx serve` against hostile clients, on 127.0.0.1 only: malformed requests get a 4xx JSON
error (never a 500), memory per request is bounded before parsing, slow clients are timed out,
and a hypothesis request fuzzer finds no 5xx. Also `convert`'s node limit and the removal of
temporaries a killed writer left behind.

Every loop is bounded in count and time; each server is stopped when its fixture ends.
"""
import base64
import io
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import dconnx
from dconnx.errors import InvalidModelError
from dconnx.serve import codec

for _mod in ("fastapi", "uvicorn", "httpx", "multipart", "hypothesis"):
    pytest.importorskip(_mod)
import httpx  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from test_serve import FIXTURE, METHODS, Server, b64, inputs  # noqa: E402

SAMPLES = 8                      # --max-request-samples of the server below
HEADER_TIMEOUT = 1.5
BODY_TIMEOUT = 2.0
MAX_CONNECTIONS = 6
MAX_DECODING = 2
INPUT = (3, 64, 64)              # the fixture's input


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("attack") / "fixture.dc.onnx"
    dconnx.convert(str(FIXTURE), str(out), methods=",".join(METHODS), layer=10)
    return out


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    srv = Server(["serve", str(model), "--max-batch", "16", "--max-request-samples", str(SAMPLES),
                  "--max-connections", str(MAX_CONNECTIONS), "--max-decoding", str(MAX_DECODING),
                  "--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT),
                  "--log-level", "warning"],
                 tmp_path_factory.mktemp("attack-log") / "serve.log")
    yield srv
    srv.stop()


def rss(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


def assert_json_error(r, status=None, name=""):
    assert r.status_code < 500, f"{name}: {r.status_code} {r.text[:300]}"
    if status is not None:
        assert r.status_code == status, f"{name}: {r.status_code} {r.text[:300]}"
    body = r.json()
    assert isinstance(body.get("error"), str) and isinstance(body.get("type"), str), f"{name}: {body}"
    assert "Traceback" not in body["error"]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (grayscale, 1 bit) and whose data is empty."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def post(url, route="/explain", **kw):
    with httpx.Client(base_url=url, timeout=60) as http:
        return http.post(route, **kw)


# ---------------------------------------------------------------- 1. malformed requests → 4xx JSON

def test_deep_nesting_is_400(server):
    depth = 100_000
    body = b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}"
    r = post(server.url, content=body, headers={"content-type": "application/json"})
    assert_json_error(r, 400, "nesting")
    assert str(codec.MAX_JSON_DEPTH) in r.json()["error"]


def test_huge_integer_literal_is_400(server):
    digits = sys.get_int_max_str_digits() + 1 if hasattr(sys, "get_int_max_str_digits") else 5000
    body = b'{"inputs": [' + b"7" * digits + b"]}"
    assert_json_error(post(server.url, content=body, headers={"content-type": "application/json"}), 400)


def test_shape_with_too_many_dims_is_422(server):
    dims = 65                                              # numpy's own limit is 64
    enc = {"b64": base64.b64encode(np.zeros(1, np.float32).tobytes()).decode(), "shape": [1] * dims}
    r = post(server.url, json={"inputs": enc})
    assert_json_error(r, 422, "shape")
    assert "dimensions" in r.json()["error"]


def test_multipart_errors_are_400(server):
    png = png_header_only(8, 8)
    cases = {
        "no boundary": dict(content=b"--x\r\n\r\n", headers={"content-type": "multipart/form-data"}),
        "garbage": dict(content=b"\x00garbage" * 50, headers={"content-type": "multipart/form-data; boundary=zz"}),
        "too many files": dict(files=[("image", (f"{i}.png", png, "image/png")) for i in range(SAMPLES + 1)]),
    }
    for name, kw in cases.items():
        assert_json_error(post(server.url, **kw), 400, name)


def test_image_bombs_are_refused_from_the_header(server, model):
    from PIL import Image
    pixels = Image.MAX_IMAGE_PIXELS * 2 + 1                # Pillow's DecompressionBombError threshold
    side = int(np.ceil(np.sqrt(pixels)))
    r = post(server.url, content=png_header_only(side, side), headers={"content-type": "image/png"})
    assert_json_error(r, 413, "decompression bomb")
    # small file, large picture: under Pillow's limit and the old global 40 M pixels, over this model's
    limit = codec.Limits(int(np.prod(INPUT)), SAMPLES).max_image_bytes
    side = int(np.sqrt(limit / 3)) + 64
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    assert len(buf.getvalue()) < limit / 1000
    r = post(server.url, content=buf.getvalue(), headers={"content-type": "image/png"})
    assert_json_error(r, 413, "large picture")
    assert f"{side}x{side}" in r.json()["error"]


def test_boolean_target_is_refused(server):
    for target in (True, [True, 0]):
        r = post(server.url, json={"inputs": b64(inputs(1)), "target": target})
        assert_json_error(r, 422, f"target={target}")


def _raw(port: int, data: bytes, wait: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                head, sep, body = out.partition(b"\r\n\r\n")
                length = [int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                          if line.startswith(b"content-length:")]
                if sep and length and len(body) >= length[0]:
                    break
        except socket.timeout:
            pass
    return out


def test_protocol_errors_are_json(server):
    reply = _raw(server.port, b"POST /explain HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), reply[:200]
    assert json.loads(body)["type"] == "ProtocolError"


# ---------------------------------------------------------------- 2./3. bounded memory, concurrency, timeouts

def _healthz_latencies(url: str, stop: threading.Event, out: list) -> None:
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.is_set():
            t = time.perf_counter()
            assert http.get("/healthz").status_code == 200
            out.append(time.perf_counter() - t)
            time.sleep(0.02)


def test_junk_bodies_cost_bounded_memory_and_healthz_stays_fast(server):
    junk = b'{"inputs": [1], "junk": [' + b"[]," * (((16 << 20) - 64) // 3) + b"[]]}"
    assert len(junk) <= 16 << 20
    before = rss(server.proc.pid)
    stop, lat = threading.Event(), []
    probe = threading.Thread(target=_healthz_latencies, args=(server.url, stop, lat))
    probe.start()
    results = []

    def attack():
        results.append(post(server.url, content=junk, headers={"content-type": "application/json"}))
    n_attackers = MAX_CONNECTIONS - 2                  # the probe and one spare connection stay served
    attackers = [threading.Thread(target=attack) for _ in range(n_attackers)]
    for t in attackers:
        t.start()
    for t in attackers:
        t.join(120)
    stop.set()
    probe.join(30)
    for r in results:
        assert_json_error(r, 413, "junk")
    assert len(results) == n_attackers
    grown = rss(server.proc.pid) - before
    # the raw bodies (16 MiB each, at most --max-connections at once) and no parse at all
    assert grown < MAX_CONNECTIONS * len(junk) * 2, grown
    assert statistics.median(lat) < 0.1, sorted(lat)[-5:]


def test_slow_headers_cannot_hold_the_connections(server):
    """More than --max-connections clients sending headers a byte at a time: /healthz and
    requests stay served and fast, and the slow ones are closed after --header-timeout."""
    stop = threading.Event()
    closed = []

    def trickle():
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            try:
                for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000:
                    if stop.is_set():
                        return
                    s.sendall(bytes([byte]))
                    time.sleep(0.1)
            except OSError:
                closed.append(True)
    slow = [threading.Thread(target=trickle) for _ in range(MAX_CONNECTIONS + 1)]
    for t in slow:
        t.start()
    time.sleep(0.5)
    lat = []
    with httpx.Client(base_url=server.url, timeout=10) as http:
        while len(lat) < 20:
            t = time.perf_counter()
            assert http.get("/healthz").status_code == 200
            lat.append(time.perf_counter() - t)
            time.sleep(0.02)
        assert http.post("/predict", json={"inputs": b64(inputs(1))}).status_code == 200
        time.sleep(HEADER_TIMEOUT + 1.0)
    stop.set()
    for t in slow:
        t.join(30)
    assert statistics.median(lat) < 0.1, sorted(lat)[-5:]
    assert len(closed) == MAX_CONNECTIONS + 1       # every slow client was cut off by the timeout


def test_slow_body_gets_408(server):
    t = time.perf_counter()
    reply = _raw(server.port, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"inputs\"", wait=BODY_TIMEOUT + 10)
    took = time.perf_counter() - t
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["type"] == "BodyTimeout"
    assert BODY_TIMEOUT <= took < BODY_TIMEOUT + 8


# ---------------------------------------------------------------- 5. the request fuzzer

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30),
                     st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
_json = st.recursive(_scalars, lambda kids: st.one_of(st.lists(kids, max_size=5),
                                                      st.dictionaries(st.text(max_size=8), kids, max_size=5)),
                     max_leaves=30)
_keys = st.sampled_from(["inputs", "images", "target", "alpha", "methods", "format", "junk"])
_shape = st.lists(st.integers(-2, 70), max_size=70)
_encoded = st.fixed_dictionaries({"b64": st.one_of(st.just(b64(inputs(1))["b64"]), st.text(max_size=30)),
                                  "shape": st.one_of(_shape, _json)},
                                 optional={"dtype": st.sampled_from(["float32", "float64", "float16", "int8", "x"])})
_body = st.dictionaries(_keys, st.one_of(_json, _encoded, _shape), max_size=4)


def _image_bytes(kind: int, w: int, h: int) -> bytes:
    if kind == 0:
        return png_header_only(w, h)
    if kind == 1:
        return b"\x89PNG\r\n\x1a\n" + os.urandom(min(w, 200))
    if kind == 2:
        return b"\xff\xd8\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + os.urandom(40)
    return b"GIF89a" + struct.pack("<HH", w, h) + os.urandom(20)


_request = st.one_of(
    st.tuples(st.just("json"), _body),
    st.tuples(st.just("raw"), st.binary(max_size=200)),
    st.tuples(st.just("deep"), st.integers(1, 2000)),
    st.tuples(st.just("number"), st.integers(1, 6000)),
    st.tuples(st.just("image"), st.integers(0, 3), st.integers(0, 70_000), st.integers(0, 70_000)),
    st.tuples(st.just("multipart"), st.integers(0, 12), st.binary(max_size=60)),
    st.tuples(st.just("ctype"), st.sampled_from(["text/plain", "application/json; charset=x", "multipart/mixed",
                                                  "image/", "", "application/x-www-form-urlencoded"]),
              st.binary(max_size=60)),
)


def _send(http, req):
    kind = req[0]
    route = "/explain"
    if kind == "json":
        return http.post(route, content=json.dumps(req[1]).encode(), headers={"content-type": "application/json"})
    if kind == "raw":
        return http.post(route, content=req[1], headers={"content-type": "application/json"})
    if kind == "deep":
        return http.post(route, content=b'{"inputs": ' + b"[" * req[1] + b"]" * req[1] + b"}",
                         headers={"content-type": "application/json"})
    if kind == "number":
        return http.post(route, content=b'{"inputs": [' + b"9" * req[1] + b"]}",
                         headers={"content-type": "application/json"})
    if kind == "image":
        return http.post(route, content=_image_bytes(*req[1:]), headers={"content-type": "image/png"})
    if kind == "multipart":
        files = [("image", (f"{i}.png", req[2], "image/png")) for i in range(req[1])]
        return http.post(route, files=files, data={"target": "1"}) if files else \
            http.post(route, content=req[2], headers={"content-type": "multipart/form-data; boundary=b"})
    return http.post(route, content=req[2], headers={"content-type": req[1]})


FUZZ_EXAMPLES = int(os.environ.get("DCONNX_SERVE_FUZZ_EXAMPLES", "250"))


def test_request_fuzzer_no_5xx_and_bounded_rss(server):
    pid = server.proc.pid
    before = rss(pid)
    statuses = []
    with httpx.Client(base_url=server.url, timeout=60) as http:
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(_request)
        def fuzz(req):
            r = _send(http, req)
            statuses.append(r.status_code)
            assert r.status_code < 500, f"{req!r:.300}: {r.status_code} {r.text[:300]}"
            if r.status_code >= 400:
                assert_json_error(r)
        fuzz()
        assert http.get("/healthz").status_code == 200
    assert len(statuses) >= FUZZ_EXAMPLES and not [s for s in statuses if s >= 500]
    limits = codec.Limits(int(np.prod(INPUT)), SAMPLES)
    per_request = 2 * (16 << 20) + limits.max_image_bytes + 64 * limits.max_values
    grown = rss(pid) - before
    assert grown < MAX_DECODING * per_request, grown


# ---------------------------------------------------------------- 4. convert: node limit, stale temporaries

def relu_chain(n: int) -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"]) for i in range(n)]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info(f"t{n}", TensorProto.FLOAT, [1, 4])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_convert_refuses_more_nodes_than_the_limit(tmp_path):
    from dconnx.io import max_nodes
    path = tmp_path / "chain.onnx"
    onnx.save(relu_chain(max_nodes() + 1), path)
    t = time.perf_counter()
    with pytest.raises(InvalidModelError, match="nodes"):
        dconnx.convert(str(path), str(tmp_path / "out.onnx"))
    assert time.perf_counter() - t < 30
    proc = subprocess.run([sys.executable, "-m", "dconnx", "convert", str(path), "-o", str(tmp_path / "o.onnx")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "nodes" in proc.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_killed_writer_temporaries_are_removed(tmp_path):
    from dconnx.io import STALE_TEMP_S, save_model
    out = tmp_path / "m.dc.onnx"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f".{out.name}.{dead.pid}.abcd_123"          # a killed writer's staging folder
    left.mkdir()
    (left / out.name).write_bytes(b"\0" * 1000)
    old = tmp_path / f".{out.name}.q1w2e3r4"                      # the same, named without an owner id
    old.mkdir()
    (old / out.name).write_bytes(b"\0" * 1000)
    os.utime(old, (time.time() - 2 * STALE_TEMP_S,) * 2)
    mine = tmp_path / f".{out.name}.backup12"                     # not ours: kept
    mine.write_text("keep")
    os.utime(mine, (time.time() - 2 * STALE_TEMP_S,) * 2)
    save_model(relu_chain(2), out)
    assert out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, mine.name])


def test_killed_convert_leaves_nothing_the_next_run_keeps(tmp_path):
    """A convert killed while writing leaves its staging folder; the next run removes it."""
    out = tmp_path / "fixture.dc.onnx"
    script = ("import os, dconnx, dconnx.io as io\n"
              "real = io.os.replace\n"
              "def boom(a, b):\n"
              "    os._exit(9)\n"
              "io.os.replace = boom\n"
              f"dconnx.convert({str(FIXTURE)!r}, {str(out)!r})\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert proc.returncode == 9
    hidden = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert hidden, "the killed run should have left its staging folder"
    dconnx.convert(str(FIXTURE), str(out))
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
