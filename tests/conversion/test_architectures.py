"""Every dense architecture moeify matches, built tiny: which FFN, parity, training, save/load, meta counts."""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import transformers as T
from tiny import tiny_net, tiny_t5_config
from torch import nn

import moeify
from moeify.conversion.regions import capture
from moeify.layers import SwitchFFN

V, D, F = 64, 16, 32  # vocabulary, d_model, d_ff of every tiny model below
ONE_EXPERT = dict(num_experts=1, every=1, capacity_factor=64.0, eval_capacity_factor=64.0)
PARITY_BOUND = 1e-5  # max |logits difference| of a one-expert conversion (measured values in the README)


def ids(seq: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, V, (2, seq), generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class Arch:
    """A tiny model of one architecture and what moeify must find in it."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict]
    sites: list[str]  # converted site names with every=1
    nodes: tuple[str, ...]  # the first site's matched nodes
    expert_params: int  # one expert's parameters: weights and biases
    moe_layers: int  # FFNs converted with every=1 (each adds (E-1) experts and a router)


def _lm(config_cls, model_cls, **kw) -> Callable[[], nn.Module]:
    return lambda: model_cls(config_cls(**kw))


def _causal(**kw) -> dict:
    return dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                **kw)


def _layers(prefix: str, n: int = 2, suffix: str = "") -> list[str]:
    return [f"{prefix}.{i}{suffix}" for i in range(n)]


GATED = 3 * D * F  # gate, input and output weights, no biases
PLAIN_BIASED = 2 * D * F + F + D

ARCHS = [
    Arch("t5", lambda: T.T5ForConditionalGeneration(tiny_t5_config(num_layers=2, d_model=D, d_ff=F)),
         lambda: dict(input_ids=ids(), decoder_input_ids=ids(5, 1)),
         _layers("encoder.block", suffix=".layer.1.DenseReluDense")
         + _layers("decoder.block", suffix=".layer.2.DenseReluDense"),
         ("wi", "act", "dropout", "wo"), 2 * D * F, 4),
    Arch("gpt2", _lm(T.GPT2Config, T.GPT2LMHeadModel, vocab_size=V, n_embd=D, n_inner=F, n_layer=2, n_head=2,
                     n_positions=32, bos_token_id=1, eos_token_id=2),
         lambda: dict(input_ids=ids()), _layers("transformer.h", suffix=".mlp.moe"),
         ("c_fc", "act", "c_proj"), PLAIN_BIASED, 2),
    Arch("bert", _lm(T.BertConfig, T.BertForMaskedLM, vocab_size=V, hidden_size=D, intermediate_size=F,
                     num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32),
         lambda: dict(input_ids=ids(), attention_mask=torch.ones(2, 7, dtype=torch.long)),
         _layers("bert.encoder.layer", suffix=".moe"),
         ("intermediate_dense", "intermediate_intermediate_act_fn", "output_dense"), PLAIN_BIASED, 2),
    Arch("roberta", _lm(T.RobertaConfig, T.RobertaForMaskedLM, vocab_size=V, hidden_size=D, intermediate_size=F,
                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32, pad_token_id=1),
         lambda: dict(input_ids=ids()), _layers("roberta.encoder.layer", suffix=".moe"),
         ("intermediate_dense", "intermediate_intermediate_act_fn", "output_dense"), PLAIN_BIASED, 2),
    Arch("vit", _lm(T.ViTConfig, T.ViTForImageClassification, hidden_size=D, intermediate_size=F,
                    num_hidden_layers=2, num_attention_heads=2, image_size=8, patch_size=4, num_labels=3),
         lambda: dict(pixel_values=torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))),
         _layers("vit.layers", suffix=".mlp"), ("fc1", "activation_fn", "fc2"), PLAIN_BIASED, 2),
    Arch("distilbert", _lm(T.DistilBertConfig, T.DistilBertForMaskedLM, vocab_size=V, dim=D, hidden_dim=F,
                           n_layers=2, n_heads=2, max_position_embeddings=32),
         lambda: dict(input_ids=ids()), _layers("distilbert.transformer.layer", suffix=".ffn.moe"),
         ("lin1", "activation", "lin2"), PLAIN_BIASED, 2),
    Arch("bart", _lm(T.BartConfig, T.BartForConditionalGeneration, vocab_size=V, d_model=D, encoder_ffn_dim=F,
                     decoder_ffn_dim=F, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                     decoder_attention_heads=2, max_position_embeddings=32),
         lambda: dict(input_ids=ids(), decoder_input_ids=ids(5, 1)),
         _layers("model.encoder.layers", suffix=".moe") + _layers("model.decoder.layers", suffix=".moe"),
         ("fc1", "activation_fn", "dropout_1", "fc2"), PLAIN_BIASED, 4),
    Arch("whisper", _lm(T.WhisperConfig, T.WhisperForConditionalGeneration, vocab_size=V, d_model=D,
                        encoder_ffn_dim=F, decoder_ffn_dim=F, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=2, decoder_attention_heads=2, num_mel_bins=8,
                        max_source_positions=8, max_target_positions=16, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, decoder_start_token_id=1),
         lambda: dict(input_features=torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0)),
                      decoder_input_ids=ids(5, 1)),
         _layers("model.encoder.layers", suffix=".moe") + _layers("model.decoder.layers", suffix=".moe"),
         ("fc1", "activation_fn", "dropout_1", "fc2"), PLAIN_BIASED, 4),
    Arch("opt", _lm(T.OPTConfig, T.OPTForCausalLM, vocab_size=V, hidden_size=D, ffn_dim=F, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=D, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2),
         lambda: dict(input_ids=ids()), _layers("model.decoder.layers", suffix=".moe"),
         ("fc1", "activation_fn", "fc2"), PLAIN_BIASED, 2),
    Arch("phi3", _lm(T.Phi3Config, T.Phi3ForCausalLM, **_causal()),
         lambda: dict(input_ids=ids()), _layers("model.layers", suffix=".mlp"),
         ("gate_up_proj", "chunk", "getitem", "getitem_1", "activation_fn", "mul", "down_proj"), GATED, 2),
    *(Arch(name, _lm(config, model, **_causal(**extra)), lambda: dict(input_ids=ids()),
           _layers("model.layers", suffix=".mlp"), ("gate_proj", "act_fn", "up_proj", "mul", "down_proj"), GATED, 2)
      for name, config, model, extra in [
          ("llama", T.LlamaConfig, T.LlamaForCausalLM, {}),
          ("mistral", T.MistralConfig, T.MistralForCausalLM, {}),
          ("qwen2", T.Qwen2Config, T.Qwen2ForCausalLM, {}),
          ("qwen3", T.Qwen3Config, T.Qwen3ForCausalLM, dict(head_dim=8)),
          ("gemma", T.GemmaConfig, T.GemmaForCausalLM, dict(head_dim=8, hidden_activation="gelu_pytorch_tanh")),
      ]),
    Arch("nanogpt", tiny_net, lambda: dict(x=torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))),
         _layers("h", 4, ".mlp.moe"), ("c_fc", "gelu", "c_proj"), 2 * 8 * 32 + 32 + 8, 4),
]
BY_NAME = {a.name: a for a in ARCHS}


def dense(arch: Arch, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return arch.build().eval()


def output(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def one_expert_gap(arch: Arch) -> float:
    """max |logits(one-expert conversion) - logits(dense)|, in eval mode with room for every token."""
    model = dense(arch)
    sparse = moeify.convert(model, moeify.MoEConfig(**ONE_EXPERT)).eval()
    inputs = arch.inputs()
    with torch.no_grad():
        return (output(sparse, inputs) - output(model, inputs)).abs().max().item()


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_the_ffn_is_found_where_expected(arch):
    sparse = moeify.convert(dense(arch), moeify.MoEConfig(num_experts=2, every=1))
    record = sparse.moeify_record
    assert record.site_names == arch.sites
    assert record.sites[0].nodes == arch.nodes
    assert [type(sparse.get_submodule(name)) for name in arch.sites] == [SwitchFFN] * len(arch.sites)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_one_expert_conversion_equals_the_dense_model(arch):
    assert one_expert_gap(arch) < PARITY_BOUND


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_eight_experts_train_and_round_trip_bit_identically(arch, tmp_path):
    model = dense(arch)
    sparse = moeify.convert(model, moeify.MoEConfig(num_experts=8, every=1, upcycle_noise=0.1)).train()
    inputs = arch.inputs()
    output(sparse, inputs).float().pow(2).mean().backward()
    routers = [sparse.get_submodule(f"{name}.router").weight for name in arch.sites]
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in routers)
    sparse.eval()
    moeify.save(sparse, tmp_path / "moe")
    fresh = {"model": dense(arch, seed=1)} if arch.name == "nanogpt" else {}  # not rebuildable from a config
    again = moeify.load(tmp_path / "moe", **fresh).eval()
    assert again.moeify_record.site_names == arch.sites
    with torch.no_grad():
        assert torch.equal(output(again, inputs), output(sparse, inputs))


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_meta_conversion_adds_exactly_the_experts_and_routers(arch):
    with torch.device("meta"):
        model = dense(arch)
    dense_params = sum(p.numel() for p in model.parameters())
    sparse = moeify.convert(model, moeify.MoEConfig(num_experts=8, every=1))
    d_model = 8 if arch.name == "nanogpt" else D
    expected = dense_params + arch.moe_layers * (7 * arch.expert_params + d_model * 8)
    assert sum(p.numel() for p in sparse.parameters()) == expected


# Selection: encoder and decoder are two stacks, each counted from its first FFN.

@pytest.mark.parametrize("name", ["bart", "whisper"])
def test_every_and_offset_count_ffns_per_stack(name):
    model = dense(BY_NAME[name])
    sparse = moeify.convert(model, moeify.MoEConfig(num_experts=2, every=2, offset=1))
    assert sparse.moeify_record.site_names == ["model.encoder.layers.1.moe", "model.decoder.layers.1.moe"]
    assert sparse.moeify_record.skipped == ["model.encoder.layers.0", "model.decoder.layers.0"]
    with pytest.raises(moeify.MoeifyError, match=re.escape(
            "offset=2 is past the last FFN of model.encoder.layers (2 FFNs, indices 0..1): use an offset below 2")):
        moeify.convert(model, moeify.MoEConfig(num_experts=2, every=2, offset=2))


# A split FFN (BertIntermediate -> BertOutput): only Linear -> act -> Linear becomes the Switch layer.

def test_a_split_ffn_keeps_dropout_residual_and_layernorm_where_they_were():
    model = dense(BY_NAME["bert"])
    regions = {r.name: r for r in capture(model)}
    assert regions["bert.encoder.layer.0"].inlined == ("intermediate", "output")  # attention stays a leaf
    assert "bert.encoder.layer.0.intermediate" not in regions  # one Linear: no region of its own
    sparse = moeify.convert(model, moeify.MoEConfig(num_experts=2, every=1))
    layer = sparse.bert.encoder.layer[0]
    ops = [(n.op, getattr(n.target, "__name__", n.target)) for n in layer.graph.nodes if n.op != "placeholder"]
    assert ops == [("get_attr", "attention"), ("call_function", "call_forwarding"), ("call_function", "getitem"),
                   ("call_module", "moe"), ("call_module", "output.dropout"), ("call_function", "add"),
                   ("call_module", "output.LayerNorm"), ("output", "output")]
    assert [n for n, _ in layer.named_children()] == ["attention", "output", "moe"]
    assert [k for k in layer.state_dict() if not k.startswith("attention.")] == [
        "output.LayerNorm.weight", "output.LayerNorm.bias", "moe.router.weight", "moe.experts.w_in",
        "moe.experts.w_out", "moe.experts.b_in", "moe.experts.b_out"]


def test_rewritten_layers_keep_their_class_attributes_and_hidden_states():
    model = dense(BY_NAME["bert"])
    sparse = moeify.convert(model, moeify.MoEConfig(**ONE_EXPERT)).eval()
    layer = sparse.bert.encoder.layer[1]
    assert isinstance(layer, T.models.bert.modeling_bert.BertLayer) and layer.chunk_size_feed_forward == 0
    assert isinstance(copy.deepcopy(sparse).bert.encoder.layer[1], T.models.bert.modeling_bert.BertLayer)
    inputs = BY_NAME["bert"].inputs()
    with torch.no_grad():
        # transformers records hidden states with hooks on every BertLayer: the rewritten ones too.
        expected = model(**inputs, output_hidden_states=True).hidden_states
        got = sparse(**inputs, output_hidden_states=True).hidden_states
    assert len(got) == len(expected) == 3
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=PARITY_BOUND)


def test_the_forwards_kwargs_reach_the_attention():
    sparse = moeify.convert(dense(BY_NAME["bert"]), moeify.MoEConfig(num_experts=2, every=1))
    layer = sparse.bert.encoder.layer[0]
    seen = {}
    layer.attention.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    layer(torch.randn(2, 7, D), None, position_ids=torch.arange(7))
    assert sorted(seen) == ["cache", "position_ids"] and torch.equal(seen["position_ids"], torch.arange(7))


def test_dropout_follows_train_and_eval_after_conversion():
    """BART calls F.dropout(..., training=self.training): the traced graph reads the flag when it runs."""
    torch.manual_seed(0)
    model = T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=V, d_model=D, encoder_ffn_dim=F, decoder_ffn_dim=F, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, max_position_embeddings=32, dropout=0.3,
        attention_dropout=0.0, activation_dropout=0.0))
    sparse = moeify.convert(model, moeify.MoEConfig(**ONE_EXPERT))
    inputs = BY_NAME["bart"].inputs()
    model.train(), sparse.train()
    runs = []
    for m, seed in ((model, 5), (sparse, 5), (sparse, 6)):
        torch.manual_seed(seed)
        runs.append(m(**inputs).logits)
    # the same dropout masks: equal up to the GEMMs' rounding (oneDNN's and MKL's sums differ in order on AVX2)
    torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=PARITY_BOUND)
    assert not torch.allclose(runs[1], runs[2], rtol=0, atol=100 * PARITY_BOUND)
    model.eval(), sparse.eval()
    assert torch.equal(sparse(**inputs).logits, sparse(**inputs).logits)
    torch.testing.assert_close(sparse(**inputs).logits, model(**inputs).logits, rtol=0, atol=PARITY_BOUND)


def test_an_optional_argument_the_forward_branches_on_must_be_given():
    """BartDecoderLayer runs cross-attention only `if encoder_hidden_states is not None`: fx traced that
    branch, so a call without it is refused instead of running cross-attention on None."""
    sparse = moeify.convert(dense(BY_NAME["bart"]), moeify.MoEConfig(num_experts=2, every=1))
    decoder_layer, encoder_layer = sparse.model.decoder.layers[0], sparse.model.encoder.layers[0]
    assert "require_given" in decoder_layer.code and "require_given" not in encoder_layer.code
    with pytest.raises(moeify.MoeifyError, match=re.escape(
            "model.decoder.layers.0 (BartDecoderLayer) was converted for calls that pass encoder_hidden_states, "
            "and this call passes None (its forward branches on it): pass encoder_hidden_states, or leave this "
            "layer dense with --layers")):
        decoder_layer(torch.randn(2, 5, D))


def test_a_fused_gate_up_projection_gives_each_expert_split_halves():
    from moeify.conversion.dense_weights import dense_ffn

    model = dense(BY_NAME["phi3"])
    sparse = moeify.convert(model, moeify.MoEConfig(num_experts=2, every=1))
    site = sparse.moeify_record.sites[0]
    assert (site.w_gate, site.w_in, site.w_out, site.halves, site.d_ff) == (
        "gate_up_proj", "gate_up_proj", "down_proj", (0, 1), F)
    mlp = model.model.layers[0].mlp  # Phi3MLP: gate, up = gate_up_proj(x).chunk(2, dim=-1)
    weights = dense_ffn(site, dict(mlp.named_modules()))
    fused = mlp.gate_up_proj.weight
    assert torch.equal(weights.w_gate, fused[:F]) and torch.equal(weights.w_in, fused[F:])
    assert weights.w_gate.data_ptr() == fused.data_ptr()  # views, never copies
    experts = sparse.model.layers[0].mlp.experts
    assert all(torch.equal(experts.w_gate[e], fused[:F]) and torch.equal(experts.w_in[e], fused[F:]) for e in range(2))


# When nothing matches, the closest candidate and the step that failed.

class Intermediate(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(D, F)

    def forward(self, x):
        return torch.tanh(self.dense(x))  # tanh is no FFN activation


class Output(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense, self.norm = nn.Linear(F, D), nn.LayerNorm(D)

    def forward(self, h, x):
        return self.norm(self.dense(h) + x)


class SplitLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.intermediate, self.output = Intermediate(), Output()

    def forward(self, x):
        return self.output(self.intermediate(x), x)


class FusedMLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.gate_up, self.down = nn.Linear(D, 2 * F), nn.Linear(F, D)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=self.dim)
        return self.down(nn.functional.silu(gate) * up)


@pytest.mark.parametrize("model,closest", [
    (SplitLayer(), "<root>: SplitLayer: 'intermediate.dense' is fed by placeholder x, not an activation; "
                   "'output.dense' is fed by call_function tanh, not an activation"),
    (FusedMLP(dim=0), "<root>: FusedMLP: 'gate_up' is fed by placeholder x, not an activation; getitem_1: the other "
                      "factor of the gate is not a Linear, nor half of one (x.chunk(2, dim=-1))"),
])
def test_unmatched_shapes_name_the_closest_candidate_and_the_failed_step(model, closest):
    with pytest.raises(moeify.NoMatchError) as e:
        moeify.convert(model)
    assert str(e.value) == (f"no dense FFN found in {type(model).__name__}: no module computes Linear -> activation "
                            f"-> Linear in its own forward (1 candidates; closest: {closest})")
    fused = moeify.convert(FusedMLP(dim=-1), moeify.MoEConfig(num_experts=2, every=1))  # the last dim matches
    assert fused.moeify_record.sites[0].halves == (0, 1)
