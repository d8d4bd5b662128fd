"""The benchmarks' verdicts: per-round ratios, the sign test's interval of their median, and met / missed / not
resolved (benchmarks/_report.py: the README's targets rest on them)."""
import importlib
from pathlib import Path

import pytest
import torch


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


def test_round_orders_give_each_step_every_predecessor_and_repeat_with_the_seed(stats):
    """A fresh permutation each round: over rounds every step follows every other one (a rotation would keep each
    one's predecessor), and the same seed gives the same series."""
    names = ["dense", "transformers", "moeify", "grouped_mm", "floor"]
    orders = stats.round_orders(names)
    rounds = [next(orders) for _ in range(60)]
    assert all(sorted(order) == sorted(names) for order in rounds)
    follows = {(a, b) for order in rounds for a, b in zip(order, order[1:])}
    assert follows == {(a, b) for a in names for b in names if a != b}
    again = stats.round_orders(names)
    assert [next(again) for _ in range(60)] == rounds
    other = stats.round_orders(names, seed=1)
    assert [next(other) for _ in range(60)] != rounds


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


def test_e1_is_out_of_reach_only_where_the_router_alone_misses_it(benchmarks):
    bench_layer = benchmarks("bench_layer")
    slow = {"transformers": [0.80, 0.85, 0.90, 0.92, 0.95], "dense": [1.20, 1.25, 1.30, 1.35, 1.40]}
    floor = {**slow, bench_layer.ROUTED: [1.16, 1.18, 1.20, 1.22, 1.25]}
    assert bench_layer.verdicts(1, 64, floor, 100.0, 90.0, 30.0, 10.0) == \
        "met <1x transformers; 1.15x dense out of reach (router and gate alone 1.20x)"
    # the floor's interval reaches 1.15x: a layer as lean as it could meet the target, so the miss stands
    spans = {**slow, bench_layer.ROUTED: [1.05, 1.10, 1.20, 1.22, 1.25]}
    assert bench_layer.verdicts(1, 64, spans, 100.0, 90.0, 30.0, 10.0) == "met <1x transformers; MISS 1.15x dense"
    met = {**floor, "dense": [1.00, 1.05, 1.10, 1.12, 1.14]}  # under the floor (its own backward is faster): met
    assert bench_layer.verdicts(1, 64, met, 100.0, 90.0, 30.0, 10.0) == "met <1x transformers; met 1.15x dense"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_routed_dense_floor_computes_the_one_expert_layer(benchmarks, dtype):
    """RoutedDense is the E = 1 layer's arithmetic (every gate is 1 and one expert takes every token) on the dense
    FFN's own weights, its router in float32 in any dtype; its backward reaches the router's weight."""
    bench_layer = benchmarks("bench_layer")
    dtype = getattr(torch, dtype)
    modules = bench_layer.build(1, 16, torch.device("cpu"))
    layer, dense = modules["moeify"].to(dtype), modules["dense"].to(dtype)
    floor = bench_layer.RoutedDense(dense, layer.router.weight)
    x = torch.randn(1, 16, bench_layer.D_MODEL).to(dtype)
    assert floor.router.dtype == torch.float32
    torch.testing.assert_close(floor(x), layer(x))
    floor(x).sum().backward()
    assert floor.router.grad is not None and dense[0].weight.grad is not None


def test_the_grouped_gemms_reference_computes_the_rows_the_layer_keeps(benchmarks):
    """grouped_mm used directly on the kept rows, gated and put back in place, is the layer's output: the same rows,
    grouped by expert, on the same weights (capacity factor 1 drops some)."""
    from torch import nn

    from moeify.config import RoutingConfig
    from moeify.layers import SwitchFFN
    from moeify.layers.dispatch import dispatch

    bench_layer = benchmarks("bench_layer")
    torch.manual_seed(0)
    layer = SwitchFFN(16, 32, RoutingConfig(num_experts=4, capacity_factor=1.0, min_capacity=1), nn.ReLU()).train()
    x = torch.randn(24, 16)
    reference = bench_layer.GroupedGemms(layer)
    rows, offsets = reference.inputs(layer, x)
    assert 0 < rows.shape[0] < 24  # some tokens dropped, so the selection matters
    y = reference(rows, offsets)
    route = layer.router(x)
    kept = dispatch(route.expert_index, 4, layer.capacity(24)).token_index
    assert offsets.tolist() == torch.bincount(route.expert_index[kept, 0], minlength=4).cumsum(0).tolist()
    out = torch.zeros(24, 16).index_copy(0, kept, y * route.gate[kept, 0, None])
    torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-6)
    y.sum().backward()  # grouped_mm's backward takes .sum()'s gradient
    assert reference.w_in.grad.shape == layer.experts.w_in.shape and reference.w_in.grad.abs().sum() > 0


def test_a_point_times_every_module_each_round(benchmarks, monkeypatch):
    bench_layer = benchmarks("bench_layer")
    monkeypatch.setattr(bench_layer, "MIN_SECONDS", 0.0)
    # 2 rounds at least (each ~0.1 s), more while a target is not resolved, up to 1 s
    times, (kept, used), ops = bench_layer.measure(8, 64, 2, torch.float32, resolve_seconds=1.0)
    assert set(times) == {"dense", "transformers", "moeify", "grouped_mm"}
    assert ops == {name: {} for name in times}  # ops are counted on CUDA only, where they bound a step
    assert all(len(t[mode]) >= 2 for t in times.values() for mode in ("fwd", "fwd+bwd"))
    assert 0 < kept <= 64 and 0 < used <= 8
    # the reference runs where grouped_mm is a fast GEMM: float32 on the CPU; bfloat16 alone on CUDA (its fused kernel)
    assert bench_layer.has_reference(torch.float32, torch.device("cpu"))
    assert bench_layer.has_reference(torch.bfloat16, torch.device("cuda"))
    assert not any(bench_layer.has_reference(d, torch.device("cuda")) for d in (torch.float32, torch.float16))
    # each round feeds every module the same batch, a new one from round to round (BATCHES of them in turn)
    seen = []
    monkeypatch.setattr(bench_layer, "step", lambda module, x, *a: seen.append((type(module).__name__, x[0])) or 1e-3)
    bench_layer.measure(8, 64, 2 * bench_layer.BATCHES, torch.float32, resolve_seconds=1.0)
    warm_up = 4 * bench_layer.BATCHES  # the forward's: each of the 4 modules on every batch, then the rounds
    rounds = [seen[i:i + 4] for i in range(warm_up, warm_up + 4 * (bench_layer.BATCHES + 1), 4)]
    firsts = [[x for name, x in r if name != "GroupedGemms"] for r in rounds]  # the reference takes the kept rows
    assert all(torch.equal(xs[0], x) for xs in firsts for x in xs[1:])  # one batch per round...
    assert not torch.equal(firsts[0][0], firsts[1][0]) and torch.equal(firsts[0][0], firsts[-1][0])  # ...in turn
    monkeypatch.undo()
    monkeypatch.setattr(bench_layer, "MIN_SECONDS", 0.0)
    # at E = 1 the dense FFN with a router runs too: the floor of the 1.15x-of-dense target
    times, _, _ = bench_layer.measure(1, 64, 2, torch.float32, resolve_seconds=0.5)
    assert set(times) == {"dense", "transformers", "moeify", "grouped_mm", bench_layer.ROUTED}
    assert all(len(t[mode]) >= 2 for t in times.values() for mode in ("fwd", "fwd+bwd"))


def test_ops_are_counted_per_step_with_backward_and_milliseconds_keep_two_digits_under_one(benchmarks):
    from torch import nn

    bench_layer = benchmarks("bench_layer")
    dense = nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 8, bias=False))
    x = torch.randn(4, 8)
    forward, training = bench_layer.ops_per_step(dense, (x,), False), bench_layer.ops_per_step(dense, (x,), True)
    assert forward >= 3 and training > 2 * forward  # two GEMMs and a ReLU at least; backward adds their gradients
    assert bench_layer.ops_per_step(dense, (x,), False) == forward  # the same step issues the same ops
    assert [bench_layer.milliseconds(v) for v in (0.0412, 0.5, 1.04, 12.345)] == ["0.04", "0.50", "1.0", "12.3"]


def test_a_layer_training_step_gives_its_input_a_fresh_gradient(benchmarks):
    """bench_layer's training step backpropagates into the input, as a layer inside a model does (the bounds count
    that GEMM), and each step's gradient is that step's alone, not a sum over steps."""
    from torch import nn

    bench_layer = benchmarks("bench_layer")
    layer = nn.Linear(4, 3)
    x = torch.randn(2, 4).requires_grad_()
    bench_layer.step(layer, (x,), backward=True)
    want = layer.weight.detach().sum(0).expand(2, 4)  # d sum(x @ W.T + b) / dx
    assert torch.allclose(x.grad, want)
    bench_layer.step(layer, (x,), backward=True)
    assert torch.allclose(x.grad, want)  # replaced, not accumulated


def test_the_native_kernels_benchmark_times_each_op_both_ways(benchmarks, tmp_path, monkeypatch):
    """bench_skinny runs each op natively and on the cpu kernel's own path (torch's GEMMs, oneDNN's, MKL's batched
    one) and marks the rows that the cpu kernel gives the native loops (NATIVE_MAX_ROWS)."""
    import sys

    from moeify.layers.kernels import cpu, native

    if native.skinny() is None:
        pytest.skip("no native kernels on this machine")
    bench_skinny = benchmarks("bench_skinny")
    out = tmp_path / "skinny.md"
    monkeypatch.setattr(sys, "argv", ["bench_skinny.py", "--modes", "fp32", "--rows", "1", "40", "--reps", "1",
                                      "--out", str(out)])
    bench_skinny.main()
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| fp32 |")]
    assert [(r[1], r[2]) for r in rows] == [(shape, k) for shape in ("2048 x 512", "512 x 2048") for k in ("1", "40")]
    for r in rows:
        out_, in_ = map(int, r[1].split(" x "))
        limits = cpu.native_max_rows(native.skinny(), torch.float32, torch.float32, out_, in_)
        for cell, limit in zip(r[3:6], limits):  # forward, input grad, weight grad: "native / torch = ratio x[ *]"
            assert " / " in cell and " = " in cell and cell.rstrip(" |").endswith("*") == (int(r[2]) <= limit), cell


def test_bench_zeroing_swaps_the_kernels_zeroing_and_puts_it_back(benchmarks):
    """Each way of zeroing the experts without rows is what the cpu kernel's native zero_ does inside zeroing(), and
    the shipped one is back after it, even when the step raised."""
    from moeify.layers.kernels import native

    bench = benchmarks("bench_zeroing")
    shipped = native.Skinny.zero_
    t = torch.ones(8)
    for way, expected in bench.WAYS.items():
        with bench.zeroing(way):
            assert native.Skinny.zero_ is (expected or shipped)
    with pytest.raises(RuntimeError), bench.zeroing("written (zero_)"):
        raise RuntimeError("a step failed")
    assert native.Skinny.zero_ is shipped
    with bench.zeroing("written (zero_)"):
        native.Skinny.zero_(None, t)
    assert not t.any()


@pytest.mark.parametrize("name, args, message", [
    ("bench_layer", ["--experts", "0"], "argument --experts: 0 is not at least 1"),
    ("bench_layer", ["--resolve-seconds", "-1"], "argument --resolve-seconds: -1 is not above 0"),
    ("bench_skinny", ["--rows", "8", "x"], "argument --rows: 'x' is not a whole number"),
    ("bench_zeroing", ["--rounds", "-3"], "argument --rounds: -3 is not at least 1"),
    ("bench_onnx", ["--batch", "0"], "argument --batch: 0 is not at least 1"),
])
def test_benchmarks_refuse_nonsense_arguments_in_one_line(benchmarks, monkeypatch, capsys, name, args, message):
    """Before any work: argparse's usage line and one error line naming the argument, exit status 2."""
    import sys

    module = benchmarks(name)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *args])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(message) and err[-1].startswith(f"{name}.py: error:")
