"""The benchmarks' verdicts: per-round ratios, the sign test's interval of their median, and met / missed / not
resolved (benchmarks/_report.py: the README's targets rest on them)."""
import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("_report", Path(__file__).parents[1] / "benchmarks" / "_report.py")
stats = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stats)


def test_ratios_pair_each_round_and_come_sorted():
    assert stats.paired([3.0, 2.0, 8.0], [1.0, 4.0, 4.0]) == [0.5, 2.0, 3.0]
    with pytest.raises(ValueError):  # a round without its baseline is a bug, not a shorter list
        stats.paired([1.0, 2.0], [1.0])


def test_the_interval_is_the_sign_tests_order_statistics():
    assert stats.interval([0.8, 0.9, 1.0, 1.1, 1.2]) == (0.8, 1.2)  # 5 rounds: k = 0, the extremes
    ratios = [i / 100 for i in range(100)]
    assert stats.interval(ratios) == (0.40, 0.59)  # k = floor((100 - 1.96 * 10) / 2) = 40
    assert stats.interval([0.7]) == (0.7, 0.7)


def test_verdicts_need_the_whole_interval_on_one_side():
    assert stats.verdict([0.90, 0.95, 0.97, 0.98, 1.00], 1.0) == "met"  # at the target counts as reaching it
    assert stats.verdict([1.01, 1.02, 1.03, 1.05, 1.10], 1.0) == "missed"
    assert stats.verdict([0.90, 0.95, 0.97, 0.98, 1.02], 1.0) == "not resolved"  # median under, one round over
