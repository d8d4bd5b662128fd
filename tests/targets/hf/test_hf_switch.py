"""hf-switch: converted T5 v1.0 -> SwitchTransformersForConditionalGeneration, moeify's logits, or refused by name."""
import pytest
import torch
from clitools import assert_user_error, run, unfolded
from hf_decoders import converted, loaded, written
from tiny import t5_batch, tiny_t5
from transformers import LlamaConfig, LlamaForCausalLM, SwitchTransformersForConditionalGeneration

import moeify
from moeify.checkpoint.hf_switch import sparse_positions, sparse_step
from moeify.checkpoint.store import conversion_metadata
from moeify.errors import MoeifyError
from moeify.targets.hf import switch

SWITCH = SwitchTransformersForConditionalGeneration
FLAGS = {"seq_len": 64}


def sparse_blocks(model) -> tuple[list[int], list[int]]:
    return ([i for i, b in enumerate(model.encoder.block) if b.is_sparse],
            [i for i, b in enumerate(model.decoder.block) if b.is_sparse])


@torch.no_grad()
def assert_same_logits(moe_model, hf_model, batch=None) -> None:
    """Equal logits (float32, atol 1e-4) where moeify dropped no token."""
    batch = batch or t5_batch()
    with moeify.router_losses(moe_model) as routing:
        expected = moe_model(**batch).logits
    assert routing.layers and sum(r.dropped for r in routing.layers) == 0
    torch.testing.assert_close(hf_model(**batch).logits, expected, atol=1e-4, rtol=0)


def capacity_note(capacity, how):
    return (f"expert_capacity {capacity} (from {how}) limits each expert per sequence, in training too, where "
            "moeify's capacity factors limit it per batch: outputs agree wherever neither drops a token")


# name: (dense T5, MoE options, sparse encoder / decoder blocks transformers must build,
#        num_sparse_encoder_layers / num_sparse_decoder_layers)
LAYOUTS = {
    "every-2": (dict(), dict(every=2), ([1, 3], [1, 3]), (2, 2)),
    "every-1": (dict(), dict(every=1), ([0, 1, 2, 3], [0, 1, 2, 3]), (4, 4)),
    # Each stack its own step: the encoder every other FFN, the decoder every FFN.
    "regex-two-steps": (dict(), dict(layers=r"^encoder\.block\.(1|3)\.|^decoder\."), ([1, 3], [0, 1, 2, 3]), (2, 4)),
    # No Switch layer in the decoder: more sparse layers than layers makes transformers' step 0.
    "encoder-only": (dict(), dict(layers=r"^encoder\.block\.1\."), ([1], []), (1, 5)),
    # Decoder deeper than the encoder; untied embeddings: no d_model**-0.5 scaling, lm_head its own copy.
    "deeper-decoder-untied": (dict(num_decoder_layers=6, tie_word_embeddings=False), dict(every=3, offset=1),
                              ([1], [1, 4]), (1, 2)),
}


@pytest.mark.parametrize("case", LAYOUTS)
def test_switch_gives_moeifys_logits_with_the_converted_layers_sparse(case, tmp_path):
    dense, moe, blocks, layout = LAYOUTS[case]
    moe_model = converted(tiny_t5(**dense), tmp_path, eval_capacity_factor=8.0, **moe)
    ckpt = switch.to_hf(moe_model, FLAGS)
    c = ckpt.config
    assert (c.num_sparse_encoder_layers, c.num_sparse_decoder_layers) == layout
    assert (c.num_experts, c.expert_capacity, c.router_jitter_noise) == (4, 128, 0.0)
    assert (c.router_aux_loss_coef, c.router_z_loss_coef, c.router_dtype) == (1e-2, 1e-3, "float32")
    assert c.tie_word_embeddings == dense.get("tie_word_embeddings", True)
    assert ckpt.notes == [capacity_note(128, "seq_len 64 and eval capacity factor 8.0")]
    hf = written(ckpt, SWITCH, tmp_path)
    assert sparse_blocks(hf) == blocks
    assert_same_logits(moe_model, hf)


def test_the_sparse_layers_are_transformers_own_rule():
    """sparse_positions is what SwitchTransformersStack builds, for every depth and count."""
    from transformers import SwitchTransformersConfig

    for layers in range(1, 7):
        for count in range(0, layers + 2):
            config = SwitchTransformersConfig(vocab_size=8, d_model=4, d_ff=4, d_kv=2, num_heads=2, num_experts=2,
                                              num_layers=layers, num_decoder_layers=layers,
                                              num_sparse_encoder_layers=count, num_sparse_decoder_layers=count)
            with torch.device("meta"):
                model = SWITCH(config)
            expected = list(sparse_positions(layers, sparse_step(layers, count)))
            assert sparse_blocks(model) == (expected, expected), (layers, count)


@torch.no_grad()
def test_the_logit_check_catches_swapped_experts(tmp_path):
    """Experts differ (upcycled with noise), so the tensors to_hf lays out are the only ones that agree."""
    moe_model = converted(tiny_t5(), tmp_path, every=1, eval_capacity_factor=8.0)
    ckpt = switch.to_hf(moe_model, FLAGS)
    batch = t5_batch()
    expected = moe_model(**batch).logits
    name = "encoder.block.0.layer.1.mlp.experts.expert_{}.wi.weight"
    hf = SWITCH(ckpt.config).eval()
    hf.load_state_dict({**ckpt.tensors, name.format(0): ckpt.tensors[name.format(1)],
                        name.format(1): ckpt.tensors[name.format(0)]}, strict=True)
    assert (hf(**batch).logits - expected).abs().max() > 1e-2


def test_a_dropless_model_gets_a_whole_sequence_of_capacity(tmp_path):
    moe_model = converted(tiny_t5(), tmp_path, every=2, dropless=True, jitter=0.1, aux_loss_coef=0.03,
                          z_loss_coef=0.0)
    ckpt = switch.to_hf(moe_model, FLAGS)
    c = ckpt.config
    assert (c.expert_capacity, c.router_jitter_noise, c.router_aux_loss_coef, c.router_z_loss_coef) == (
        64, 0.1, 0.03, 0.0)
    assert ckpt.notes == [capacity_note(64, "seq_len 64, as the model is dropless")]
    assert_same_logits(moe_model, written(ckpt, SWITCH, tmp_path))


def test_a_bfloat16_model_stores_its_router_in_bfloat16_with_a_note(tmp_path):
    moe_model = converted(tiny_t5(), tmp_path, every=2).to(torch.bfloat16)
    ckpt = switch.to_hf(moe_model, FLAGS)
    router = "encoder.block.1.layer.1.mlp.router.classifier.weight"
    assert ckpt.config.dtype == ckpt.tensors[router].dtype == torch.bfloat16
    assert ckpt.notes[1:] == ["the router weight is stored in bfloat16, the model's dtype, as SwitchTransformers "
                              "keeps it (it routes in float32): near-tied experts may be chosen differently"]
    assert written(ckpt, SWITCH, tmp_path).dtype == torch.bfloat16


def test_cli_exports_a_switch_checkpoint(tmp_path):
    moe_model = converted(tiny_t5(), tmp_path, every=2, eval_capacity_factor=8.0)
    result = run("export", tmp_path / "moe", "--target", "hf-switch", "--seq-len", 64, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert f"{tmp_path / 'moe'} -> {tmp_path / 'out'}: SwitchTransformersForConditionalGeneration" in result.output
    assert unfolded("note " + capacity_note(128, "seq_len 64 and eval capacity factor 8.0")) in unfolded(result.output)
    hf = loaded(SWITCH, tmp_path / "out")
    assert hf.config.expert_capacity == 128
    assert_same_logits(moe_model, hf)


def test_cli_names_the_selection_to_convert_with(tmp_path):
    moeify.save(moeify.convert(tiny_t5(), moeify.MoEConfig(num_experts=4, every=2, offset=0)), tmp_path / "moe")
    result = run("export", tmp_path / "moe", "--target", "hf-switch", "-o", tmp_path / "out")
    assert_user_error(result, tmp_path, f"error: {NOT_EXPRESSIBLE}; convert again with --every 2 --offset 1")


NOT_EXPRESSIBLE = ("SwitchTransformers cannot make FFNs 0, 2 of encoder.block (4 layers) sparse: it makes every "
                   "layer of a stack sparse, or layers 1, 1 + step, 1 + 2 step, ...")
REFUSED = {
    "offset-0": (lambda: tiny_t5(), dict(every=2, offset=0), f"{NOT_EXPRESSIBLE}; convert again with every=2 offset=1"),
    "regex": (lambda: tiny_t5(), dict(layers=r"^(en|de)coder\.block\.(0|2)\."),
              f"{NOT_EXPRESSIBLE}; convert again with every=2 offset=1"),
    # Two stacks whose nearest steps differ: only a regex selects both.
    "regex-two-steps": (lambda: tiny_t5(), dict(layers=r"^encoder\.block\.(0|2)\.|^decoder\.block\.[0-2]\."),
                        f"{NOT_EXPRESSIBLE}; convert again with "
                        "layers='^encoder[.]block[.](1|3)[.]|^decoder[.]block[.](0|1|2|3)[.]'"),
    "gated": (lambda: tiny_t5("gated-gelu"), dict(), "SwitchTransformers experts are Linear -> activation -> Linear; "
              "it has no gated form (T5 v1.1, Flan-T5): export this model to onnx instead"),
    "top_k": (lambda: tiny_t5(), dict(top_k=2), "SwitchTransformers routes each token to one expert, but this model "
              "was converted with top_k=2: convert again with top_k=1"),
    "normalize_gates": (lambda: tiny_t5(), dict(normalize_gates=True), "SwitchTransformers scales an expert's output "
                        "by its router probability, but this model renormalises its gates: convert again with "
                        "normalize_gates=False"),
    "router_dtype": (lambda: tiny_t5(), dict(router_dtype="float64"), "hf-switch writes float32 routers "
                     "(selective precision), but this model routes in float64: convert again with "
                     "router_dtype='float32'"),
    "expert_dropout": (lambda: tiny_t5(), dict(expert_dropout=0.2), "SwitchTransformers experts drop out at the "
                       "model's dropout_rate (0.0), but this model's at expert_dropout=0.2: convert again without "
                       "expert_dropout"),
    "moefy": (lambda: tiny_t5(), dict(init="moefy"), "SwitchTransformers gives dense and expert FFNs one d_ff, but "
              "this model's experts are 8 wide and its dense FFNs 32 (init='moefy'): export it to onnx or torch "
              "instead, or convert again with init='upcycle'"),
    "llama": (lambda: LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                   num_hidden_layers=2, num_attention_heads=2)), dict(),
              "hf-switch exports converted T5ForConditionalGeneration models, not LlamaForCausalLM: export it with "
              "the hf-mixtral target"),
}


def meta_of(model) -> dict:
    return conversion_metadata(model)


@pytest.mark.parametrize("case", REFUSED)
def test_what_switch_cannot_express_is_refused_by_name(case):
    dense, moe, message = REFUSED[case]
    model = moeify.convert(dense(), moeify.MoEConfig(num_experts=4, **moe))
    with pytest.raises(MoeifyError) as e:
        switch.refuse(meta_of(model), FLAGS)
    assert str(e.value) == message
    with pytest.raises(MoeifyError) as e:  # to_hf checks the same, for Python callers
        switch.to_hf(model, FLAGS)
    assert str(e.value) == message


def test_biased_ffns_and_a_bad_sequence_length_are_refused():
    meta = meta_of(moeify.convert(tiny_t5(), moeify.MoEConfig(num_experts=4)))
    with pytest.raises(MoeifyError) as e:
        switch.refuse(meta, {"seq_len": 0})
    assert str(e.value) == "seq_len must be a positive number of tokens, got 0: try seq_len=512"
    # T5 has no FFN biases: what a biased conversion's moeify.json says.
    meta["summary"]["moe_layers"][0]["bias"] = True
    with pytest.raises(MoeifyError) as e:
        switch.refuse(meta, FLAGS)
    assert str(e.value) == "SwitchTransformers FFNs have no biases, but this model's have: export it to onnx instead"
