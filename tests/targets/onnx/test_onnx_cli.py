"""`moeify export --target onnx` and `moeify inspect *.onnx` from the command line."""
import json
import re

import onnx
import onnxruntime
import pytest
from clitools import assert_fits, assert_user_error, run
from tiny import tiny_net

import moeify


def test_fused_export_then_inspect(converted, tmp_path):
    result = run("export", converted, "--target", "onnx", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "4 Switch layers fused into com.microsoft.MoE (dropless" in result.stdout
    assert "encoder_model.onnx" in result.stdout and "decoder_model.onnx" in result.stdout
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert files == {"encoder_model.onnx", "decoder_model.onnx", "moeify_onnx.json", "moeify-manifest.json"}
    report = json.loads((tmp_path / "out" / "moeify_onnx.json").read_text())
    assert [g["moe_nodes"] for g in report["graphs"]] == [2, 2]
    assert all(g["max_abs_diff"] < 1e-4 and g["nodes_optimized"] <= g["nodes"] < g["nodes_exported"]
               for g in report["graphs"])

    data = json.loads(run("inspect", tmp_path / "out" / "encoder_model.onnx", "--json").stdout)
    assert [i["name"] for i in data["inputs"]] == ["input_ids", "attention_mask"]
    assert data["inputs"][0]["shape"] == ["batch_size", "encoder_sequence_length"]
    assert data["ops"]["com.microsoft.MoE"] == 2 and data["mode"] == "fused"
    assert [n["fc1_shape"] for n in data["moe_nodes"]] == [[4, 32, 16]] * 2
    assert [row["name"] for row in data["switch_layers"]] == ["encoder.block.1.layer.1.DenseReluDense",
                                                               "encoder.block.3.layer.1.DenseReluDense"]
    table = run("inspect", tmp_path / "out" / "decoder_model.onnx")
    assert table.exit_code == 0 and "ops (" in table.stdout
    assert re.search(r"^decoder\.block\.3\.layer\.2\.DenseReluDense +fused +relu +4 +dropless\s*$", table.stdout,
                     flags=re.MULTILINE), table.stdout
    assert "[batch_size, decoder_sequence_length, 64]" in table.stdout


def test_export_and_inspect_read_at_80_columns(converted, tmp_path, console80):
    result = run("export", converted, "--target", "onnx", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert_fits(result.stdout)
    for graph in ("encoder_model.onnx", "decoder_model.onnx"):  # whole names, every column filled
        assert re.search(rf"^{graph}( +\d+){{4}} +[\d.]+ +[\d.]+e-\d+\s*$", result.stdout, flags=re.MULTILINE), result.stdout
    shown = run("inspect", tmp_path / "out" / "decoder_model.onnx")
    assert shown.exit_code == 0, shown.output
    assert_fits(shown.stdout)
    assert re.search(r"^decoder\.block\.1\.layer\.2\.DenseReluDense +fused +relu +4 +dropless\s*$", shown.stdout,
                     flags=re.MULTILINE), shown.stdout
    assert "com.microsoft.MoE" in shown.stdout and "MoE node " in shown.stdout


def test_portable_export_with_saved_optimised_graphs(converted, tmp_path):
    result = run("export", converted, "--target", "onnx", "--mode", "portable", "--save-optimized",
                 "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "4 Switch layers lowered to standard ONNX ops (exact eval capacity)" in result.stdout
    for stem in ("encoder_model", "decoder_model"):
        plain = onnx.load(str(tmp_path / "out" / f"{stem}.onnx"))
        optimised = onnx.load(str(tmp_path / "out" / f"{stem}_optimized.onnx"))
        assert {n.domain for n in plain.graph.node} == {""}
        assert len(optimised.graph.node) < len(plain.graph.node)
        onnxruntime.InferenceSession(str(tmp_path / "out" / f"{stem}_optimized.onnx"),
                                     providers=["CPUExecutionProvider"])


def test_help_teaches_and_says_fused_is_dropless():
    result = run("export", "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "DROPLESS" in text and "moeify export out/switch-t5-small --target onnx" in text
    assert "--mode [fused|portable]" in text
    assert "--target [torch|torch-distributed|onnx|hf-switch|hf-mixtral|hf-qwen3-moe]" in text


def test_existing_output_needs_force(converted, tmp_path):
    (tmp_path / "out").mkdir()
    result = run("export", converted, "--target", "onnx", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "pass --force" in result.stderr


@pytest.mark.parametrize("args,message", [
    (["--opset", "16"], "unsupported opset 16: the TorchScript exporter writes opsets 17-20; try --opset 17"),
    (["--opset", "21"], "unsupported opset 21"),
    (["--dynamo", "--opset", "17"], "unsupported opset 17: the dynamo exporter writes opsets 18-23"),
])
def test_unsupported_opsets(converted, tmp_path, args, message):
    assert_user_error(run("export", converted, "--target", "onnx", *args, "-o", tmp_path / "out"), tmp_path, message)


def test_not_a_moeify_output(tmp_path):
    (tmp_path / "dense").mkdir()
    result = run("export", tmp_path / "dense", "--target", "onnx", "-o", tmp_path / "out")
    assert_user_error(result, tmp_path, "is not a moeify output (no moeify.json)")


def test_custom_module_outputs_point_to_the_python_api(tmp_path):
    moeify.save(moeify.convert(tiny_net(), moeify.MoEConfig(num_experts=3, every=1)), tmp_path / "net")
    result = run("export", tmp_path / "net", "--target", "onnx", "-o", tmp_path / "out")
    assert_user_error(result, tmp_path, "export_onnx(model, out, example_inputs=(x,))")


def test_cuda_provider_without_a_gpu_runtime(converted, tmp_path, monkeypatch):
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    result = run("export", converted, "--target", "onnx", "--provider", "cuda", "-o", tmp_path / "out")
    assert_user_error(result, tmp_path, "--provider cuda needs onnxruntime-gpu")
    assert "pip install 'moeify[gpu]'" in result.stderr


def test_inspect_of_a_missing_or_broken_onnx_file(tmp_path):
    assert_user_error(run("inspect", tmp_path / "nothing.onnx"), tmp_path, "nothing.onnx does not exist")
    (tmp_path / "broken.onnx").write_bytes(b"\x00not protobuf\xff" * 10)
    assert_user_error(run("inspect", tmp_path / "broken.onnx"), tmp_path, "is not a readable ONNX file")
