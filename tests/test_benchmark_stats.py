"""The benchmarks' verdicts: per-round ratios, the sign test's interval of their median, and met / missed / not
resolved (benchmarks/_report.py: the README's targets rest on them)."""
import importlib
from pathlib import Path

import pytest


@pytest.fixture
def benchmarks(monkeypatch):
    """Imports a benchmark module by name, as the benchmarks import each other (from benchmarks/ on the path)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    return importlib.import_module


@pytest.fixture
def stats(benchmarks):
    return benchmarks("_report")


def test_ratios_pair_each_round_and_come_sorted(stats):
    assert stats.paired([3.0, 2.0, 8.0], [1.0, 4.0, 4.0]) == [0.5, 2.0, 3.0]
    with pytest.raises(ValueError):  # a round without its baseline is a bug, not a shorter list
        stats.paired([1.0, 2.0], [1.0])


def test_the_interval_is_the_sign_tests_order_statistics(stats):
    assert stats.interval([0.8, 0.9, 1.0, 1.1, 1.2]) == (0.8, 1.2)  # 5 rounds: k = 0, the extremes
    ratios = [i / 100 for i in range(100)]
    assert stats.interval(ratios) == (0.40, 0.59)  # k = floor((100 - 1.96 * 10) / 2) = 40
    assert stats.interval([0.7]) == (0.7, 0.7)


def test_verdicts_need_the_whole_interval_on_one_side(stats):
    assert stats.verdict([0.90, 0.95, 0.97, 0.98, 1.00], 1.0) == "met"  # at the target counts as reaching it
    assert stats.verdict([1.01, 1.02, 1.03, 1.05, 1.10], 1.0) == "missed"
    assert stats.verdict([0.90, 0.95, 0.97, 0.98, 1.02], 1.0) == "not resolved"  # median under, one round over


def test_the_layer_benchmark_names_each_verdict(benchmarks):
    bench_layer = benchmarks("bench_layer")
    ratios = {"transformers": [0.30, 0.40, 0.45, 0.50, 0.55], "dense": [1.00, 1.05, 1.10, 1.12, 1.14]}
    # E = 1 at 1024 tokens: never slower, within 1.15x of dense, within 1.5x of the roofline (45 <= 1.5 x 30)
    assert bench_layer.verdicts(1, 1024, ratios, 100.0, 45.0, 30.0, 10.0) == \
        "met <1x transformers; met 1.15x dense; met 1.5x roofline"
    # E = 64: the 0.5x interval spans 0.5 and half of transformers' 100 ms is above the 10 ms bound
    assert bench_layer.verdicts(64, 8192, ratios, 100.0, 45.0, 30.0, 10.0) == \
        "met <1x transformers; 0.5x not resolved"
    slow = {"transformers": [0.60, 0.70, 0.80, 0.90, 1.05]}
    assert bench_layer.verdicts(128, 8192, slow, 100.0, 80.0, 30.0, 60.0) == \
        "<1x transformers not resolved; 0.5x out of reach (50.0 < bound 60.0 ms)"
    assert bench_layer.verdicts(256, 64, slow, 100.0, 80.0, 30.0, 10.0) == \
        "<1x transformers not resolved; MISS 0.5x"
