"""hf-mixtral: converted LLaMA / Mistral -> MixtralForCausalLM giving moeify's logits and tokens, or refused by name."""
import pytest
import torch
from clitools import assert_user_error, run
from hf_decoders import (
    assert_same_generation,
    assert_same_logits,
    batch,
    converted,
    loaded,
    tiny,
    written,
)
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import moeify
from moeify.checkpoint.store import conversion_metadata
from moeify.errors import MoeifyError
from moeify.targets.hf import mixtral

MIXTRAL = dict(every=1, normalize_gates=True, dropless=True)
Z_LOSS = "Mixtral has no router z-loss: z_loss_coef (0.001) is not carried over (training only)"
POOLED = ("router_aux_loss_coef is moeify's aux_loss_coef (0.01), but transformers pools the 2 MoE layers into one "
          "load-balancing loss where moeify adds one per layer: in training it balances about 2 times less")


def llama(**overrides):
    return tiny(LlamaConfig, LlamaForCausalLM, **overrides)


def mistral(**overrides):
    return tiny(MistralConfig, MistralForCausalLM, **overrides)


# name: (dense model, top_k). Non-default rope, head_dim, tied embeddings and Mistral's sliding
# window (shorter than the batch) must all carry over for the logits to agree.
SOURCES = {
    "llama-top1": (lambda: llama(), 1),
    "llama-top2-tied-head_dim-rope_theta": (lambda: llama(tie_word_embeddings=True, head_dim=16, rope_parameters={
        "rope_type": "default", "rope_theta": 500.0}), 2),
    "mistral-top2-window-linear_rope": (lambda: mistral(sliding_window=4, rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}), 2),
}


@pytest.mark.parametrize("case", SOURCES)
def test_mixtral_gives_moeifys_logits_and_generations(case, tmp_path):
    dense, k = SOURCES[case]
    moe_model = converted(dense(), tmp_path, top_k=k, **MIXTRAL)
    ckpt = mixtral.to_hf(moe_model, {})
    c = ckpt.config
    routing = (c.num_local_experts, c.num_experts_per_tok, c.router_aux_loss_coef, c.router_jitter_noise)
    assert routing == (4, k, 1e-2, 0)
    assert ckpt.notes == [POOLED, Z_LOSS]
    hf = written(ckpt, MixtralForCausalLM, tmp_path)
    ids = batch()
    assert_same_logits(moe_model, hf, ids)
    assert_same_generation(moe_model, hf, ids[:, :4])


@torch.no_grad()
def test_the_logit_check_catches_swapped_gate_and_up_or_experts(tmp_path):
    """The tensors to_hf lays out are the only ones that agree: gate before up, experts in order."""
    moe_model = converted(llama(), tmp_path, top_k=2, **MIXTRAL)
    ckpt = mixtral.to_hf(moe_model, {})
    name, d_ff = "model.layers.1.mlp.experts.gate_up_proj", 48
    fused = ckpt.tensors[name]
    ids = batch()
    expected = moe_model(ids).logits
    for wrong in (torch.cat([fused[:, d_ff:], fused[:, :d_ff]], dim=1), fused[[1, 0, 2, 3]]):
        hf = MixtralForCausalLM(ckpt.config).eval()
        hf.load_state_dict({**ckpt.tensors, name: wrong}, strict=True)
        assert (hf(ids).logits - expected).abs().max() > 1e-2


def test_a_capacity_limited_model_is_exported_with_a_note(tmp_path):
    moe_model = converted(llama(), tmp_path, top_k=2, every=1, normalize_gates=True, eval_capacity_factor=8.0,
                          jitter=0.1)
    ckpt = mixtral.to_hf(moe_model, {})
    assert ckpt.config.router_jitter_noise == 0.1
    assert ckpt.notes == [
        "Mixtral never drops tokens, but this model was converted with a capacity limit (not dropless): outputs "
        "equal moeify's only where moeify's capacity drops none", POOLED, Z_LOSS,
        "Mixtral's router_jitter_noise scales the experts' input too, moeify's jitter only the router's: training "
        "differs, inference does not"]
    assert_same_logits(moe_model, written(ckpt, MixtralForCausalLM, tmp_path), batch())  # capacity drops none


@torch.no_grad()
def test_the_aux_loss_coefficient_carries_over_since_the_losses_agree_per_layer(tmp_path):
    moe_model = converted(llama(num_hidden_layers=1), tmp_path, top_k=2, aux_loss_coef=0.03, z_loss_coef=0.0,
                          **MIXTRAL)
    ckpt = mixtral.to_hf(moe_model, {})
    assert ckpt.notes == []  # one MoE layer: nothing pooled, no z-loss to leave out
    hf = written(ckpt, MixtralForCausalLM, tmp_path)
    ids = batch()
    with moeify.router_losses(moe_model) as routing:
        moe_model(ids)
    out = hf(ids, output_router_logits=True)
    assert hf.config.router_aux_loss_coef == 0.03
    torch.testing.assert_close(out.aux_loss, routing.aux_loss(), atol=1e-6, rtol=0)


def test_cli_exports_a_mixtral_checkpoint(tmp_path):
    moe_model = converted(mistral(), tmp_path, top_k=2, **MIXTRAL)
    result = run("export", tmp_path / "moe", "--target", "hf-mixtral", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert f"{tmp_path / 'moe'} -> {tmp_path / 'out'}: MixtralForCausalLM" in result.output
    assert f"note {Z_LOSS}" in result.output
    assert_same_logits(moe_model, loaded(MixtralForCausalLM, tmp_path / "out"), batch())


def test_cli_names_the_flags_to_convert_with(tmp_path):
    moeify.save(moeify.convert(llama(), moeify.MoEConfig(num_experts=4)), tmp_path / "moe")  # the defaults
    result = run("export", tmp_path / "moe", "--target", "hf-mixtral", "-o", tmp_path / "out")
    assert_user_error(result, tmp_path, "error: Mixtral renormalises the top-k gates and has experts in every "
                      "layer, but this model was converted with --no-normalize-gates and left 1 of 2 layers dense "
                      "(model.layers.0.mlp): convert again with --normalize-gates --every 1")


AGAIN = "convert again with normalize_gates=True every=1"
REFUSED = {
    "gates": (lambda: llama(), dict(every=1), "Mixtral renormalises the top-k gates and has experts in every layer, "
              f"but this model was converted with normalize_gates=False: {AGAIN}"),
    "every": (lambda: llama(), dict(normalize_gates=True, every=2), "Mixtral renormalises the top-k gates and has "
              f"experts in every layer, but this model left 1 of 2 layers dense (model.layers.0.mlp): {AGAIN}"),
    "layers": (lambda: llama(num_hidden_layers=4), dict(layers=r"layers\.1\."), "Mixtral renormalises the top-k "
               "gates and has experts in every layer, but this model was converted with normalize_gates=False and "
               "left 3 of 4 layers dense (model.layers.0.mlp, model.layers.2.mlp, ...): "
               f"{AGAIN} and without layers"),
    "attention_bias": (lambda: llama(attention_bias=True), MIXTRAL, "Mixtral has no attention biases, but this "
                       "LlamaForCausalLM has attention_bias=True: export it to onnx instead"),
    "mlp_bias": (lambda: llama(mlp_bias=True), MIXTRAL, "Mixtral has no MLP biases, but this LlamaForCausalLM has "
                 "mlp_bias=True: export it to onnx instead"),
    "qwen3": (lambda: tiny(Qwen3Config, Qwen3ForCausalLM), MIXTRAL, "hf-mixtral exports converted LlamaForCausalLM "
              "or MistralForCausalLM models, not Qwen3ForCausalLM: export it with the hf-qwen3-moe target"),
    "gpt2": (lambda: GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64)), MIXTRAL,
             "hf-mixtral exports converted LlamaForCausalLM or MistralForCausalLM models, not GPT2LMHeadModel: "
             "`moeify export --help` lists the targets that accept it"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_mixtral_cannot_express_is_refused_by_name(case):
    dense, moe, message = REFUSED[case]
    model = moeify.convert(dense(), moeify.MoEConfig(num_experts=4, **moe))
    with pytest.raises(MoeifyError) as e:
        mixtral.refuse(conversion_metadata(model), {})
    assert str(e.value) == message
    with pytest.raises(MoeifyError) as e:  # to_hf checks the same, for Python callers
        mixtral.to_hf(model, {})
    assert str(e.value) == message


def test_moefied_experts_are_exported_at_their_width(tmp_path):
    """--init moefy: experts d_ff / E wide, and every Mixtral layer sparse, so intermediate_size is theirs."""
    moe_model = converted(llama(), tmp_path, top_k=2, init="moefy", **MIXTRAL)
    ckpt = mixtral.to_hf(moe_model, {})
    assert ckpt.config.intermediate_size == 12  # LLaMA's 48 neurons in 4 experts
    assert_same_logits(moe_model, written(ckpt, MixtralForCausalLM, tmp_path), batch())
