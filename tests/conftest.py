import os
import sys
import time

_T0 = time.perf_counter()     # the session's wall time, printed beside the peak RSS

# Every conversion the tests make checks every pass's postcondition (passes/__init__.py); the
# variable reaches the CLI runs in subprocesses too.
os.environ.setdefault("DCONNX_DEBUG", "1")

# pytest-xdist workers share the machine's cores: each runs torch and onnxruntime on its share
# (cores // workers, at least 1) instead of one thread per core each, whose spinning threads
# would take the cores from the other workers. DCONNX_TEST_THREADS=<n> overrides the share.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
THREADS = int(os.environ.get("DCONNX_TEST_THREADS") or max(1, (os.cpu_count() or 1) // _WORKERS))
os.environ.setdefault("DCONNX_THREADS", str(THREADS))       # the sessions dconnx creates
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))      # torch and the CLI's subprocesses

# The torchvision workaround must run before any test module imports zennit or torchvision.
sys.path.insert(0, os.path.dirname(__file__))
import torchvision_ops  # noqa: E402,F401

import pathlib  # noqa: E402

import pytest  # noqa: E402

import peak_rss  # noqa: E402


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory) -> pathlib.Path:
    """Directory caching zoo exports for the session.

    Set DCONNX_ZOO_CACHE to a directory to reuse exports across test runs
    (entries are keyed by model name, exporter and seed).
    """
    env = os.environ.get("DCONNX_ZOO_CACHE")
    if env:
        path = pathlib.Path(env).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path
    # one directory for the whole run: pytest-xdist workers' base directories share a parent,
    # and zoo.exported lets one process export each entry while the others wait for it
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "zoo-shared"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def zoo_model(zoo_dir):
    """zoo_model(name, exporter, seed=0) -> path of the cached ONNX export (see tests/zoo.py)."""
    import zoo

    def get(name: str, exporter: str = "torchscript", seed: int = 0) -> pathlib.Path:
        return zoo.exported(name, exporter, zoo_dir, seed=seed)

    return get


@pytest.fixture(scope="session")
def vgg16_small_onnx() -> bytes:
    """VGG16's features at 32x32 (tests/zoo.py VGG16Small, seed 0) exported once per session
    (TorchScript exporter, dynamic batch): VGG16's conv structure at a fraction of its weights."""
    import io
    import warnings

    import torch

    import zoo
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(zoo.build_vgg16_small(32), (torch.zeros(1, 3, 32, 32),), buf, dynamo=False,
                          opset_version=zoo.TORCHSCRIPT_OPSET, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    return buf.getvalue()


# The test files that take longest (measured with --durations, 2 workers): run first, so that
# pytest-xdist's file-by-file scheduling does not leave one of them for the end on one worker
# while the other worker idles.
LONGEST_FIRST = ("test_e2e.py", "test_reference_match.py", "test_zoo.py", "test_zoo_gated.py",
                 "test_fuzz.py", "test_segmentation_zoo.py", "test_reference_selfcheck.py",
                 "test_cuda_coverage.py", "test_baselines.py", "test_zoo_baselines.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))    # stable: in-file order kept


def pytest_collection_finish(session):
    """Every test module is imported now: move what they loaded (torch, zennit, ...) out of the
    garbage collector's reach, so that the collection after each test (peak_rss) scans only what
    the tests made (a full collection takes 0.2 s otherwise)."""
    import gc
    gc.collect()
    gc.freeze()


def pytest_configure(config):
    try:
        peak_rss.limit_gb(os.environ)      # a malformed DCONNX_TEST_RSS_LIMIT_GB stops the run at once
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None


_PEAKS = peak_rss.PeakTracker()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Record how much each test raised the process's peak RSS (reported in the summary); after
    a test of a second or more (the big ones) collect all garbage, after a short one the young
    generations only."""
    before = peak_rss.peaks_kib()[0]
    t0 = time.perf_counter()
    yield
    _PEAKS.record(item.nodeid, before, peak_rss.peaks_kib()[0])
    peak_rss.release_freed_memory(full=time.perf_counter() - t0 >= 1.0)


_WORKER_PEAKS: dict = {}     # pytest-xdist: worker id -> (peak KiB, the tests that raised it most)


def pytest_testnodedown(node, error):
    """pytest-xdist (controller): a worker's peak RSS, sent by its own pytest_sessionfinish."""
    out = getattr(node, "workeroutput", {}) or {}
    if "dconnx_peak_kib" in out:
        worker = getattr(node, "workerinput", {}).get("workerid", f"gw{len(_WORKER_PEAKS)}")
        _WORKER_PEAKS[worker] = (out["dconnx_peak_kib"], out["dconnx_top"])


def pytest_sessionfinish(session, exitstatus):
    """Fail the session when a pytest process's peak RSS exceeds the limit.

    The limit is 6 GB per process (tests/peak_rss.py); DCONNX_TEST_RSS_LIMIT_GB=<GB> overrides
    it. Under pytest-xdist each worker is such a process: it sends its peak to the controller,
    which checks every worker's and prints them with their sum (the machine's share). The
    peaks are read here, once, and printed by pytest_terminal_summary.
    """
    self_kib, child_kib = peak_rss.peaks_kib()
    workerout = getattr(session.config, "workeroutput", None)
    if workerout is not None:            # an xdist worker: report to the controller
        workerout["dconnx_peak_kib"] = self_kib
        workerout["dconnx_top"] = _PEAKS.top()
        return
    limit = peak_rss.limit_gb(os.environ)
    message = peak_rss.over_limit(self_kib, limit)
    line = peak_rss.summary(self_kib, child_kib)
    if _WORKER_PEAKS:
        peaks = {w: kib for w, (kib, _) in _WORKER_PEAKS.items()}
        worst = max(peaks, key=peaks.get)
        message = message or peak_rss.over_limit(peaks[worst], limit)
        line = (f"peak RSS per worker: " + ", ".join(f"{w} {peak_rss.kib_to_gb(k):.1f} GB"
                                                    for w, k in sorted(peaks.items()))
                + f" (sum {peak_rss.kib_to_gb(sum(peaks.values())):.1f} GB)")
        _PEAKS.extra = _WORKER_PEAKS[worst][1]
    session.config._dconnx_peak_rss = (line, message)
    if message and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, config):
    """Print the zoo timing table recorded by tests/test_zoo.py (record_property "zoo_timing")
    and the session's wall time and peak RSS (failing the run above the limit, see
    pytest_sessionfinish)."""
    rows = [value for report in terminalreporter.stats.get("passed", [])
            for key, value in getattr(report, "user_properties", ()) if key == "zoo_timing"]
    if rows:
        terminalreporter.write_sep("-", "zoo timings (s): export | ORT load | torch+ORT run | op types")
        for row in rows:
            terminalreporter.write_line(row)
    line, message = getattr(config, "_dconnx_peak_rss", (None, None))
    if line:
        wall = time.perf_counter() - _T0
        terminalreporter.write_line(f"wall time: {wall / 60:.1f} min ({wall:.0f} s); {line}")
        top = getattr(_PEAKS, "extra", None) or (_PEAKS.top() if _PEAKS.raises else None)
        if top:
            terminalreporter.write_line("raised most by: " + "; ".join(top))
    if message:
        terminalreporter.write_sep("=", "FAILED: " + message, red=True, bold=True)
