"""Start-up: help, presets and argument errors answer without importing torch and friends.

Each check runs in a fresh interpreter (this test process has imported torch long ago) and
asserts which modules were imported, not how long it took: timings are noisy on shared CPUs.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "onnx", "onnxruntime", "networkx", "scipy", "matplotlib")

# Runs `moeify ARGS` for each ARGS in sys.argv[1] (JSON) with click's CliRunner, then prints one
# JSON line: each run's exit code and stderr, and the heavy modules that got imported.
PROBE = """
import json, sys
from click.testing import CliRunner
from moeify.cli import main
runs = []
for args in json.loads(sys.argv[1]):
    if args == "EVERY-HELP":
        for argv in [["--help"]] + [[name, "--help"] for name in main.commands]:
            result = CliRunner().invoke(main, argv)
            runs.append({"args": argv, "code": result.exit_code, "stderr": result.stderr})
        continue
    result = CliRunner().invoke(main, args)
    runs.append({"args": args, "code": result.exit_code, "stderr": result.stderr})
print(json.dumps({"runs": runs, "imported": [m for m in HEAVY if m in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


def probe(cwd, *argvs):
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(list(argvs))], check=False, capture_output=True,
                          text=True, cwd=cwd, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_and_every_help_stay_light(tmp_path):
    out = probe(tmp_path, "EVERY-HELP", ["presets"], ["--version"])
    assert {tuple(r["args"]) for r in out["runs"]} >= {("--help",), ("convert", "--help"), ("run", "--help"),
                                                       ("presets",)}
    assert all(r["code"] == 0 for r in out["runs"]), out["runs"]
    assert out["imported"] == []


@pytest.mark.parametrize("args,message", [
    (["convert", "t5-smal"], "error: unknown preset or missing path 't5-smal': did you mean t5-small"),
    (["convert", "./no/such/dir"], "error: ./no/such/dir does not exist"),
    (["plan", "t5-smal", "--topology", "dgx-a100"], "error: unknown preset or missing path 't5-smal'"),
    (["convert", "t5-small", "--device", "tpu"], "Invalid value for '--device'"),
    (["convert", "t5-small", "--experts", "0"], "--experts must be a positive integer, got 0"),
    (["run", "no/such/export"], "does not exist"),
    (["inspect", "no/such/model"], "error: "),
])
def test_argument_errors_answer_before_torch_is_imported(tmp_path, args, message):
    out = probe(tmp_path, args)
    (run,) = out["runs"]
    assert run["code"] == 2, run
    assert message in run["stderr"]
    if run["stderr"].startswith("error: "):  # moeify's own errors are one line
        assert len(run["stderr"].strip().splitlines()) == 1, run["stderr"]
    assert out["imported"] == []
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_the_public_api_is_lazy_but_complete():
    code = ("import sys, moeify\n"
            "assert 'torch' not in sys.modules\n"
            "listed = set(moeify.__all__)\n"
            "assert listed <= set(dir(moeify)), listed - set(dir(moeify))\n"
            "from moeify import SwitchFFN, MoEConfig\n"
            "assert 'torch' in sys.modules and moeify.convert.__name__ == 'convert'\n"
            "assert all(getattr(moeify, name) is not None for name in listed)\n"
            "try:\n    moeify.no_such_name\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit(1)\n")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def test_the_cli_choices_spelled_out_match_the_modules_they_mirror():
    """plan and export name their choices without importing networkx, scipy or onnx: they must match."""
    from moeify.cli import export, plan
    from moeify.planner import cost, hardware, search
    from moeify.targets.onnx import options

    assert plan.GPUS == tuple(sorted(hardware.GPUS)) and plan.DEFAULT_GPU == hardware.DEFAULT_GPU
    assert plan.OPTIMIZERS == tuple(sorted(cost.OPTIMIZER_BYTES_PER_PARAM))
    assert (plan.LAYOUTS, plan.ALGORITHMS) == (search.LAYOUTS, search.ALGORITHMS)
    assert (export.MODES, export.DTYPES, export.PROVIDERS) == (options.MODES, options.DTYPES, options.PROVIDERS)
    assert export.QUANTIZE == options.QUANTIZE
