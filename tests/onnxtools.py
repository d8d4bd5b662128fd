"""Running exported graphs in onnxruntime and comparing T5 encoder + decoder with PyTorch."""
import numpy as np
import onnxruntime as ort
import torch


def run(path, inputs: dict) -> np.ndarray:
    """The first output of the graph at `path` on CPU, fed torch tensors."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]


def assert_t5_graphs_match(directory, expected, ids, mask, dec_ids) -> np.ndarray:
    """encoder_model.onnx then decoder_model.onnx equal `expected` (a T5 output) at atol 1e-4;
    returns the encoder's hidden states."""
    hidden = run(directory / "encoder_model.onnx", {"input_ids": ids, "attention_mask": mask})
    np.testing.assert_allclose(hidden, expected.encoder_last_hidden_state.numpy(), atol=1e-4, rtol=0)
    logits = run(directory / "decoder_model.onnx", {
        "input_ids": dec_ids, "encoder_hidden_states": torch.from_numpy(hidden), "encoder_attention_mask": mask})
    np.testing.assert_allclose(logits, expected.logits.numpy(), atol=1e-4, rtol=0)
    return hidden
