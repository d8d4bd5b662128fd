"""--init moefy: experts are balanced clusters of the dense FFN's neurons, together exactly the dense FFN."""
import json

import pytest
import torch
from clitools import assert_user_error, run
from tiny import tiny_net, tiny_t5
from torch import nn

import moeify
from moeify.conversion.kmeans import balanced_assign, balanced_kmeans
from moeify.conversion.moefy import routed_error
from moeify.layers.switch import switch_layers


class GatedMLP(nn.Module):
    """A biased gated FFN: down(silu(gate(x)) * up(x))."""

    def __init__(self, d: int = 8, f: int = 32) -> None:
        super().__init__()
        self.gate, self.up, self.down, self.act = nn.Linear(d, f), nn.Linear(d, f), nn.Linear(f, d), nn.SiLU()

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


def gated_mlp():
    torch.manual_seed(0)
    return GatedMLP()


# name: (dense model, where its converted FFN sits, the dense module computing that FFN, its w_in, d_model)
CASES = {
    "relu-t5": (tiny_t5, "encoder.block.1.layer.1.DenseReluDense", "encoder.block.1.layer.1.DenseReluDense", "wi", 16),
    "gated-gelu-t5": (lambda: tiny_t5("gated-gelu"), "decoder.block.3.layer.2.DenseReluDense",
                      "decoder.block.3.layer.2.DenseReluDense", "wi_1", 16),
    "gelu-biased": (tiny_net, "h.1.mlp.moe", "h.1.mlp", "c_fc", 8),
    "gated-silu-biased": (gated_mlp, "", "", "up", 8),
}


def every_expert_at_gate_one(layer, x):
    """Sum over all experts of expert(x): every expert active, every gate 1."""
    e = layer.num_experts
    return layer.experts(x.repeat(e, 1), [x.shape[0]] * e).view(e, x.shape[0], -1).sum(0)


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_all_experts_at_gate_one_are_exactly_the_dense_ffn(case):
    make, site, ffn, w_in, d = CASES[case]
    dense = make()
    sparse = moeify.convert(dense, moeify.MoEConfig(num_experts=4, every=1, init="moefy"))
    layer = sparse.get_submodule(site)
    assert layer.experts.d_ff == 8  # 32 neurons in 4 groups
    x = torch.randn(64, d, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(every_expert_at_gate_one(layer, x), dense.get_submodule(ffn)(x), rtol=1e-5, atol=1e-6)
    # The router's rows are the groups' centroids: the mean of each expert's activation-input rows.
    keys = layer.experts.w_gate if layer.experts.gated else layer.experts.w_in
    torch.testing.assert_close(layer.router.weight, keys.mean(1), rtol=0, atol=1e-6)
    # The groups partition the neurons: each dense row is in exactly one expert.
    rows = layer.experts.w_in.reshape(-1, d)
    dense_rows = dense.get_submodule(ffn).get_submodule(w_in).weight
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, dense_rows.tolist()))


def test_the_output_bias_is_shared_out_so_that_the_experts_add_it_once():
    layer = moeify.convert(gated_mlp(), moeify.MoEConfig(num_experts=4, every=1, init="moefy"))
    dense = gated_mlp()
    for e in range(4):
        assert torch.equal(layer.experts.b_out[e], dense.down.bias / 4)


@torch.no_grad()
def test_routed_error_sums_each_tokens_top_k_experts_at_gate_one():
    dense = tiny_net()
    layer = moeify.convert(dense, moeify.MoEConfig(num_experts=4, every=1, init="moefy")).h[2].mlp.moe
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(2))
    y = dense.h[2].mlp(x)
    top1 = (x @ layer.router.weight.t()).argmax(1)
    by_hand = torch.stack([layer.experts(x[t:t + 1], [int(e == top1[t]) for e in range(4)])[0] for t in range(20)])
    assert routed_error(layer, x, y, 1) == pytest.approx(float((by_hand - y).norm() / y.norm()), rel=1e-5)
    assert routed_error(layer, x, y, 4) < 1e-6  # every expert: the dense FFN
    assert routed_error(layer, x, y, 1) > routed_error(layer, x, y, 2) > routed_error(layer, x, y, 3)


def test_experts_must_divide_the_ffn_width(tmp_path, hf_t5_dir):
    with pytest.raises(moeify.MoeifyError) as e:
        moeify.convert(tiny_t5(), moeify.MoEConfig(num_experts=6, init="moefy"))
    assert str(e.value) == ("init='moefy' splits the 32 neurons of encoder.block.1.layer.1.DenseReluDense into equal "
                            "groups, but 32 is not divisible by num_experts=6: try num_experts=8")
    assert_user_error(run("convert", hf_t5_dir, "--init", "moefy", "--experts", "6", "-o", tmp_path / "out"), tmp_path,
                      "error: --init 'moefy' splits the 32 neurons of encoder.block.1.layer.1.DenseReluDense into "
                      "equal groups, but 32 is not divisible by --experts 6: try --experts 8")


def test_balanced_assignment_fills_the_nearest_cluster_with_room():
    distance = torch.tensor([[0.0, 5.0], [1.0, 6.0], [2.0, 3.0], [9.0, 0.0]])
    assert balanced_assign(distance, 2).tolist() == [0, 0, 1, 1]  # point 2 finds cluster 0 full
    tied = torch.zeros(4, 2)
    assert balanced_assign(tied, 2).tolist() == [0, 0, 1, 1]  # ties: lower indices first


def test_balanced_kmeans_finds_planted_equal_clusters_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    planted = torch.arange(4).repeat_interleave(16)[torch.randperm(64, generator=g)]
    x = 10 * torch.randn(4, 8, generator=g)[planted] + 0.1 * torch.randn(64, 8, generator=g)
    labels = balanced_kmeans(x, 4, torch.Generator().manual_seed(3))
    assert torch.bincount(labels).tolist() == [16] * 4
    assert all(len(set(labels[planted == c].tolist())) == 1 for c in range(4))  # each planted cluster is one label
    assert torch.equal(labels, balanced_kmeans(x, 4, torch.Generator().manual_seed(3)))


def test_the_report_is_saved_shown_and_kept_through_load(tmp_path, hf_t5_dir):
    result = run("convert", hf_t5_dir, "--init", "moefy", "--experts", "4", "--every", "1", "--no-check",
                 "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "initialisation measured on calibration text (moefy, router centroid)" in " ".join(result.output.split())
    meta = json.loads((tmp_path / "out" / "moeify.json").read_text())
    reports = {layer["name"]: layer["init_report"] for layer in meta["summary"]["moe_layers"]}
    assert meta["format_version"] == 3 and len(reports) == 8
    first = reports["encoder.block.0.layer.1.DenseReluDense"]
    assert first["tokens"] == 4096 and reports["decoder.block.0.layer.2.DenseReluDense"]["tokens"] == 1024
    assert 0 < first["top2_error"] < first["top1_error"]
    row = (f"encoder.block.0.layer.1.DenseReluDense 4096 {first['top1_error']:.3f} {first['top2_error']:.3f} "
           f"{first['load_cv']:.2f} {first['random_load_cv']:.2f}")
    assert row in " ".join(result.output.split())
    shown = run("inspect", tmp_path / "out")
    assert row in " ".join(shown.output.split())
    loaded = moeify.load(tmp_path / "out")
    assert {k: v.to_dict() for k, v in loaded.moeify_record.init_reports.items()} == reports
    assert [m.experts.d_ff for m in switch_layers(loaded).values()] == [8] * 8
