"""Shared by the ONNX tests: a tiny converted T5 saved as a moeify directory (one per test module)."""
import pytest
from tiny import tiny_t5

import moeify


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "switch"
    moeify.save(moeify.convert(tiny_t5("relu"), moeify.MoEConfig(num_experts=4)), path)
    return path
