"""A final pass over generated bad inputs: each file a command reads, mutated a few hundred ways (seeded), through the
real CLI. Every run either succeeds or refuses in one line with exit 2: never a traceback, never a partial output."""
import json
import random
import shutil
from pathlib import Path

import pytest
from clitools import run

from moeify.training.runs import MetricsRow, MetricsWriter, RunInfo, write_run_info

pytestmark = pytest.mark.slow
CASES_PER_KIND = 60
VALUES = [None, True, False, -1, 0, 10 ** 15, 1.5, -2.5, "", "x", "8", [], [1, "a"], {}, {"a": 1}]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A converted tiny T5, its plan, a calibrated load file and a topology: the valid inputs to mutate."""
    root = tmp_path_factory.mktemp("fuzz")
    assert run("convert", "t5-tiny", "--experts", 4, "--no-check", "-o", root / "model").exit_code == 0
    assert run("plan", root / "model", "--topology", "hgx-a100-4", "-o", root / "plan.json").exit_code == 0
    assert run("calibrate", root / "model", "--batches", 1, "--batch-size", 1, "--seq-len", 16,
               "-o", root / "load.json").exit_code == 0
    topology = {"directed": False, "multigraph": False, "graph": {},
                "nodes": [{"id": f"node0/gpu{i}", "kind": "gpu", "host": "node0", "local_index": i, "numa": 0,
                           "device": "x", "memory_GB": 80.0, "peak_TFLOPs": 100.0} for i in range(2)],
                "edges": [{"source": "node0/gpu0", "target": "node0/gpu1", "bw_GBps": 50.0, "latency_us": 1.0,
                           "link": "nvlink3"}]}
    (root / "topology.json").write_text(json.dumps(topology))
    assert run("export", root / "model", "--target", "torch-distributed", "--world-size", 2,
               "-o", root / "export").exit_code == 0
    for name, loss in (("runa", 3.0), ("runb", 2.5)):  # two tiny runs for `compare`
        info = RunInfo(name=name, source="t5-tiny", dense=False, seed=0, params_total=10, params_active=5,
                       moe_config={"num_experts": 4}, steps=20, batch_size=2, seq_len=16, objective="span-corruption")
        write_run_info(root / name, info)
        with MetricsWriter(root / name, ("ffn",)) as w:
            for step in (10, 20):
                w.append(MetricsRow(step, step * 32, step / 10, 1e-3, loss + 1, loss - step / 100,
                                    load_cv={"ffn": 0.1}))
    return root


def paths(value, at=()):
    """Every (path to a value) inside a JSON document, the root included."""
    yield at
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from paths(child, (*at, key))


def mutate(text: str, rng: random.Random) -> bytes:
    """One corruption of a JSON file: a value of another type, a key gone or unknown, or broken bytes."""
    kind = rng.choice(["value", "value", "value", "drop", "unknown", "truncate", "flip", "empty", "binary"])
    raw = text.encode()
    if kind == "truncate":
        return raw[:rng.randrange(len(raw))]
    if kind == "flip":
        i = rng.randrange(len(raw))
        return raw[:i] + bytes([raw[i] ^ (1 << rng.randrange(8))]) + raw[i + 1:]
    if kind == "empty":
        return b""
    if kind == "binary":
        return bytes(rng.randrange(256) for _ in range(64))
    doc = json.loads(text)
    at = rng.choice(list(paths(doc)))
    parent, key = (doc, None) if not at else (_get(doc, at[:-1]), at[-1])
    if kind == "value" or key is None:
        value = rng.choice(VALUES)
        if key is None:
            doc = value
        else:
            parent[key] = value
    elif kind == "drop":
        del parent[key]
    elif isinstance(parent, dict):
        parent[f"unexpected_{rng.randrange(100)}"] = rng.choice(VALUES)
    else:
        parent.append(rng.choice(VALUES))
    return json.dumps(doc).encode()


def mutate_csv(text: str, rng: random.Random) -> bytes:
    """One corruption of a CSV file: a cell replaced, a row cut or lost, a column renamed, or broken bytes."""
    lines = text.splitlines(keepends=True)
    kind = rng.choice(["cell", "cell", "cut", "drop", "header", "flip", "empty"])
    if kind in ("cut", "flip", "empty"):
        raw = text.encode()
        if kind == "empty":
            return b""
        i = rng.randrange(len(raw))
        return raw[:i] if kind == "cut" else raw[:i] + bytes([raw[i] ^ (1 << rng.randrange(8))]) + raw[i + 1:]
    row = rng.randrange(len(lines)) if kind != "header" else 0
    cells = lines[row].rstrip("\r\n").split(",")
    if kind == "drop":
        del lines[row]
    else:
        cells[rng.randrange(len(cells))] = rng.choice(["", "x", "-1", "nan", "1e999", "3.5", "a,b", '"'])
        lines[row] = ",".join(cells) + "\n"
    return "".join(lines).encode()


def _get(doc, at):
    for key in at:
        doc = doc[key]
    return doc


def read(kind: str, sources: Path, work: Path):
    """Run the command that reads file `kind` from `work` (a copy of the sources with that file mutated)."""
    model = work / "model"
    if kind in ("run.json", "metrics.csv"):
        return run("compare", work / "runa", work / "runb", "--json")
    if kind == "moeify.json for calibrate":
        return run("calibrate", model, "--batches", 1, "--batch-size", 1, "--seq-len", 8, "-o", work / "out" / "l.json")
    if kind == "moeify.json for export":
        return run("export", model, "--target", "torch", "-o", work / "out" / "t")
    if kind == "manifest.json":  # checked by the launcher before torchrun starts: --nproc 3 never launches
        return run("run", work / "export", "--nproc", 3)
    if kind == "moeify.json":
        return run("inspect", model)
    if kind == "plan.json":
        return run("inspect", work / "plan.json")
    flags = ["--topology", work / "topology.json"] if kind == "topology.json" else \
        ["--topology", "hgx-a100-4", "--load", work / "load.json"]
    return run("plan", model, *flags, "-o", work / "out" / "p.json")


KINDS = ["moeify.json", "plan.json", "load.json", "topology.json", "manifest.json", "run.json", "metrics.csv",
         "moeify.json for calibrate", "moeify.json for export"]


@pytest.mark.parametrize("kind", KINDS)
def test_mutated_inputs_never_give_a_traceback_or_partial_output(sources, tmp_path, kind):
    rng = random.Random(kind)
    file = kind.split(" ")[0]
    where = {"moeify.json": Path("model"), "manifest.json": Path("export"), "run.json": Path("runb"),
             "metrics.csv": Path("runb")}.get(file, Path())
    original = (sources / where / file).read_text()
    cases = CASES_PER_KIND if kind in KINDS[:5] else CASES_PER_KIND // 2  # the slower commands, fewer cases
    outcomes = {0: 0, 2: 0}
    for case in range(cases):
        work = tmp_path / f"case{case}"
        shutil.copytree(sources, work)
        # The manifest would refuse any changed byte first; without it (a model from before manifests) each
        # reader's own checks face the mutation.
        (work / "model" / "moeify-manifest.json").unlink()
        target = work / where / file
        target.write_bytes(mutate_csv(original, rng) if file.endswith(".csv") else mutate(original, rng))
        result = read(kind, sources, work)
        context = f"case {case}: {target.read_bytes()[:300]!r}\n{result.output}"
        assert result.exception is None or isinstance(result.exception, SystemExit), context
        assert result.exit_code in (0, 2), context
        outcomes[result.exit_code] += 1
        if result.exit_code == 2:
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), context
            assert not (work / "out").exists(), context  # no partial output
        assert not [p for p in work.rglob(".*") if p.name != ".gitignore"], context  # no temporaries left
        shutil.rmtree(work)
    assert outcomes[2] >= cases // 3, outcomes  # mutations are refused, not ignored
    assert kind != "manifest.json" or outcomes[0] == 0  # and --nproc 3 never starts torchrun
