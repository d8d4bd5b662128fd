"""write_hf: every tensor checked against the transformers class on the meta device before anything is written."""
import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from moeify.errors import MoeifyError
from moeify.targets.hf.family import HFCheckpoint
from moeify.targets.hf.writer import write_hf

EXPERTS = "model.layers.0.mlp.experts"


def tiny_mixtral(tie: bool = False):
    config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return config, MixtralForCausalLM(config).eval()


def refused(tensors: dict, tmp_path, config) -> str:
    with pytest.raises(MoeifyError) as e:
        write_hf(HFCheckpoint("MixtralForCausalLM", config, tensors), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written, not even a directory
    assert not list(tmp_path.iterdir())
    return str(e.value)


def test_a_checked_checkpoint_loads_with_every_key_and_the_same_logits(tmp_path):
    config, model = tiny_mixtral(tie=True)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    write_hf(HFCheckpoint("MixtralForCausalLM", config, model.state_dict()), tmp_path / "out",
             tokenizer_dir=tmp_path / "tok")
    again, info = MixtralForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    ids = torch.randint(0, 64, (2, 7))
    assert torch.equal(model(ids).logits, again.eval()(ids).logits)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"


def test_a_transposed_expert_weight_is_refused_by_name(tmp_path):
    config, model = tiny_mixtral()
    tensors = dict(model.state_dict())
    tensors[f"{EXPERTS}.down_proj"] = tensors[f"{EXPERTS}.down_proj"].transpose(1, 2).contiguous()
    assert refused(tensors, tmp_path, config) == (
        f"refusing to write a MixtralForCausalLM checkpoint with misplaced weights: {EXPERTS}.down_proj is "
        "(4, 24, 16) float32, expected (4, 16, 24) float32: this is a moeify bug, please report it")


def test_a_missing_expert_tensor_and_an_extra_one_are_refused(tmp_path):
    config, model = tiny_mixtral()
    tensors = dict(model.state_dict())
    gate_up = tensors.pop(f"{EXPERTS}.gate_up_proj")
    assert refused(tensors, tmp_path, config) == (
        f"the MixtralForCausalLM checkpoint lacks 1 tensors ({EXPERTS}.gate_up_proj): "
        "this is a moeify bug, please report it")
    tensors[f"{EXPERTS}.gate_up_proj"], tensors[f"{EXPERTS}.3.w1.weight"] = gate_up, gate_up[3]
    assert refused(tensors, tmp_path, config) == (
        f"the MixtralForCausalLM checkpoint has 1 tensors MixtralForCausalLM does not ({EXPERTS}.3.w1.weight): "
        "this is a moeify bug, please report it")


def test_a_retyped_tensor_is_refused(tmp_path):
    config, model = tiny_mixtral()
    tensors = dict(model.state_dict())
    tensors["model.layers.1.mlp.gate.weight"] = tensors["model.layers.1.mlp.gate.weight"].half()
    assert "model.layers.1.mlp.gate.weight is (4, 16) float16, expected (4, 16) float32" in refused(
        tensors, tmp_path, config)
