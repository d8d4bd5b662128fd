"""Shared fixtures: tiny models and a local Hugging Face directory."""
import pytest
from tiny import tiny_t5

from moeify import cli


@pytest.fixture
def t5_v1_0():
    return tiny_t5("relu")


@pytest.fixture
def t5_v1_1():
    return tiny_t5("gated-gelu")


@pytest.fixture
def hf_t5_dir(tmp_path):
    """A local Hugging Face T5 directory: config.json + model.safetensors."""
    model = tiny_t5("relu", seed=3)
    path = tmp_path / "hf-t5"
    model.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """The CLI's console at 200 columns: long layer names stay on one line in captured output."""
    monkeypatch.setattr(cli.console, "width", 200)


@pytest.fixture
def console80(monkeypatch):
    """The CLI's console at a standard terminal's 80 columns (overrides wide_console)."""
    monkeypatch.setattr(cli.console, "width", 80)


@pytest.fixture(scope="module")
def switch_t5_tiny(tmp_path_factory):
    """`moeify convert t5-tiny --experts 4` (weights, no forward check), once per module, outside each tmp_path."""
    from clitools import run

    path = tmp_path_factory.mktemp("model") / "switch"
    result = run("convert", "t5-tiny", "--experts", 4, "--no-check", "-o", path)
    assert result.exit_code == 0, result.output
    return path
