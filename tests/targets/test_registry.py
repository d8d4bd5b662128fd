"""One registry of export targets: --help lists each, every runner and family resolves, options belong to one target."""
import importlib

import pytest
import torch
from clitools import assert_fits, assert_user_error, run, unfolded
from tiny import t5_batch, tiny_t5

import moeify
from moeify.cli.export import export_cmd
from moeify.cli.targets import TARGETS
from moeify.targets.hf.export import FAMILIES


def test_the_registry_names_the_six_targets():
    assert list(TARGETS) == ["torch", "torch-distributed", "onnx", "hf-switch", "hf-mixtral", "hf-qwen3-moe"]


@pytest.mark.parametrize("name", list(TARGETS))
def test_each_target_resolves_and_owns_its_options(name):
    target = TARGETS[name]
    module, function = target.runner.split(":")
    assert callable(getattr(importlib.import_module(module), function))
    params = {p.name for p in export_cmd.params}
    assert set(target.options) <= params
    for option in target.options:  # an option belongs to one target, so a misplaced one names its owner
        assert [t.name for t in TARGETS.values() if option in t.options] == [name]
    if target.family is not None:
        assert name.startswith("hf-") and target.family in FAMILIES
        family = importlib.import_module(f"moeify.targets.hf.{target.family}")
        assert callable(family.refuse) and callable(family.to_hf)


def test_help_lists_every_target_with_what_it_accepts(console80):
    result = run("export", "--help")
    assert result.exit_code == 0
    assert_fits(result.output)
    text = unfolded(result.output)
    for t in TARGETS.values():
        assert unfolded(f"{t.name} {t.summary}") in text and unfolded(f"accepts: {t.accepts}") in text


def test_an_option_of_another_target_names_its_owner(tmp_path):
    sparse = moeify.convert(tiny_t5(), moeify.MoEConfig(num_experts=2))
    moeify.save(sparse, tmp_path / "src")
    result = run("export", tmp_path / "src", "--target", "hf-switch", "--world-size", 2, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr == "error: --world-size is an option of --target torch-distributed, not hf-switch\n"


def test_the_torch_target_writes_the_moeify_directory_again(tmp_path):
    sparse = moeify.convert(tiny_t5(), moeify.MoEConfig(num_experts=2, top_k=2, dropless=True)).eval()
    moeify.save(sparse, tmp_path / "src")
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    result = run("export", tmp_path / "src", "--target", "torch", "-o", tmp_path / "again")
    assert result.exit_code == 0, result.output
    again = moeify.load(tmp_path / "again").eval()
    assert again.moeify_record.config == sparse.moeify_record.config
    assert torch.equal(again(**t5_batch()).logits, sparse(**t5_batch()).logits)
    assert (tmp_path / "again" / "tokenizer.json").read_text() == "{}"


def test_a_structure_only_source_is_refused_before_writing(tmp_path):
    sparse = moeify.convert(tiny_t5().to("meta"), moeify.MoEConfig(num_experts=2))
    moeify.save(sparse, tmp_path / "meta")
    result = run("export", tmp_path / "meta", "--target", "hf-switch", "-o", tmp_path / "out")
    assert_user_error(result, tmp_path, "is structure only (converted with --device meta): exporting a checkpoint "
                                        "needs its weights; convert the model again without --device meta")
