"""`moeify convert SWITCH_DIR`: a transformers SwitchTransformers directory imported as a moeify model, as it is."""
import json

import pytest
import torch
from clitools import assert_user_error, run, unfolded
from tiny import VOCAB, t5_batch
from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

import moeify
from moeify.checkpoint.sources import load_dense
from moeify.checkpoint.switch_import import import_switch
from moeify.errors import MoeifyError

SWITCH = SwitchTransformersForConditionalGeneration


def switch_config(**overrides) -> SwitchTransformersConfig:
    kw = dict(vocab_size=VOCAB, d_model=16, d_ff=32, d_kv=4, num_heads=2, num_layers=4, num_decoder_layers=4,
              num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, num_experts=4, expert_capacity=64,
              dropout_rate=0.0, decoder_start_token_id=0, router_jitter_noise=0.02, router_aux_loss_coef=0.05,
              router_z_loss_coef=0.002)
    return SwitchTransformersConfig(**{**kw, **overrides})


def saved_switch(path, seed: int = 0, **overrides):
    """A random SwitchTransformers model saved by transformers itself; returns it in eval mode."""
    torch.manual_seed(seed)
    model = SWITCH(switch_config(**overrides)).eval()
    model.save_pretrained(path)
    return model


@torch.no_grad()
def assert_same_logits(moe_model, hf_model) -> None:
    """Equal logits (atol 1e-4) where moeify dropped no token."""
    batch = t5_batch()
    with moeify.router_losses(moe_model) as routing:
        got = moe_model(**batch).logits
    assert routing.layers and sum(r.dropped for r in routing.layers) == 0
    torch.testing.assert_close(got, hf_model(**batch).logits, atol=1e-4, rtol=0)


# name: (SwitchTransformersConfig overrides, the selection moeify reproduces it with, converted FFNs)
LAYOUTS = {
    "every-other": (dict(), dict(every=2, offset=1, layers=None), ["encoder.block.1", "encoder.block.3",
                                                                  "decoder.block.1", "decoder.block.3"]),
    "every-layer": (dict(num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2),
                    dict(every=1, offset=0, layers=None), ["encoder.block.0", "encoder.block.1", "decoder.block.0",
                                                           "decoder.block.1"]),
    "deeper-decoder": (dict(num_decoder_layers=6, num_sparse_decoder_layers=3), dict(every=2, offset=1, layers=None),
                       ["encoder.block.1", "encoder.block.3", "decoder.block.1", "decoder.block.3", "decoder.block.5"]),
    # Encoder every FFN, decoder every other: no every/offset does both.
    "two-steps": (dict(num_sparse_encoder_layers=4), dict(every=2, offset=None,
                                                          layers="^encoder[.]block[.](0|1|2|3)[.]|"
                                                                 "^decoder[.]block[.](1|3)[.]"),
                  ["encoder.block.0", "encoder.block.1", "encoder.block.2", "encoder.block.3", "decoder.block.1",
                   "decoder.block.3"]),
}


@pytest.mark.parametrize("case", LAYOUTS)
def test_an_imported_switch_model_gives_transformers_logits(case, tmp_path):
    overrides, selection, sparse = LAYOUTS[case]
    original = saved_switch(tmp_path / "switch", **overrides)
    model = import_switch(tmp_path / "switch", overrides={"dropless": True}).eval()
    record = model.moeify_record
    c = record.config
    assert {k: getattr(c, k) for k in selection} == selection
    assert (c.num_experts, c.jitter, c.aux_loss_coef, c.z_loss_coef, c.dropless) == (4, 0.02, 0.05, 0.002, True)
    ffn = {"encoder": 1, "decoder": 2}
    assert record.site_names == [f"{s}.layer.{ffn[s.split('.')[0]]}.DenseReluDense" for s in sparse]
    assert record.source["architecture"] == "T5ForConditionalGeneration"
    assert_same_logits(model, original)


def test_a_switch_directory_round_trips_through_moeify(tmp_path):
    """Import what transformers saved, export it to hf-switch, load that in transformers: the same
    state dict tensor for tensor, and the same logits."""
    original = saved_switch(tmp_path / "switch", seed=1)
    (tmp_path / "switch" / "tokenizer.json").write_text("{}")
    result = run("convert", tmp_path / "switch", "-o", tmp_path / "moe")
    assert result.exit_code == 0, result.output
    assert unfolded("4 FFNs -> SwitchFFN (imported)") in unfolded(result.output)  # a long path wraps the title
    assert unfolded("note the checkpoint's expert_capacity 64 per sequence is not used: moeify limits each "
                    "expert per batch with capacity factor 1.25 (eval 2.0)") in unfolded(result.output)
    result = run("export", tmp_path / "moe", "--target", "hf-switch", "-o", tmp_path / "hf")
    assert result.exit_code == 0, result.output
    again, info = SWITCH.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    before, after = original.state_dict(), again.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    batch = t5_batch()
    with torch.no_grad():  # bit for bit, both loaded by from_pretrained (built in memory: within 1e-6)
        expected = SWITCH.from_pretrained(tmp_path / "switch").eval()(**batch).logits
        assert torch.equal(again.eval()(**batch).logits, expected)
    # seq_len 512, eval capacity factor 2.0, 4 experts: 256 per sequence, where the original had 64.
    assert again.config.expert_capacity == 256
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == "{}"


def test_inspect_and_the_run_time_flags_apply_to_an_import(tmp_path):
    saved_switch(tmp_path / "switch")
    result = run("convert", tmp_path / "switch", "-o", tmp_path / "moe", "--eval-capacity-factor", 3.0,
                 "--z-loss-coef", 0.0, "--no-check")
    assert result.exit_code == 0, result.output
    c = moeify.load(tmp_path / "moe").moeify_record.config
    assert (c.eval_capacity_factor, c.z_loss_coef, c.aux_loss_coef, c.num_experts) == (3.0, 0.0, 0.05, 4)
    result = run("inspect", tmp_path / "moe")
    assert result.exit_code == 0, result.output
    assert "4 Switch layers x 4 experts" in result.output


REFUSED = {
    "experts": (dict(), ["--experts", 8], "{path} is a SwitchTransformers checkpoint: its weights fix --experts 4; "
                "drop --experts 8"),
    "every": (dict(), ["--every", 1], "{path} is a SwitchTransformers checkpoint: its weights fix --every 2 "
              "--offset 1; drop --every 1"),
    "init": (dict(), ["--init", "random"], "--init 'random' has no effect on a SwitchTransformers checkpoint, whose "
             "experts come from its weights: drop it"),
    "router_bias": (dict(router_bias=True), [], "{path}'s routers have a bias (router_bias: true), moeify's have "
                    "none: moeify cannot import this checkpoint"),
    "untied": (dict(tie_word_embeddings=False), [], "{path} keeps its lm_head apart from its embeddings "
               "(tie_word_embeddings: false), and transformers' T5ForConditionalGeneration always ties them: moeify "
               "cannot import this checkpoint"),
    "router_dtype": (dict(router_dtype="bfloat16"), [], "{path} routes in bfloat16, moeify imports float32 or float64 "
                     "routers (selective precision): pass --router-dtype 'float32' to import it routing in float32"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_moeify_cannot_import_is_refused_by_name(case, tmp_path):
    overrides, flags, message = REFUSED[case]
    saved_switch(tmp_path / "switch", **overrides)
    result = run("convert", tmp_path / "switch", "-o", tmp_path / "out", *flags)
    assert_user_error(result, tmp_path, "error: " + message.format(path=tmp_path / "switch"))


def test_a_gated_activation_and_pickle_weights_are_refused(tmp_path):
    switch = tmp_path / "switch"
    saved_switch(switch)
    config = json.loads((switch / "config.json").read_text())
    (switch / "config.json").write_text(json.dumps({**config, "dense_act_fn": "gated-gelu"}))
    result = run("convert", switch, "-o", tmp_path / "out")
    assert_user_error(result, tmp_path, f"error: {switch}'s dense_act_fn 'gated-gelu' is no activation transformers "
                      "knows (SwitchTransformers uses relu): fix config.json")
    (switch / "config.json").write_text(json.dumps(config))
    (switch / "model.safetensors").rename(switch / "pytorch_model.bin")
    result = run("convert", switch, "-o", tmp_path / "out")
    assert_user_error(result, tmp_path, f"error: {switch} only has pickle weights (.bin/.pt), which moeify never "
                      "loads: save the model with safetensors (save_pretrained(..., safe_serialization=True))")
    (switch / "pytorch_model.bin").unlink()
    result = run("convert", switch, "-o", tmp_path / "out")
    assert_user_error(result, tmp_path, f"error: {switch} has no model.safetensors: add the weights, or use "
                      "--device meta for a structure-only import")


def test_weights_of_another_configuration_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    switch = tmp_path / "switch"
    saved_switch(switch)
    weights = switch / "model.safetensors"
    tensors = load_file(weights)
    saved_switch(tmp_path / "other", num_experts=2)
    (tmp_path / "other" / "model.safetensors").replace(weights)
    with pytest.raises(MoeifyError) as e:
        import_switch(switch)
    assert str(e.value) == (f"{weights}: decoder.block.1.layer.2.mlp.router.classifier.weight is (2, 16), its "
                            "config.json makes it (4, 16): the weights belong to another configuration")
    expert = "encoder.block.3.layer.1.mlp.experts.expert_{}.wo.weight"
    save_file({**tensors, expert.format(4): tensors[expert.format(3)].clone()}, weights)
    with pytest.raises(MoeifyError) as e:
        import_switch(switch)
    assert str(e.value) == (f"{weights} holds weights a SwitchTransformers model of its config.json does not have "
                            f"({expert.format(4)}): it belongs to another configuration")
    save_file({k: v for k, v in tensors.items() if k != expert.format(3)}, weights)
    with pytest.raises(MoeifyError) as e:
        import_switch(switch)
    assert str(e.value) == (f"the weights in {switch} lack 1 tensors (encoder.block.3.layer.1.DenseReluDense.experts"
                            ".w_out): the checkpoint is incomplete or for another configuration")


def test_a_switch_directory_is_not_converted_as_a_dense_model(tmp_path):
    saved_switch(tmp_path / "switch")
    with pytest.raises(MoeifyError) as e:
        load_dense(str(tmp_path / "switch"))
    assert str(e.value) == (f"{tmp_path / 'switch'} is a SwitchTransformers checkpoint, sparse already: import it "
                            f"with `moeify convert {tmp_path / 'switch'}` "
                            "(moeify.checkpoint.switch_import.import_switch)")


SWITCH_C = dict(vocab_size=32128, d_model=2080, d_ff=6144, d_kv=64, num_heads=32, num_layers=15,
                num_decoder_layers=15, num_sparse_encoder_layers=15, num_sparse_decoder_layers=15, num_experts=2048)


def test_a_config_only_switch_c_imports_on_meta_and_plans(tmp_path):
    """Switch-C's geometry (2048 experts in all 30 FFNs) from config.json alone: no weights needed."""
    (tmp_path / "switch-c").mkdir()
    switch_config(**SWITCH_C).to_json_file(tmp_path / "switch-c" / "config.json")
    result = run("convert", tmp_path / "switch-c", "--device", "meta", "-o", tmp_path / "c")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "c" / "moeify.json").read_text())["summary"]
    expert = 2 * 2080 * 6144  # wi and wo, no biases
    assert (len(summary["moe_layers"]), summary["num_experts"]) == (30, 2048)
    assert summary["total_params"] - summary["dense_params"] == 30 * 2048 * expert
    for source in (tmp_path / "c", tmp_path / "switch-c"):  # the import, and the HF directory itself
        result = run("plan", source, "--topology", "dgx-h100", "--nodes", 64, "--optimizer", "adafactor",
                     "-o", tmp_path / "plan.json", "--force")
        assert result.exit_code == 0, result.output
        plan = json.loads((tmp_path / "plan.json").read_text())
        assert plan["world_size"] == 512
