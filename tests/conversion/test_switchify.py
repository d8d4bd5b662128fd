import copy

import pytest
import torch
from tiny import MLP, t5_batch, tiny_net, tiny_t5
from torch import nn

import moeify
from moeify.conversion.switchify import ORIGIN_KEY
from moeify.layers import SwitchFFN

EXACT = dict(num_experts=1, every=1, capacity_factor=64.0, eval_capacity_factor=64.0)


@pytest.mark.parametrize("ff", ["relu", "gated-gelu"])
@pytest.mark.parametrize("training", [False, True])
def test_one_expert_conversion_preserves_t5(ff, training):
    dense = tiny_t5(ff).train(training)  # dropout_rate is 0, so train mode is deterministic
    sparse = moeify.convert(dense, moeify.MoEConfig(**EXACT)).train(training)
    batch = t5_batch()
    torch.testing.assert_close(sparse(**batch).logits, dense(**batch).logits, rtol=1e-5, atol=1e-6)
    assert sum(isinstance(m, SwitchFFN) for m in sparse.modules()) == 8


def test_one_expert_conversion_preserves_a_custom_module():
    dense = tiny_net()
    sparse = moeify.convert(dense, moeify.MoEConfig(**EXACT))
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(sparse(x), dense(x), rtol=1e-5, atol=1e-6)
    assert isinstance(sparse.h[0].mlp.moe, SwitchFFN)


def test_a_bare_mlp_becomes_a_switch_layer():
    dense = MLP().eval()
    sparse = moeify.convert(dense, moeify.MoEConfig(**EXACT))
    x = torch.randn(4, 8)
    torch.testing.assert_close(sparse(x), dense(x), rtol=1e-5, atol=1e-6)


def test_input_model_is_untouched():
    dense = tiny_t5()
    before = copy.deepcopy(dense.state_dict())
    moeify.convert(dense, moeify.MoEConfig(num_experts=4))
    assert not any(isinstance(m, SwitchFFN) for m in dense.modules())
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())


def test_upcycled_kept_tokens_are_gate_times_dense_ffn():
    dense = tiny_t5()
    sparse = moeify.convert(dense, moeify.MoEConfig(num_experts=4, every=1, eval_capacity_factor=64.0)).eval()
    name = "encoder.block.2.layer.1.DenseReluDense"
    ffn, layer = dense.get_submodule(name), sparse.get_submodule(name)
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        gate = layer.router(x.reshape(-1, 16)).gate.reshape(2, 6, 1)
        torch.testing.assert_close(layer(x), gate * ffn(x), rtol=1e-5, atol=1e-6)
    for e in range(4):
        assert torch.equal(layer.experts.w_in[e], ffn.wi.weight)
        assert torch.equal(layer.experts.w_out[e], ffn.wo.weight)


def test_random_init_follows_the_paper_and_is_seeded():
    a = moeify.convert(tiny_t5(), moeify.MoEConfig(num_experts=4, init="random", seed=7))
    b = moeify.convert(tiny_t5(), moeify.MoEConfig(num_experts=4, init="random", seed=7))
    name = "encoder.block.1.layer.1.DenseReluDense"
    wa, wb = a.get_submodule(name).experts.w_in, b.get_submodule(name).experts.w_in
    assert torch.equal(wa, wb)
    std = (0.1 / 16) ** 0.5  # init scale 0.1, fan_in d_model = 16
    assert wa.abs().max() <= 2 * std + 1e-7
    assert not torch.equal(wa[0], tiny_t5().get_submodule(name).wi.weight)


def test_upcycle_noise_breaks_symmetry():
    sparse = moeify.convert(tiny_t5(), moeify.MoEConfig(num_experts=3, upcycle_noise=0.1))
    w = sparse.get_submodule("encoder.block.1.layer.1.DenseReluDense").experts.w_in
    assert not torch.equal(w[0], w[1])


def test_rewritten_graph_records_origin():
    sparse = moeify.convert(tiny_net(), moeify.MoEConfig(num_experts=2, every=1))
    gm = sparse.h[1].mlp
    gm.graph.lint()
    ops = [(n.op, n.target) for n in gm.graph.nodes]
    assert ops == [("placeholder", "x"), ("call_module", "moe"), ("call_module", "dropout"), ("output", "output")]
    call = next(n for n in gm.graph.nodes if n.target == "moe")
    assert call.meta[ORIGIN_KEY] == {"pass": "switchify", "site": "h.1.mlp.moe",
                                     "replaced": ["c_fc", "gelu", "c_proj"]}
    assert not hasattr(gm, "c_fc")  # dense weights are gone from the converted module


def test_expert_dropout_overrides_the_dense_rate():
    sparse = moeify.convert(tiny_t5(dropout_rate=0.1), moeify.MoEConfig(num_experts=2, expert_dropout=0.4))
    layer = sparse.get_submodule("encoder.block.1.layer.1.DenseReluDense")
    assert layer.experts.dropout.p == 0.4
    kept = moeify.convert(tiny_t5(dropout_rate=0.1), moeify.MoEConfig(num_experts=2))
    assert kept.get_submodule("encoder.block.1.layer.1.DenseReluDense").experts.dropout.p == 0.1


class NoFFN(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.q(x) @ self.k(x).transpose(-1, -2)


def test_a_model_without_ffn_is_refused_with_reasons():
    with pytest.raises(moeify.NoMatchError, match=r"no dense FFN found in NoFFN.*'k' is fed by placeholder x"):
        moeify.convert(NoFFN())
    with pytest.raises(moeify.NoMatchError, match="no module has two Linear children"):
        moeify.convert(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))


def test_one_expert_conversion_preserves_gpt2_and_llama():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, bos_token_id=0,
                                      eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=50)).eval()
    ids = torch.randint(0, 50, (2, 6))
    for dense in (gpt2, llama):
        sparse = moeify.convert(dense, moeify.MoEConfig(**EXACT)).eval()
        assert len(sparse.moeify_record.sites) == 2
        torch.testing.assert_close(sparse(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_a_conversion_initialises_each_layer_once(monkeypatch):
    """The layers are built on meta and given memory, so the only init is the conversion's (its seed, its scale)."""
    from moeify.layers.experts import Experts
    from moeify.layers.router import Router

    calls = []
    for cls in (Router, Experts):
        def spy(self, *args, real=cls.reset_parameters, name=cls.__name__, **kwargs):
            calls.append((name, args[0] if args else kwargs.get("scale")))
            return real(self, *args, **kwargs)
        monkeypatch.setattr(cls, "reset_parameters", spy)
    sparse = moeify.convert(tiny_t5(), moeify.MoEConfig(num_experts=4, init="random", seed=7, init_scale=0.2))
    layers = sum(isinstance(m, SwitchFFN) for m in sparse.modules())
    assert layers == 4 and calls == [("Router", 0.2), ("Experts", 0.2)] * layers
