"""Load test of `dconnx serve` on 127.0.0.1: 8 clients, valid and hostile requests mixed.

Starts the server on the fixture model (converted here), runs CLIENTS threads for a bounded
number of requests each (every FRACTION-th one hostile: junk JSON near the body limit, deep
nesting, huge literals, image bombs, garbage multipart, slow headers), and reports the valid
requests' latency percentiles, the status counts (a 5xx is a failure) and the server's peak RSS
(VmHWM). Writes benchmarks/out/serve_load.json; `make bench` runs it.

    python benchmarks/serve_load.py [--clients 8] [--requests 60] [--hostile-every 3]
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "models" / "fixture_cnn.onnx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def hostile_requests(body_limit: int) -> list:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("1", (6300, 6300)).save(buf, format="PNG")
    junk = b'{"inputs": [1], "junk": [' + b"[]," * ((body_limit - 64) // 3) + b"[]]}"
    js = {"content-type": "application/json"}
    return [
        ("junk", dict(content=junk, headers=js)),
        ("deep", dict(content=b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", headers=js)),
        ("bigint", dict(content=b'{"inputs": [' + b"7" * 5000 + b"]}", headers=js)),
        ("bomb", dict(content=png_header_only(20_000, 20_000), headers={"content-type": "image/png"})),
        ("large-png", dict(content=buf.getvalue(), headers={"content-type": "image/png"})),
        ("multipart", dict(content=b"\x00garbage" * 100, headers={"content-type": "multipart/form-data"})),
        ("slow-headers", None),
    ]


def slow_headers(port: int, seconds: float) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=seconds + 5) as s:
            t = time.monotonic()
            for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000:
                if time.monotonic() - t > seconds:
                    return
                s.sendall(bytes([byte]))
                time.sleep(0.05)
    except OSError:
        pass


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=60, help="requests per client")
    ap.add_argument("--hostile-every", type=int, default=3, help="every Nth request is hostile")
    ap.add_argument("--samples", type=int, default=4, help="samples in one valid request")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "serve_load.json"))
    args = ap.parse_args(argv)
    import httpx
    import dconnx
    work = Path(tempfile.mkdtemp(prefix="dconnx-serve-load-"))
    model = work / "fixture.dc.onnx"
    dconnx.convert(str(FIXTURE), str(model), methods="splitgrad,splitcam,splitlrp", layer=10)
    port, body_limit = free_port(), 16 << 20
    log = open(work / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "dconnx", "serve", str(model), "--host", "127.0.0.1",
                             "--port", str(port), "--max-connections", str(4 * args.clients),
                             "--header-timeout", "2", "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"the server did not start:\n{(work / 'serve.log').read_text()}")
            time.sleep(0.2)
        rss_idle = proc_status(proc.pid, "VmRSS")
        hostile = hostile_requests(body_limit)
        x = np.random.default_rng(0).standard_normal((args.samples, 3, 64, 64)).astype(np.float32)
        valid = {"inputs": {"b64": base64.b64encode(x.tobytes()).decode(), "shape": list(x.shape)}}
        lat, statuses, lock = [], {}, threading.Lock()

        def client(k: int) -> None:
            with httpx.Client(base_url=url, timeout=120) as http:
                for i in range(args.requests):
                    if (i + k) % args.hostile_every == 0:
                        name, kw = hostile[(i // args.hostile_every + k) % len(hostile)]
                        if kw is None:
                            slow_headers(port, 3.0)
                            continue
                        r = http.post("/explain", **kw)
                        key = f"hostile {name} {r.status_code}"
                    else:
                        t = time.perf_counter()
                        r = http.post("/explain", json=valid)
                        with lock:
                            lat.append(time.perf_counter() - t)
                        key = f"valid {r.status_code}"
                    with lock:
                        statuses[key] = statuses.get(key, 0) + 1

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        peak = proc_status(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    ms = np.array(lat) * 1000
    res = {"clients": args.clients, "requests_per_client": args.requests, "hostile_every": args.hostile_every,
           "samples_per_valid_request": args.samples, "valid_requests": len(lat),
           "valid_p50_ms": float(np.percentile(ms, 50)), "valid_p99_ms": float(np.percentile(ms, 99)),
           "valid_max_ms": float(ms.max()), "statuses": dict(sorted(statuses.items())),
           "server_5xx": sum(v for k, v in statuses.items() if k.split()[-1].startswith("5")),
           "server_rss_idle_mb": rss_idle / 2**20, "server_peak_rss_mb": peak / 2**20, "wall_s": wall,
           "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, no GPU used (CPUExecutionProvider)"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    out = main()
    sys.exit(1 if out["server_5xx"] else 0)
