"""No code runs from inputs: no unpickling or eval in moeify; a model directory's Python files and pickles never run."""
import ast
import io
import json
import pickle
from pathlib import Path

import pytest
from clitools import run

import moeify

PACKAGE = Path(moeify.__file__).parent
PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
CALLS = {"torch.load", "torch.jit.load", "torch.hub.load", "torch.package.PackageImporter", "pandas.read_pickle",
         "numpy.lib.format.read_array", "exec", "eval", "compile", "builtins.exec", "builtins.eval"}


def forbidden(source: str, filename: str = "<string>") -> list[str]:
    """Every import of a pickle-like module and every call that can run code from data, as 'file:line what'."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> dotted name it stands for (import numpy as np: np -> numpy)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[(a.asname or a.name).split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                if a.name.split(".")[0] in PICKLERS:
                    found.append(f"{filename}:{node.lineno} import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            if node.module.split(".")[0] in PICKLERS:
                found.append(f"{filename}:{node.lineno} from {node.module} import")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func, aliases)
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        if name in CALLS or (name and name.split(".")[0] in PICKLERS):
            found.append(f"{filename}:{node.lineno} {name}()")
        elif name == "numpy.load" and not (isinstance(keywords.get("allow_pickle"), ast.Constant)
                                           and keywords["allow_pickle"].value is False):
            if "allow_pickle" in keywords:
                found.append(f"{filename}:{node.lineno} numpy.load(allow_pickle=...)")
        if "trust_remote_code" in keywords and not (isinstance(keywords["trust_remote_code"], ast.Constant)
                                                    and keywords["trust_remote_code"].value is False):
            found.append(f"{filename}:{node.lineno} trust_remote_code=... in {name or 'a call'}()")
    return found


def dotted(func: ast.expr, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        return None  # a method of a computed value (model.eval(), re.compile(...) through a name stays a Name)
    parts.append(aliases.get(func.id, func.id))
    return ".".join(reversed(parts))


def test_the_scan_finds_each_way_of_running_code_from_a_file():
    sample = """
import pickle
import numpy as np
import torch as t
from joblib import load
from torch import load as tload
t.load("x.pt")
tload("x.pt")
pickle.loads(b"")
load("x.joblib")
np.load("x.npy", allow_pickle=True)
np.load("x.npy", allow_pickle=False)
np.load("x.npy")
AutoModel.from_pretrained("d", trust_remote_code=True)
AutoTokenizer.from_pretrained("d", trust_remote_code=False)
eval("1")
exec("x = 1")
model.eval()
re.compile("x")
"""
    assert forbidden(sample, "s.py") == [
        "s.py:2 import pickle", "s.py:5 from joblib import",
        "s.py:7 torch.load()", "s.py:8 torch.load()", "s.py:9 pickle.loads()", "s.py:10 joblib.load()",
        "s.py:11 numpy.load(allow_pickle=...)", "s.py:14 trust_remote_code=... in AutoModel.from_pretrained()",
        "s.py:16 eval()", "s.py:17 exec()"]


def test_moeify_never_unpickles_evaluates_or_trusts_remote_code():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50  # the whole package is scanned, not an empty glob
    found = [hit for f in files for hit in forbidden(f.read_text(), str(f.relative_to(PACKAGE.parent)))]
    assert found == []


def sentinel_code(sentinel: Path, body: str = "") -> str:
    """A module that leaves `sentinel` behind the moment it is imported (transformers copies remote code
    elsewhere before importing it, so the path is absolute)."""
    return f"from pathlib import Path\nPath({str(sentinel)!r}).write_text('ran')\n{body}"


class WritesOnUnpickle:
    """Unpickling this calls open(sentinel, "w"): the file appears only if something unpickles it."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return open, (self.sentinel, "w")


@pytest.fixture
def planted(hf_t5_dir, tmp_path):
    """The tiny T5 directory with remote code at every auto_map entry, a pickle next to its safetensors, and the
    sentinel any of them would write."""
    sentinel = tmp_path / "SENTINEL"
    for module in ("configuration_x", "modeling_x", "tokenization_x"):
        (hf_t5_dir / f"{module}.py").write_text(sentinel_code(sentinel))
    config = json.loads((hf_t5_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModel": "modeling_x.XModel",
                          "AutoModelForSeq2SeqLM": "modeling_x.XModel"}
    (hf_t5_dir / "config.json").write_text(json.dumps(config))
    (hf_t5_dir / "pytorch_model.bin").write_bytes(pickle.dumps(WritesOnUnpickle(sentinel)))
    return hf_t5_dir, sentinel


def test_python_files_and_pickles_beside_safetensors_are_ignored(planted, tmp_path):
    directory, sentinel = planted
    result = run("convert", directory, "--experts", 2, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert not sentinel.exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "moeify-manifest.json", "moeify-model.safetensors", "moeify.json"]


def test_an_architecture_defined_by_the_directory_s_code_is_refused(planted, tmp_path):
    directory, sentinel = planted
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "architectures": ["XModel"]}))
    result = run("convert", directory, "--experts", 2, "-o", tmp_path / "out")
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [
        "error: config architectures ['XModel'] name the directory's own Python code (modeling_x.XModel in "
        "auto_map), which moeify never runs: convert a model whose class ships with transformers"]
    assert not sentinel.exists() and not (tmp_path / "out").exists()


def test_a_model_type_defined_by_the_directory_s_code_is_refused(planted, tmp_path):
    directory, sentinel = planted
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "x-custom"}))
    result = run("convert", directory, "--experts", 2, "-o", tmp_path / "out")
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [
        f"error: {directory / 'config.json'}: model_type 'x-custom' is defined by the directory's own Python code "
        "(auto_map), which moeify never runs: convert a model whose class ships with transformers"]
    assert not sentinel.exists() and not (tmp_path / "out").exists()


def test_a_pickle_only_directory_is_refused_without_unpickling(planted, tmp_path):
    directory, sentinel = planted
    (directory / "model.safetensors").unlink()
    result = run("convert", directory, "--experts", 2, "-o", tmp_path / "out")
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [
        f"error: {directory} only has pickle weights (.bin/.pt), which moeify never loads: save the model with "
        "safetensors (save_pretrained(..., safe_serialization=True))"]
    assert not sentinel.exists()


def test_a_tokenizer_s_code_never_runs_even_when_stdin_says_yes(tmp_path, monkeypatch):
    from moeify.conversion.text import local_tokenizer

    sentinel = tmp_path / "SENTINEL"
    directory = tmp_path / "m"  # like a moeify output: tokenizer files, no config.json
    directory.mkdir()
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "XTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}}))
    (directory / "tokenization_x.py").write_text(sentinel_code(
        sentinel, "from transformers import PreTrainedTokenizer\nclass XTokenizer(PreTrainedTokenizer):\n    pass\n"))
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))  # someone answers transformers' prompt
    try:
        local_tokenizer([directory])
    except Exception:  # noqa: BLE001 - what matters is only whether the code ran
        pass
    assert not sentinel.exists()
