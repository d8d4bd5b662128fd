import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_net, tiny_t5
from torch import nn
from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel

from moeify.conversion.find_ffn import find_ffns, find_in_region
from moeify.conversion.regions import capture, trace_region


def sites_by_region(model):
    out = {}
    for region in capture(model):
        if region.graph_module is not None:
            region.graph_module.graph.lint()
            found, _ = find_in_region(region)
            if found:
                out[region.name] = found
    return out


def test_t5_v1_0_relu_ffn():
    sites = sites_by_region(tiny_t5("relu"))
    assert len(sites) == 8  # 4 encoder + 4 decoder blocks
    (site,) = sites["encoder.block.0.layer.1.DenseReluDense"]
    assert site.nodes == ("wi", "act", "dropout", "wo")
    assert (site.w_in, site.w_gate, site.w_out) == ("wi", None, "wo")
    assert (site.d_model, site.d_ff, site.bias, site.whole_region) == (16, 32, False, True)
    assert type(site.activation).__name__ == "ReLU"
    assert "decoder.block.3.layer.2.DenseReluDense" in sites


def test_t5_v1_1_gated_gelu_ffn():
    sites = sites_by_region(tiny_t5("gated-gelu"))
    (site,) = sites["decoder.block.1.layer.2.DenseReluDense"]
    assert site.nodes == ("wi_0", "act", "wi_1", "mul", "dropout", "wo")
    assert (site.w_in, site.w_gate, site.w_out) == ("wi_1", "wi_0", "wo")
    assert type(site.activation).__name__ == "NewGELUActivation" and site.gated


def test_custom_mlp_with_functional_gelu_and_trailing_dropout():
    sites = sites_by_region(tiny_net())
    assert list(sites) == ["h.0.mlp", "h.1.mlp", "h.2.mlp", "h.3.mlp"]
    (site,) = sites["h.2.mlp"]
    assert site.nodes == ("c_fc", "gelu", "c_proj")  # the residual dropout stays outside
    assert site.name == "h.2.mlp.moe" and not site.whole_region
    assert site.bias and site.out_bias
    assert site.activation.kwargs == {"approximate": "tanh"}


def test_gpt2_conv1d_and_llama_gated_silu():
    gpt2 = GPT2Model(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0))
    (site,) = sites_by_region(gpt2)["h.1.mlp"]
    assert site.nodes == ("c_fc", "act", "c_proj") and (site.d_model, site.d_ff) == (16, 64)
    llama = LlamaModel(LlamaConfig(hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, vocab_size=50))
    (site,) = sites_by_region(llama)["layers.0.mlp"]
    assert site.nodes == ("gate_proj", "act_fn", "up_proj", "mul", "down_proj")
    assert (site.w_gate, site.w_in, site.w_out) == ("gate_proj", "up_proj", "down_proj")
    assert site.whole_region


def test_find_ffns_returns_sites_in_module_order_and_every_rejection():
    sparse_candidates = capture(tiny_t5("relu"))
    search = find_ffns(sparse_candidates)
    assert [s.region for s in search.sites] == [f"encoder.block.{i}.layer.1.DenseReluDense" for i in range(4)] + \
        [f"decoder.block.{i}.layer.2.DenseReluDense" for i in range(4)]
    attention = {name: why for name, why in search.rejected.items() if name.endswith("SelfAttention")}
    assert len(attention) == 8 and all(why.startswith("T5Attention could not be traced") for why in attention.values())
    assert set(search.rejected) | {s.region for s in search.sites} == {r.name for r in sparse_candidates}


class Leaky(nn.Module):
    """The hidden activation is also returned: not self-contained."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.a(x))
        return self.b(h), h


class WrongDims(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 6)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


class NoActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)) + 1)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(F.relu(self.a(x))) + self.a(x).sum()


@pytest.mark.parametrize("module,reason", [
    (Leaky(), "also used by"),
    (WrongDims(), "maps 8->6, expected 8->4"),
    (NoActivation(), "not an activation"),
    (Shared(), "called more than once"),
])
def test_rejections_say_why(module, reason):
    found, reasons = find_in_region(trace_region("", module))
    assert found == []
    assert any(reason in r for r in reasons), reasons
