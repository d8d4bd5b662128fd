"""The package's import graph points one way: each folder imports only the stages before it.

    errors, config < layers < conversion < checkpoint < planner < targets < training < cli

The planner never builds a torch model: apart from calibration (which runs one), its modules and
the torch-free records they read import no torch at all.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moeify"
ORDER = ["errors", "config", "layers", "conversion", "checkpoint", "planner", "targets", "training", "cli"]
# Modules that stand outside the order: the public API and the two launch-name shims re-export.
ENTRY = {"moeify/__init__.py", "moeify/run.py", "moeify/distributed.py"}
TORCH_FREE = ["planner/cost.py", "planner/draw.py", "planner/hardware.py", "planner/nvidia_smi.py",
              "planner/placement.py", "planner/plan.py", "planner/search.py", "planner/topology.py",
              "planner/workload.py", "checkpoint/records.py", "checkpoint/files.py", "checkpoint/model_presets.py",
              "checkpoint/schemas.py", "planner/__init__.py", "config.py", "errors.py", "conversion/report.py",
              "conversion/__init__.py", "training/runs.py", "training/compare.py",
              "checkpoint/integrity.py", "planner/resources.py", "checkpoint/temporaries.py"]


def stage(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imports(path: Path) -> list[str]:
    """Every module `path` imports, at any depth of its code (lazy imports inside functions too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import (moeify imports absolutely)"
            found.append(node.module)
    return found


def modules():
    return [p for p in sorted(PACKAGE.rglob("*.py")) if str(p.relative_to(PACKAGE.parent)) not in ENTRY]


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_back_edges(path):
    mine = ORDER.index(stage(path))
    for name in imports(path):
        if name.startswith("moeify."):
            other = name.split(".")[1]
            assert ORDER.index(other) <= mine, f"{path.relative_to(PACKAGE)} imports {name}: a back-edge"


@pytest.mark.parametrize("name", TORCH_FREE)
def test_the_planner_side_is_torch_free(name):
    heavy = [m for m in imports(PACKAGE / name) if m.split(".")[0] in ("torch", "transformers", "onnx")]
    assert not heavy, f"{name} imports {heavy}"
    moeify = [m for m in imports(PACKAGE / name) if m.startswith("moeify.")]
    def file_of(module: str) -> str:
        rel = module.removeprefix("moeify.").replace(".", "/")
        return f"{rel}/__init__.py" if (PACKAGE / rel).is_dir() else f"{rel}.py"

    assert all(file_of(m) in TORCH_FREE for m in moeify), moeify


def test_no_cycle_between_targets():
    onnx = {m for p in (PACKAGE / "targets" / "onnx").glob("*.py") for m in imports(p)}
    dist = {m for p in (PACKAGE / "targets" / "distributed").glob("*.py") for m in imports(p)}
    assert not any(m.startswith("moeify.targets.distributed") for m in onnx)
    assert not any(m.startswith("moeify.targets.onnx") for m in dist)
