"""The peak-RSS line and limit of tests/conftest.py (tests/peak_rss.py), with computed values."""
import pytest

import peak_rss


def test_summary_line():
    assert peak_rss.summary(4_000_000, 1_200_000) == "peak RSS: 4.1 GB (pytest), 1.2 GB (largest child)"
    assert peak_rss.summary(0, 0) == "peak RSS: 0.0 GB (pytest), 0.0 GB (largest child)"


def test_limit_decision():
    six_gb_kib = 6e9 / 1024
    assert peak_rss.over_limit(int(six_gb_kib), 6.0) is None               # at the limit: passes
    message = peak_rss.over_limit(int(six_gb_kib) + 1000, 6.0)           # 1 MB over it: fails
    assert message and "6.00 GB exceeds the limit of 6 GB" in message and peak_rss.LIMIT_ENV in message
    assert peak_rss.over_limit(13_400_000, 6.0).startswith("peak RSS of the pytest process 13.72 GB")
    assert peak_rss.over_limit(13_400_000, 14.0) is None


def test_limit_from_environment():
    assert peak_rss.limit_gb({}) == peak_rss.DEFAULT_LIMIT_GB == 6.0
    assert peak_rss.limit_gb({peak_rss.LIMIT_ENV: " "}) == 6.0
    assert peak_rss.limit_gb({peak_rss.LIMIT_ENV: "2.5"}) == 2.5
    for bad in ("six", "0", "-1"):
        with pytest.raises(ValueError, match=peak_rss.LIMIT_ENV):
            peak_rss.limit_gb({peak_rss.LIMIT_ENV: bad})


def test_peaks_are_this_process():
    self_kib, child_kib = peak_rss.peaks_kib()
    assert self_kib > 10_000 and child_kib >= 0     # a Python process with pytest loaded is over 10 MB


def test_peak_tracker_ranks_the_tests_that_raised_the_peak():
    tracker = peak_rss.PeakTracker()
    gb = int(1e9 / 1024)                      # KiB in one GB
    tracker.record("a", 1 * gb, 3 * gb)      # +2 GB
    tracker.record("b", 3 * gb, 3 * gb)      # no rise: not listed
    tracker.record("c", 3 * gb, 4 * gb)      # +1 GB
    tracker.record("a", 4 * gb, 5 * gb)      # +1 GB more for a
    assert tracker.top(2) == [f"a (+{peak_rss.kib_to_gb(3 * gb):.1f} GB)",
                              f"c (+{peak_rss.kib_to_gb(gb):.1f} GB)"]
    assert "b" not in tracker.raises
