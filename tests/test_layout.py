"""Layout rules of the source tree: every call into torch.distributed lives in one file.

The check reads code, not text: docstrings, comments and strings may name torch.distributed
(moeify/cli/run.py starts `python -m torch.distributed.run` as a subprocess), code may not.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "moeify"
COMM = PACKAGE / "targets" / "distributed" / "comm.py"
ALIAS = "dist"  # the usual alias of torch.distributed: `dist.anything` in code is refused too


def _dotted(node: ast.AST) -> str | None:
    """`a.b.c` for a chain of attributes on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def _is_torch_distributed(name: str | None) -> bool:
    return name is not None and (name == "torch.distributed" or name.startswith("torch.distributed."))


def distributed_uses(source: str) -> list[tuple[int, str]]:
    """(line, what) for each place the code imports or reaches torch.distributed."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if _is_torch_distributed(a.name)]
        elif isinstance(node, ast.ImportFrom):
            names = [f"{node.module}.{a.name}" if node.module else a.name for a in node.names]
            if _is_torch_distributed(node.module) or any(_is_torch_distributed(n) for n in names):
                found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Attribute) and not isinstance(node.value, ast.Attribute):
            name = _dotted(node)  # the innermost attribute of a chain: `torch.distributed`, `dist.x`
            if _is_torch_distributed(name) or (name or "").startswith(f"{ALIAS}."):
                found.append((node.lineno, name))
        elif isinstance(node, ast.Call) and _dotted(node.func) in ("importlib.import_module", "import_module",
                                                                   "__import__"):
            args = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            found += [(node.lineno, f"import_module({a!r})") for a in args if _is_torch_distributed(a)]
    return sorted(found)


def test_only_comm_calls_torch_distributed():
    files = sorted(PACKAGE.rglob("*.py"))
    assert COMM in files and len(files) > 30  # the scan sees the whole package
    offenders = [f"{path.relative_to(ROOT)}:{line}: {what}"
                 for path in files if path != COMM
                 for line, what in distributed_uses(path.read_text())]
    assert not offenders, ("torch.distributed is used outside moeify/targets/distributed/comm.py; "
                           "add a function there and call it instead:\n" + "\n".join(offenders))


def test_comm_is_where_torch_distributed_is_imported():
    assert any(what == "import torch.distributed" for _, what in distributed_uses(COMM.read_text()))


def test_the_scan_finds_every_form_and_ignores_text():
    code = '''
"""Docstrings may say torch.distributed.all_reduce."""
import torch
import torch.distributed as dist
from torch.distributed import all_reduce
from torch import distributed
from torch.distributed.device_mesh import DeviceMesh
import importlib

torch.distributed.barrier()
dist.all_reduce(x)
importlib.import_module("torch.distributed")
cmd = ["-m", "torch.distributed.run"]  # a module name for a subprocess, not a call
from torch.nn.parallel import DistributedDataParallel
'''
    assert [line for line, _ in distributed_uses(code)] == [4, 5, 6, 7, 10, 11, 12]
