"""The torch.export route: the lowering through onnxscript, checked against PyTorch eager (needs onnxscript)."""
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tiny import tiny_net, tiny_t5

import moeify
from moeify.targets.onnx import OnnxOptions, export_onnx


def net(eval_capacity_factor=0.75):
    config = moeify.MoEConfig(num_experts=3, every=1, eval_capacity_factor=eval_capacity_factor, min_capacity=1)
    return moeify.convert(tiny_net(), config).eval()


def test_without_onnxscript_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails as if not installed
    with pytest.raises(moeify.MoeifyError, match="--dynamo needs onnxscript: pip install onnxscript"):
        export_onnx(net(), tmp_path / "o", OnnxOptions(dynamo=True), example_inputs=(torch.randn(2, 5, 8),))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mode", ["portable", "fused"])
def test_custom_mlp_in_onnxruntime_matches_pytorch_eager(tmp_path, mode):
    pytest.importorskip("onnxscript")
    report = export_onnx(net(), tmp_path / "d", OnnxOptions(mode=mode, dynamo=True),
                         example_inputs=(torch.randn(2, 5, 8),))
    assert report.graphs[0].moe_nodes == (4 if mode == "fused" else 0)  # one com.microsoft.MoE per Switch layer
    # The reference: the same model built again and run in PyTorch, on a batch of another shape (27 tokens).
    # Portable graphs keep the eval capacity (0.75 * 27 / 3 -> 7 slots, so tokens drop); the fused
    # kernel is dropless, which PyTorch matches where the capacity (here 4.0 * 27 / 3 = 36) drops none.
    reference = net(0.75 if mode == "portable" else 4.0)
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), net().state_dict().values()))
    x = np.random.default_rng(0).standard_normal((3, 9, 8)).astype(np.float32)
    with torch.no_grad(), moeify.router_losses(reference) as losses:
        expected = reference(torch.from_numpy(x)).numpy()
    dropped = sum(r.dropped for r in losses.layers)
    assert dropped > 0 if mode == "portable" else dropped == 0
    got = ort.InferenceSession(str(tmp_path / "d" / "model.onnx"),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.shape == expected.shape == (3, 9, 3)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_t5_fails_in_decomposition_with_the_root_cause(tmp_path):
    pytest.importorskip("onnxscript")
    sparse = moeify.convert(tiny_t5("relu"), moeify.MoEConfig(num_experts=4)).eval()
    with pytest.raises(moeify.MoeifyError, match="the dynamo exporter failed .*Cannot view a tensor"):
        export_onnx(sparse, tmp_path / "o", OnnxOptions(dynamo=True))
    assert not (tmp_path / "o").exists()
