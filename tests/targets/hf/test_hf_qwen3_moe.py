"""hf-qwen3-moe: converted Qwen3 -> Qwen3MoeForCausalLM with moeify's logits and generations, or refused by name."""
import pytest
from clitools import run
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
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

import moeify
from moeify.checkpoint.store import conversion_metadata
from moeify.errors import MoeifyError
from moeify.targets.hf import qwen3_moe
from moeify.targets.hf.decoder import carry_config

Z_LOSS = "Qwen3-MoE has no router z-loss: z_loss_coef (0.001) is not carried over (training only)"


def pooled(layers: int) -> str:
    return (f"router_aux_loss_coef is moeify's aux_loss_coef (0.01), but transformers pools the {layers} MoE layers "
            f"into one load-balancing loss where moeify adds one per layer: in training it balances about {layers} "
            "times less")


def qwen3(**overrides):
    # head_dim 16, not hidden_size // heads = 8: Qwen3-MoE must be told it.
    return tiny(Qwen3Config, Qwen3ForCausalLM, **{"num_hidden_layers": 4, "head_dim": 16, **overrides})


# name: (dense overrides, MoE config, converted layers, decoder_sparse_step, mlp_only_layers).
CASES = {
    "top1-every_other_layer": ({}, dict(top_k=1, every=2), [1, 3], 2, []),
    "top2-normalized-all_layers-sliding_window": (
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=0),
        dict(top_k=2, normalize_gates=True, every=1), [0, 1, 2, 3], 1, []),
    "top2-layers_0_and_3-attention_bias-tied": (
        dict(attention_bias=True, tie_word_embeddings=True),
        dict(top_k=2, layers=r"layers\.[03]\."), [0, 3], 1, [1, 2]),
}


@pytest.mark.parametrize("case", CASES)
def test_qwen3_moe_gives_moeifys_logits_and_generations(case, tmp_path):
    dense, moe, layers, step, mlp_only = CASES[case]
    moe_model = converted(qwen3(**dense), tmp_path, dropless=True, **moe)
    ckpt = qwen3_moe.to_hf(moe_model, {})
    c = ckpt.config
    assert (c.decoder_sparse_step, c.mlp_only_layers) == (step, mlp_only)
    normalized = moe.get("normalize_gates", False)
    assert (c.num_experts, c.num_experts_per_tok, c.norm_topk_prob) == (4, moe["top_k"], normalized)
    assert (c.moe_intermediate_size, c.intermediate_size, c.head_dim) == (48, 48, 16)
    assert ckpt.notes == [pooled(len(layers)), Z_LOSS]
    hf = written(ckpt, Qwen3MoeForCausalLM, tmp_path)
    assert [i for i, layer in enumerate(hf.model.layers) if isinstance(layer.mlp, Qwen3MoeSparseMoeBlock)] == layers
    ids = batch()
    assert_same_logits(moe_model, hf, ids)
    assert_same_generation(moe_model, hf, ids[:, :4])


def test_a_capacity_limited_model_is_exported_with_a_note(tmp_path):
    moe_model = converted(qwen3(), tmp_path, top_k=1, eval_capacity_factor=8.0, jitter=0.1)
    ckpt = qwen3_moe.to_hf(moe_model, {})
    assert ckpt.notes == [
        "Qwen3-MoE never drops tokens, but this model was converted with a capacity limit (not dropless): outputs "
        "equal moeify's only where moeify's capacity drops none", pooled(2), Z_LOSS,
        "Qwen3-MoE has no router jitter: jitter (0.1) is not carried over (training only)"]
    assert_same_logits(moe_model, written(ckpt, Qwen3MoeForCausalLM, tmp_path), batch())  # capacity drops none


def test_cli_exports_a_qwen3_moe_checkpoint(tmp_path):
    moe_model = converted(qwen3(), tmp_path, top_k=2, dropless=True)
    result = run("export", tmp_path / "moe", "--target", "hf-qwen3-moe", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert f"{tmp_path / 'moe'} -> {tmp_path / 'out'}: Qwen3MoeForCausalLM" in result.output
    assert f"note {Z_LOSS}" in result.output
    assert_same_logits(moe_model, loaded(Qwen3MoeForCausalLM, tmp_path / "out"), batch())


@pytest.mark.parametrize("layers, depth, layout", [
    ([1, 3], 4, (2, [])), ([0, 1, 2, 3], 4, (1, [])), ([3], 4, (4, [])), ([0, 2], 4, (1, [1, 3])),
    ([2, 5], 6, (3, [])), ([1, 3, 4], 6, (1, [0, 2, 5])), ([3, 7], 12, (4, [11])),
])
def test_sparse_layout_makes_exactly_the_converted_layers_sparse(layers, depth, layout):
    step, mlp_only = qwen3_moe.sparse_layout(layers, depth)
    assert (step, mlp_only) == layout
    # transformers' rule (Qwen3MoeDecoderLayer): not MLP-only and (i + 1) % decoder_sparse_step == 0
    assert [i for i in range(depth) if i not in mlp_only and (i + 1) % step == 0] == layers


REFUSED = {
    "some_layers_slide": (lambda: qwen3(use_sliding_window=True, sliding_window=4, max_window_layers=2),
                          "Qwen3-MoE slides the attention window in every layer or in none, but this Qwen3 model "
                          "slides it in 2 of 4 layers (layer_types): export it to onnx instead"),
    "llama": (lambda: tiny(LlamaConfig, LlamaForCausalLM), "hf-qwen3-moe exports converted Qwen3ForCausalLM models, "
              "not LlamaForCausalLM: export it with the hf-mixtral target"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_qwen3_moe_cannot_express_is_refused_by_name(case):
    dense, message = REFUSED[case]
    model = moeify.convert(dense(), moeify.MoEConfig(num_experts=4, every=1))
    with pytest.raises(MoeifyError) as e:
        qwen3_moe.refuse(conversion_metadata(model), {})
    assert str(e.value) == message
    with pytest.raises(MoeifyError) as e:  # to_hf checks the same, for Python callers
        qwen3_moe.to_hf(model, {})
    assert str(e.value) == message


def test_a_source_field_the_target_lacks_is_refused_unless_at_its_default():
    source = LlamaConfig(hidden_size=32, num_attention_heads=4, mlp_bias=True)
    with pytest.raises(MoeifyError) as e:
        carry_config(source, Qwen3MoeConfig, "Qwen3-MoE", {}, frozenset({"head_dim"}))
    assert str(e.value) == ("Qwen3-MoE has no counterpart of LlamaConfig.mlp_bias=True: "
                            "export this model to onnx instead")
    source.mlp_bias = False  # at its default: nothing to express
    assert carry_config(source, Qwen3MoeConfig, "Qwen3-MoE", {}, frozenset({"head_dim"})).hidden_size == 32


def test_moefied_experts_are_exported_at_their_width_beside_full_width_dense_layers(tmp_path):
    moe_model = converted(qwen3(), tmp_path, top_k=2, every=2, dropless=True, init="moefy")
    ckpt = qwen3_moe.to_hf(moe_model, {})
    assert (ckpt.config.moe_intermediate_size, ckpt.config.intermediate_size) == (12, 48)  # 48 neurons / 4 experts
    assert_same_logits(moe_model, written(ckpt, Qwen3MoeForCausalLM, tmp_path), batch())
