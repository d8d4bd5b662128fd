import json
import subprocess
import sys

import pytest
from clitools import assert_user_error, run

from moeify.checkpoint import sources
from moeify.checkpoint.sources import DenseModel
from moeify.cli import convert as convert_cli


def test_convert_and_inspect_a_local_hf_directory(hf_t5_dir, tmp_path):
    out = tmp_path / "x"
    result = run("convert", hf_t5_dir, "--experts", 16, "--every", 2, "--capacity-factor", 1.25, "-o", out)
    assert result.exit_code == 0, result.output
    assert "encoder.block.1.layer.1.DenseReluDense" in result.output
    assert "forward check" in result.output and "saved weights + configs" in result.output
    result = run("inspect", out, "--json")
    data = json.loads(result.stdout)
    assert data["num_experts"] == 16 and data["moe_config"]["capacity_factor"] == 1.25
    assert [layer["name"] for layer in data["moe_layers"]] == [
        "encoder.block.1.layer.1.DenseReluDense", "encoder.block.3.layer.1.DenseReluDense",
        "decoder.block.1.layer.2.DenseReluDense", "decoder.block.3.layer.2.DenseReluDense"]
    expert = 2 * 16 * 32  # one expert of one layer: wi and wo
    assert data["total_params"] - data["active_params"] == 4 * 15 * expert
    table = run("inspect", out)
    assert table.exit_code == 0 and "decoder.block.3.layer.2.DenseReluDense" in table.stdout


def test_meta_conversion_of_switch_c_is_structure_only(tmp_path):
    out = tmp_path / "c"
    result = run("convert", "switch-c-2048", "--device", "meta", "-o", out)
    assert result.exit_code == 0, result.output
    assert not list(out.glob("*.safetensors"))
    data = json.loads(run("inspect", out, "--json").stdout)
    assert data["num_experts"] == 2048 and len(data["moe_layers"]) == 30
    assert 1.55e12 < data["total_params"] < 1.6e12 and data["weights"] is False


def test_presets_set_moe_defaults_and_flags_override(tmp_path):
    result = run("convert", "switch-base-128", "--device", "meta", "--experts", 32, "-o", tmp_path / "b")
    assert result.exit_code == 0, result.output
    data = json.loads(run("inspect", tmp_path / "b", "--json").stdout)
    assert data["num_experts"] == 32 and data["moe_config"]["every"] == 2 and len(data["moe_layers"]) == 12


def test_existing_output_needs_force(hf_t5_dir, tmp_path):
    (tmp_path / "out").mkdir()
    result = run("convert", hf_t5_dir, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "pass --force" in result.stderr
    assert run("convert", hf_t5_dir, "--no-check", "--force", "-o", tmp_path / "out").exit_code == 0


@pytest.mark.parametrize("args,message", [
    (["t5-smal"], "unknown preset or missing path 't5-smal': did you mean t5-small"),
    (["./no/such/dir"], "./no/such/dir does not exist"),
    (["t5-small", "--experts", "0"], "--experts must be a positive integer, got 0"),
    (["t5-small", "--capacity-factor", "0"], "--capacity-factor must be > 0, got 0.0"),
    (["t5-small", "--eval-capacity-factor", "-1"], "--eval-capacity-factor must be > 0"),
    (["t5-small", "--layers", "nothing-here", "--device", "meta"], "--layers 'nothing-here' selects none"),
    (["t5-small", "--layers", "(", "--device", "meta"], "--layers is not a valid regular expression"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    assert_user_error(run("convert", *args, "-o", tmp_path / "out"), tmp_path, message)


def test_corrupt_safetensors_in_source(hf_t5_dir, tmp_path):
    f = hf_t5_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert_user_error(run("convert", hf_t5_dir, "-o", tmp_path / "out"), tmp_path, "is corrupt or truncated")


def test_pickle_only_source_is_refused(hf_t5_dir, tmp_path):
    (hf_t5_dir / "model.safetensors").rename(hf_t5_dir / "pytorch_model.bin")
    assert_user_error(run("convert", hf_t5_dir, "-o", tmp_path / "out"), tmp_path, "never loads")


def test_model_without_ffn(monkeypatch, tmp_path):
    import torch.nn as nn

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.q(x) * self.k(x)

    # convert imports load_dense when it runs (start-up stays torch-free), so patch it at its source;
    # SOURCE must exist to pass the CLI's early check for typos.
    monkeypatch.setattr(sources, "load_dense", lambda *a, **k: DenseModel(Attention(), None, {}))
    monkeypatch.setattr(convert_cli, "_check_memory", lambda *a: None)
    (tmp_path / "anything").mkdir()
    result = run("convert", tmp_path / "anything", "-o", tmp_path / "out")
    assert_user_error(result, tmp_path, "no dense FFN found in Attention")


def test_inspect_refuses_a_non_moeify_directory(tmp_path):
    result = run("inspect", tmp_path)
    assert result.exit_code == 2 and "is not a moeify output" in result.stderr


def test_memory_check_points_to_meta(tmp_path, monkeypatch):
    monkeypatch.setattr(convert_cli, "_available_bytes", lambda: 10**9)
    result = run("convert", "t5-base", "--experts", 128, "-o", tmp_path / "out")
    assert_user_error(result, tmp_path, "use --device meta")


def test_console_script_main_job(tmp_path):
    """The README's first command, end to end in a real process."""
    out = tmp_path / "switch-t5-small"
    proc = subprocess.run([sys.executable, "-m", "moeify.cli", "convert", "t5-small", "--experts", "8", "-o", out],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "6 FFNs -> SwitchFFN" in proc.stdout and "forward check" in proc.stdout
    assert {p.name for p in out.iterdir()} == {"config.json", "moeify.json", "model.safetensors"}
    bad = subprocess.run([sys.executable, "-m", "moeify.cli", "convert", "t5-small", "--experts", "0"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --experts must be a positive integer, got 0: try --experts 8"]


def test_help_teaches_with_examples():
    result = run("convert", "--help")
    assert "moeify convert t5-small --experts 8 -o out/switch-t5-small" in result.output
    assert "--capacity-factor" in result.output and "--device" in result.output


def test_presets_lists_the_paper_models():
    result = run("presets")
    assert result.exit_code == 0
    assert "switch-c-2048" in result.stdout and "2048, every 1" in result.stdout
    assert "t5-v1_1-xxl" in result.stdout
