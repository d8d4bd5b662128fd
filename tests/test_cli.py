import io
import json
import re
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner
from clitools import assert_fits, assert_user_error, run, unfolded

from moeify import cli
from moeify.checkpoint import sources
from moeify.checkpoint.sources import DenseModel
from moeify.cli import convert as convert_cli
from moeify.planner import resources


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


def test_inspect_shows_top_k_normalised_dropless_routing(hf_t5_dir, tmp_path):
    out = tmp_path / "k2"
    result = run("convert", hf_t5_dir, "--experts", 4, "--top-k", 2, "--normalize-gates", "--dropless", "-o", out)
    assert result.exit_code == 0, result.output
    data = json.loads(run("inspect", out, "--json").stdout)
    assert {k: data["moe_config"][k] for k in ("top_k", "normalize_gates", "dropless")} == {
        "top_k": 2, "normalize_gates": True, "dropless": True}
    assert all(layer["routing"]["top_k"] == 2 and layer["routing"]["dropless"] for layer in data["moe_layers"])
    expert = 2 * 16 * 32  # one expert of one layer: wi and wo
    assert data["total_params"] - data["active_params"] == 4 * (4 - 2) * expert  # two experts run per token
    table = run("inspect", out).stdout
    assert "routing: top-2, renormalised gates, dropless: capacity factors ignored" in table
    rows = [line for line in table.splitlines() if "DenseReluDense" in line]
    assert len(rows) == 4 and all(row.split()[4] == "dropless" for row in rows)


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
    monkeypatch.setattr(resources, "available_memory", lambda: 10**9)
    result = run("convert", "t5-base", "--experts", 128, "-o", tmp_path / "out")
    assert_user_error(result, tmp_path, "use --device meta")


def test_console_script_main_job(tmp_path):
    """The README's first command, end to end in a real process."""
    out = tmp_path / "switch-t5-small"
    proc = subprocess.run([sys.executable, "-m", "moeify.cli", "convert", "t5-small", "--experts", "8", "-o", out],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "6 FFNs -> SwitchFFN" in proc.stdout and "forward check" in proc.stdout
    assert {p.name for p in out.iterdir()} == {"moeify.json", "moeify-model.safetensors", "moeify-manifest.json"}
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


# What a new user sees: output that reads at 80 columns, help that teaches and is never cut.

FFN_NAMES = ["encoder.block.1.layer.1.DenseReluDense", "encoder.block.3.layer.1.DenseReluDense",
             "decoder.block.1.layer.2.DenseReluDense", "decoder.block.3.layer.2.DenseReluDense"]


def test_convert_and_inspect_read_at_80_columns(hf_t5_dir, tmp_path, console80):
    out = tmp_path / "x"
    result = run("convert", hf_t5_dir, "--experts", 4, "-o", out)
    assert result.exit_code == 0, result.output
    assert_fits(result.stdout)
    assert all(name in unfolded(result.stdout) for name in FFN_NAMES)
    # Modules that are not FFNs are one quiet line unless asked for.
    assert re.search(r"^\d+ other modules with two or more Linears are not FFNs \(--verbose lists them\)$",
                     result.stdout, flags=re.MULTILINE), result.stdout
    assert "not an FFN" not in result.stdout and "could not be traced" not in result.stdout
    shown = run("inspect", out)
    assert shown.exit_code == 0, shown.output
    assert_fits(shown.stdout)
    rows = [line.split() for line in shown.stdout.splitlines() if "DenseReluDense" in line]
    assert [row[0] for row in rows] == FFN_NAMES  # whole names, one row each
    header = next(line for line in shown.stdout.splitlines() if line.startswith("layer"))
    assert header.split() == ["layer", "d_model", "d_ff", "gated", "capacity", "params"]
    assert all(row[1:] == ["16", "32", "no", "1.25/2.0", rows[0][-1]] for row in rows), rows
    assert "4 Switch layers x 4 experts" in shown.stdout


def test_convert_verbose_lists_the_modules_that_are_not_ffns(hf_t5_dir, tmp_path, console80):
    result = run("convert", hf_t5_dir, "--experts", 4, "--no-check", "-v", "-o", tmp_path / "x")
    assert result.exit_code == 0, result.output
    assert_fits(result.stdout)
    assert re.search(r"^not an FFN \(\d+\): T5Attention could not be traced", result.stdout, flags=re.MULTILINE)
    assert re.search(r"^  encoder\.block\.0\.layer\.0\.SelfAttention$", result.stdout, flags=re.MULTILINE), result.stdout
    assert "--verbose lists them" not in result.stdout


def test_presets_read_at_80_columns(console80):
    result = run("presets")
    assert result.exit_code == 0
    assert_fits(result.stdout)
    assert re.search(r"^switch-c-2048 +2080 +6144 +15\+15 +relu +2048, every 1\s*$", result.stdout, flags=re.MULTILINE)


def test_distributed_export_reads_at_80_columns(tmp_path, console80):
    from tiny import tiny_t5

    import moeify

    moeify.save(moeify.convert(tiny_t5("relu"), moeify.MoEConfig(num_experts=4)), tmp_path / "m")
    result = run("export", tmp_path / "m", "--target", "torch-distributed", "--world-size", 2, "-o", tmp_path / "d")
    assert result.exit_code == 0, result.output
    assert_fits(result.stdout)
    assert re.search(r"^ +1  rank-00001-of-00002\.safetensors +[\d.]+  E2-3 in each of 4 layers\s*$",
                     result.stdout, flags=re.MULTILINE), result.stdout


def test_run_report_reads_at_80_columns():
    from types import SimpleNamespace

    from rich.console import Console

    from moeify.targets.distributed.entry import print_report

    layers = [SimpleNamespace(name=name, tokens_per_expert=[1000 + i for i in range(64)], dropped_fraction=0.125,
                              top_k=1)
              for name in FFN_NAMES]
    report = SimpleNamespace(train=True, world_size=4, steps=10, tokens_per_second=123456.7, timed_tokens=9_000_000,
                             seconds=72.9, loss=3.21, dropped_fraction=0.125, layers=layers)
    console = Console(width=80, record=True, file=io.StringIO())
    print_report(report, console)
    text = console.export_text()
    assert_fits(text)
    assert "4 ranks, 10 training steps: 123,457 tokens/s" in text and "(mean over ranks)" in text
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.split()[:1] and line.split()[0] in FFN_NAMES]
    assert [lines[i].split()[0] for i in starts] == FFN_NAMES  # whole names
    assert all(lines[i].rstrip().endswith("12.5%") for i in starts)
    first_row = " ".join(lines[starts[0]:starts[1]]).replace(FFN_NAMES[0], "").replace("12.5%", "").split()
    assert first_row == [str(n) for n in range(1000, 1064)]  # every count, wrapped in order


def help_of(*args):
    result = CliRunner().invoke(cli.main, [*args, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_every_option_has_help_and_no_help_is_cut():
    for name, command in cli.main.commands.items():
        for param in command.params:
            if isinstance(param, click.Option):
                assert (param.help or "").strip(), f"moeify {name} {param.opts[-1]} has no help"
        text = help_of(name)
        assert_fits(text)
        assert "Example" in text, f"moeify {name} --help shows no example"
    text = help_of()
    assert_fits(text)
    commands = text.split("Commands:")[1].strip().splitlines()
    assert len(commands) == len(cli.main.commands)
    assert not [line for line in commands if line.rstrip().endswith(("...", "…"))], commands
    for name, command in cli.main.commands.items():  # each short help whole, on one line
        assert any(line.split(None, 1) == [name, command.short_help] for line in commands), (name, commands)


def test_presets_help_does_not_offer_flags_it_rejects():
    text = help_of("presets")
    assert "--seed" not in text and "moeify convert NAME" in " ".join(text.split())
    assert run("presets", "--seed", 1).exit_code == 2
