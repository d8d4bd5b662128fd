"""--upcycle-scale: upcycled experts' outputs scaled so that a fresh Switch layer starts at the dense FFN."""
import pytest
import torch
from tiny import VOCAB, tiny_net, tiny_t5

import moeify
from moeify.conversion.text import stdlib_text, text_batches, token_ids
from moeify.layers.router import Router
from moeify.layers.switch import switch_layers

STEPS = 100  # ~1.5 s on two cores: enough for the FFNs to matter to the loss (4.38 at init, 2.88 after)


@pytest.fixture(scope="module")
def pretrained():
    """A tiny T5 trained briefly on the standard library's source, and held-out batches of it."""
    ids = token_ids(stdlib_text(400_000), VOCAB)
    dense = tiny_t5().train()
    optimizer = torch.optim.AdamW(dense.parameters(), lr=3e-3)
    for b in text_batches(ids[:300_000], STEPS, 16, 32, True):
        loss = dense(input_ids=b["input_ids"], labels=b["decoder_input_ids"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return dense.eval(), list(text_batches(ids[300_000:], 4, 8, 32, True))


@torch.no_grad()
def held_out_loss(model, batches) -> float:
    model.eval()
    losses = [model(input_ids=b["input_ids"], labels=b["decoder_input_ids"]).loss.item() for b in batches]
    return sum(losses) / len(losses)


@pytest.mark.parametrize("top_k", [1, 2])
def test_auto_starts_within_one_percent_of_the_dense_loss_and_none_is_todays_upcycling(pretrained, top_k):
    dense, batches = pretrained
    moe = dict(num_experts=8, top_k=top_k, every=1, dropless=True)
    base = held_out_loss(dense, batches)
    none = held_out_loss(moeify.convert(dense, moeify.MoEConfig(**moe, upcycle_scale="none")), batches)
    auto = held_out_loss(moeify.convert(dense, moeify.MoEConfig(**moe, upcycle_scale="auto")), batches)
    assert abs(auto / base - 1) < 0.01  # measured: 0.3% (k = 1), 0.3% (k = 2)
    assert none / base - 1 > 0.02  # measured: 4.9%, 2.8%: the gate (~1/E) shrinks every FFN
    # none is today's upcycling, bit for bit: the default, and an explicit factor 1.
    assert held_out_loss(moeify.convert(dense, moeify.MoEConfig(**moe)), batches) == none
    assert held_out_loss(moeify.convert(dense, moeify.MoEConfig(**moe, upcycle_scale="1")), batches) == none


def test_none_copies_the_dense_ffn_and_draws_the_router_as_before():
    dense = tiny_t5()
    sparse = moeify.convert(dense, moeify.MoEConfig(num_experts=4, every=1, seed=5))
    first = next(iter(switch_layers(sparse).values()))
    ffn = dense.get_submodule(next(iter(switch_layers(sparse))))
    assert all(torch.equal(first.experts.w_out[e], ffn.wo.weight) for e in range(4))
    expected = Router(16, 4)
    expected.reset_parameters(0.1, torch.Generator().manual_seed(5))  # the first draw of the seed's stream
    assert torch.equal(first.router.weight, expected.weight)


@pytest.mark.parametrize("scale, factor", [("auto", 4.0), ("2.5", 2.5), (0.5, 0.5)])
def test_the_factor_scales_w_out_and_b_out_only(scale, factor):
    dense = tiny_net()  # biased GELU MLPs
    sparse = moeify.convert(dense, moeify.MoEConfig(num_experts=4, every=1, upcycle_scale=scale))
    layer, mlp = sparse.h[0].mlp.moe, dense.h[0].mlp
    for e in range(4):
        assert torch.equal(layer.experts.w_out[e], mlp.c_proj.weight * factor)
        assert torch.equal(layer.experts.b_out[e], mlp.c_proj.bias * factor)
        assert torch.equal(layer.experts.w_in[e], mlp.c_fc.weight)
        assert torch.equal(layer.experts.b_in[e], mlp.c_fc.bias)


@pytest.mark.parametrize("moe, factor", [(dict(num_experts=8), 8.0), (dict(num_experts=8, top_k=2), 4.0),
                                         (dict(num_experts=8, top_k=2, normalize_gates=True), 1.0),
                                         (dict(upcycle_scale="none"), 1.0), (dict(upcycle_scale="3"), 3.0)])
def test_auto_is_experts_over_k_for_probability_gates_and_one_for_renormalised(moe, factor):
    assert moeify.MoEConfig(**{"upcycle_scale": "auto", **moe}).upcycle_factor == factor


@pytest.mark.parametrize("bad, message", [
    (dict(upcycle_scale="big"), "upcycle_scale must be none, auto or a positive number, got 'big': "
                                "try upcycle_scale='auto'"),
    (dict(upcycle_scale="-1"), "upcycle_scale must be none, auto or a positive number, got '-1'"),
    (dict(upcycle_scale="inf"), "upcycle_scale must be none, auto or a positive number, got 'inf'"),
    (dict(upcycle_scale=True), "upcycle_scale must be none, auto or a positive number, got True"),
    (dict(upcycle_scale="auto", init="random"), "upcycle_scale scales upcycled experts, but init='random' does "
                                                "not upcycle: drop upcycle_scale or use init='upcycle'"),
])
def test_bad_scales_are_refused_by_name(bad, message):
    with pytest.raises(moeify.MoeifyError) as e:
        moeify.MoEConfig(**bad)
    assert str(e.value).startswith(message)


def test_the_cli_flag_takes_the_string():
    from click.testing import CliRunner

    from moeify.cli import main
    from moeify.cli.common import moe_config

    assert moe_config("t5-small", {"upcycle_scale": "auto", "num_experts": 4, "top_k": 2}).upcycle_factor == 2.0
    shown = " ".join(CliRunner().invoke(main, ["convert", "--help"]).output.split())
    assert "--upcycle-scale none|auto|FLOAT Multiply upcycled experts' outputs by this" in shown
