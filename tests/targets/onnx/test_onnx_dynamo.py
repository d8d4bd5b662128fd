"""The torch.export route: the same lowering through onnxscript (runs where onnxscript is installed)."""
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tiny import tiny_net, tiny_t5

import moeify
from moeify.targets.onnx import OnnxOptions, export_onnx


def net():
    return moeify.convert(tiny_net(), moeify.MoEConfig(num_experts=3, every=1, eval_capacity_factor=0.75,
                                                       min_capacity=1)).eval()


def test_without_onnxscript_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails as if not installed
    with pytest.raises(moeify.MoeifyError, match="--dynamo needs onnxscript: pip install onnxscript"):
        export_onnx(net(), tmp_path / "o", OnnxOptions(dynamo=True), example_inputs=(torch.randn(2, 5, 8),))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mode", ["portable", "fused"])
def test_custom_mlp_matches_the_torchscript_route(tmp_path, mode):
    pytest.importorskip("onnxscript")
    sparse = net()
    x = (torch.randn(2, 5, 8),)
    dynamo = export_onnx(sparse, tmp_path / "d", OnnxOptions(mode=mode, dynamo=True), example_inputs=x)
    legacy = export_onnx(sparse, tmp_path / "l", OnnxOptions(mode=mode), example_inputs=x)
    assert dynamo.graphs[0].moe_nodes == legacy.graphs[0].moe_nodes == (4 if mode == "fused" else 0)
    assert dynamo.graphs[0].max_abs_diff < 1e-4
    feed = {"x": np.random.default_rng(0).standard_normal((3, 9, 8)).astype(np.float32)}
    runs = [ort.InferenceSession(str(p / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)[0]
            for p in (tmp_path / "d", tmp_path / "l")]
    np.testing.assert_allclose(runs[0], runs[1], atol=1e-5, rtol=0)


def test_t5_fails_in_decomposition_with_the_root_cause(tmp_path):
    pytest.importorskip("onnxscript")
    sparse = moeify.convert(tiny_t5("relu"), moeify.MoEConfig(num_experts=4)).eval()
    with pytest.raises(moeify.MoeifyError, match="the dynamo exporter failed .*Cannot view a tensor"):
        export_onnx(sparse, tmp_path / "o", OnnxOptions(dynamo=True))
    assert not (tmp_path / "o").exists()
