"""router_losses(): dropped-token counts against routings forced by hand, and what the CLI reports."""
import json

import pytest
import torch
from clitools import run
from torch import nn

import moeify
from moeify.config import RoutingConfig
from moeify.layers import SwitchFFN
from moeify.layers.router import Router
from moeify.planner.calibration import calibrate


def forced_layer(expert: int, num_experts: int = 4, **routing) -> SwitchFFN:
    """A SwitchFFN whose router sends every positive input to `expert`."""
    layer = SwitchFFN(8, 16, RoutingConfig(num_experts=num_experts, **routing), nn.ReLU())
    layer.experts.reset_parameters(1.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[expert] = 1.0  # logit sum(x) > 0 for this expert, 0 for the others
    return layer


class TwoSwitch(nn.Module):
    """Both layers see the same input, so each one's routing is fixed by hand."""

    def __init__(self, a: SwitchFFN, b: SwitchFFN) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return self.a(x) + self.b(x)


def positive_tokens(n: int) -> torch.Tensor:
    return torch.rand(n, 8, generator=torch.Generator().manual_seed(1)) + 0.1


def test_every_token_to_one_expert_drops_all_but_capacity():
    layer = forced_layer(0, capacity_factor=1.25, eval_capacity_factor=2.0, min_capacity=0).train()
    x = positive_tokens(10)
    with moeify.router_losses(layer) as losses:
        y = layer(x)
    (r,) = losses.layers
    assert r.tokens_per_expert.tolist() == [10, 0, 0, 0]
    assert r.capacity == 4  # ceil(1.25 * 10 / 4)
    assert r.dropped == 6 and r.tokens == 10
    assert losses.dropped_fraction() == pytest.approx(0.6)
    assert (y[4:] == 0).all() and (y[:4] != 0).any(-1).all()  # the first 4 tokens keep their slots

    layer.eval()  # eval capacity factor: ceil(2.0 * 10 / 4) = 5 slots
    losses.clear()
    with moeify.router_losses(layer) as losses:
        layer(x)
    assert losses.layers[0].capacity == 5 and losses.layers[0].dropped == 5
    assert losses.dropped_fraction() == pytest.approx(0.5)


def test_dropped_over_several_layers_and_calls():
    # a: 12 tokens to expert 0, capacity ceil(1.0 * 12 / 4) = 3 -> 9 dropped.
    # b: 12 tokens to expert 2, capacity max(min_capacity 7, 3) = 7 -> 5 dropped.
    model = TwoSwitch(forced_layer(0, eval_capacity_factor=1.0, min_capacity=0),
                      forced_layer(2, eval_capacity_factor=1.0, min_capacity=7)).eval()
    with moeify.router_losses(model) as losses:
        model(positive_tokens(12).view(3, 4, 8))  # leading dimensions are flattened to 12 tokens
    assert [(r.name, r.capacity, r.dropped) for r in losses.layers] == [("a", 3, 9), ("b", 7, 5)]
    assert losses.dropped_fraction() == pytest.approx(14 / 24)
    with moeify.router_losses(model) as more:
        model(positive_tokens(12))
        model(positive_tokens(4))  # 4 tokens: a keeps ceil(1.0) = 1 of 4 -> 3 dropped; b keeps 7 -> 0 dropped
    assert [r.dropped for r in more.layers] == [9, 5, 3, 0]
    assert more.dropped_fraction() == pytest.approx(17 / 32)


def test_nothing_is_dropped_when_every_token_fits():
    layer = forced_layer(1, eval_capacity_factor=4.0, min_capacity=0).eval()  # 4 * 6 / 4 = 6 slots
    with moeify.router_losses(layer) as losses:
        layer(positive_tokens(6))
    assert losses.layers[0].dropped == 0 and losses.dropped_fraction() == 0.0


def test_calibrate_reports_the_hand_counted_drops():
    model = TwoSwitch(forced_layer(0, eval_capacity_factor=1.0, min_capacity=0),
                      forced_layer(3, eval_capacity_factor=1.0, min_capacity=7))
    batches = [{"x": positive_tokens(12)}, {"x": positive_tokens(4)}]
    result = calibrate(model, iter(batches))
    a, b = result["layers"]["a"], result["layers"]["b"]
    assert a["tokens"] == [16, 0, 0, 0] and b["tokens"] == [0, 0, 0, 16]
    assert a["dropped_fraction"] == pytest.approx((9 + 3) / 16)  # capacity 3, then 1
    assert b["dropped_fraction"] == pytest.approx(5 / 16)  # capacity 7 both times


def test_convert_prints_and_calibrate_writes_the_hand_counted_drops(hf_t5_dir, tmp_path, monkeypatch):
    # Zero router weights: every logit ties, so every token goes to expert 0 (max takes the first).
    monkeypatch.setattr(Router, "reset_parameters", lambda self, *a, **k: nn.init.zeros_(self.weight))
    out = tmp_path / "m"
    result = run("convert", hf_t5_dir, "--experts", 4, "--eval-capacity-factor", 1.0, "--min-capacity", 6, "-o", out)
    assert result.exit_code == 0, result.output
    # The forward check routes 2 x 32 encoder tokens and 2 x 8 decoder tokens through 2 layers each.
    # Encoder: capacity max(6, 64 / 4) = 16, 48 dropped; decoder: capacity max(6, 16 / 4) = 6, 10 dropped.
    # (2 * 48 + 2 * 10) / (2 * 64 + 2 * 16) = 116 / 160 = 72.5%
    assert "dropped 72.5% of tokens" in result.output, result.output
    assert "busiest expert 4.00x the mean load" in result.output

    result = run("convert", hf_t5_dir, "--experts", 4, "--top-k", 2, "--dropless", "-o", tmp_path / "k2")
    assert result.exit_code == 0, result.output
    assert "dropless: no token dropped, busiest expert" in result.output, result.output
    result = run("convert", hf_t5_dir, "--experts", 4, "--top-k", 2, "--eval-capacity-factor", 1.0,
                 "--min-capacity", 0, "-o", tmp_path / "k2-capped")
    # With k = 2 the dropped share is of (token, choice) assignments, and the line says so.
    assert "of top-2 assignments (eval capacity factor 1.0)" in result.output, result.output

    load = tmp_path / "load.json"
    result = run("calibrate", out, "--batches", 2, "--batch-size", 2, "--seq-len", 32, "-o", load)
    assert result.exit_code == 0, result.output
    layers = json.loads(load.read_text())["layers"]
    assert len(layers) == 4
    for name, layer in layers.items():
        # Per batch: encoder as above (48 of 64 dropped), decoder 2 x 32 / 4 = 16 tokens (10 dropped).
        per_batch, dropped = (64, 48) if name.startswith("encoder") else (16, 10)
        assert layer["tokens"] == [2 * per_batch, 0, 0, 0], name
        assert layer["dropped_fraction"] == pytest.approx(dropped / per_batch), name
    assert "dropped 75.0%" in result.output and "dropped 62.5%" in result.output
