"""Peak memory of a test session: the line tests/conftest.py prints and the limit it enforces.

`make test` must fit a small machine beside other work: the pytest process's peak resident
set size (getrusage ru_maxrss, KiB on Linux) may not exceed DEFAULT_LIMIT_GB, or the
environment variable LIMIT_ENV (in GB, 1 GB = 10⁹ bytes). Kept apart from conftest.py so
that tests/test_peak_rss.py can check the decision with computed values.
"""
from __future__ import annotations

import resource

DEFAULT_LIMIT_GB = 6.0
LIMIT_ENV = "DCONNX_TEST_RSS_LIMIT_GB"


def kib_to_gb(kib: int) -> float:
    return kib * 1024 / 1e9


def limit_gb(environ) -> float:
    """The limit in GB: LIMIT_ENV when set (a positive number), else DEFAULT_LIMIT_GB."""
    value = environ.get(LIMIT_ENV, "").strip()
    if not value:
        return DEFAULT_LIMIT_GB
    try:
        limit = float(value)
    except ValueError:
        raise ValueError(f"{LIMIT_ENV}={value!r} is not a number of GB") from None
    if not limit > 0:
        raise ValueError(f"{LIMIT_ENV}={value!r} must be positive")
    return limit


def peaks_kib() -> tuple[int, int]:
    """(this process's peak RSS, the largest waited-for child's peak RSS), in KiB."""
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def summary(self_kib: int, child_kib: int) -> str:
    return f"peak RSS: {kib_to_gb(self_kib):.1f} GB (pytest), {kib_to_gb(child_kib):.1f} GB (largest child)"


def over_limit(self_kib: int, limit: float) -> str | None:
    """The failure message when the pytest process's peak exceeds `limit` GB, else None."""
    peak = kib_to_gb(self_kib)
    if peak <= limit:
        return None
    return (f"peak RSS of the pytest process {peak:.2f} GB exceeds the limit of {limit:g} GB "
            f"(set {LIMIT_ENV} to change it); shrink the largest tests' inputs or free their arrays")


def release_freed_memory(full: bool = True) -> None:
    """Collect garbage and hand the C heap's free pages back to the system (glibc malloc_trim),
    so that what one big test freed does not stay resident under the next one. `full=False`
    collects the young generations only (a full collection scans every module the exporters
    import lazily: 0.13 s, more than most small tests take)."""
    import ctypes
    import gc
    gc.collect() if full else gc.collect(1)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):      # not glibc: nothing to trim
        pass


class PeakTracker:
    """Which tests raised the process's peak RSS, and by how much (KiB): the places to shrink."""

    def __init__(self):
        self.raises: dict[str, int] = {}

    def record(self, test_id: str, before_kib: int, after_kib: int) -> None:
        if after_kib > before_kib:
            self.raises[test_id] = self.raises.get(test_id, 0) + after_kib - before_kib

    def top(self, n: int = 3) -> list[str]:
        """The n tests that raised the peak most, as 'test (+x.x GB)'."""
        ranked = sorted(self.raises.items(), key=lambda kv: -kv[1])[:n]
        return [f"{test} (+{kib_to_gb(kib):.1f} GB)" for test, kib in ranked]
