"""A final pass over generated bad inputs: each file a command reads, mutated a few hundred ways (seeded), and hostile
numbers in its flags, through the real CLI. Every run either succeeds or refuses in one line with exit 2: never a
traceback, never a partial output."""
import contextlib
import json
import random
import shutil
import signal
from pathlib import Path

import pytest
from clitools import run
from tiny import tiny_t5

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


class TookTooLong(BaseException):
    """Not an Exception: neither the CLI nor CliRunner may turn a hang into an ordinary outcome."""


@contextlib.contextmanager
def time_limit(seconds: int, context: str):
    """Fail the case, not the whole session, when a command hangs (a huge size accepted and then worked on)."""
    def expire(signum, frame):
        raise TookTooLong(f"still running after {seconds} s: {context}")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check_outcome(result, work: Path, context: str) -> int:
    """Exit 0, or exit 2 with one `error: ` line; no traceback and no temporary left anywhere under `work`."""
    context = f"{context}\n{result.output}\n{result.exception!r}"
    assert result.exception is None or isinstance(result.exception, SystemExit), context
    assert result.exit_code in (0, 2), context
    if result.exit_code == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), context
    assert not [p for p in work.rglob(".*") if p.name != ".gitignore"], context
    return result.exit_code


CORPUS = "".join(f"line {i}: the quick brown fox jumps over the lazy dog, {i * 7 % 13} times.\n" for i in range(400))
TRAIN_FAST = ["--experts", 2, "--seq-len", 16, "--batch-size", 2, "--eval-every", 0, "--validation-batches", 1]


@pytest.fixture(scope="module")
def dense_sources(tmp_path_factory):
    """A local Hugging Face T5 (one file and sharded), a small text and a two-step run of that T5: what convert and
    train read. Its 384 tokens hold UTF-8 bytes, and a T5 this small resumes in a fraction of a second."""
    root = tmp_path_factory.mktemp("fuzz-dense")
    tiny_t5("relu", seed=3, vocab_size=384).save_pretrained(root / "hf")
    tiny_t5("relu", seed=3, vocab_size=384).save_pretrained(root / "sharded", max_shard_size="20KB")
    assert len(list((root / "sharded").glob("model-*.safetensors"))) >= 2
    (root / "corpus.txt").write_text(CORPUS)
    result = run("train", root / "hf", *TRAIN_FAST, "--steps", 2, "--save-every", 1, "--log-every", 1,
                 "--text", root / "corpus.txt", "-o", root / "run")
    assert result.exit_code == 0, result.output
    return root


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


# kind -> (the directory copied, the file mutated in it)
DENSE_KINDS = {"config.json for convert": ("hf", "config.json"),
               "model.safetensors.index.json for convert": ("sharded", "model.safetensors.index.json"),
               "run.json for train --resume": ("run", "run.json"),
               "trainer.json for train --resume": ("run", "checkpoints/step-2/trainer.json"),
               "metrics.csv for train --resume": ("run", "metrics.csv")}


@pytest.mark.parametrize("kind", DENSE_KINDS)
def test_mutated_convert_and_resume_inputs_never_give_a_traceback_or_partial_output(dense_sources, tmp_path, kind):
    rng = random.Random(kind)
    folder, file = DENSE_KINDS[kind]
    original = (dense_sources / folder / file).read_text()
    cases = 25
    outcomes = {0: 0, 2: 0}
    for case in range(cases):
        work = tmp_path / f"case{case}"
        shutil.copytree(dense_sources / folder, work / folder)
        # Each checkpoint is a moeify directory: its manifest would refuse the changed trainer.json first.
        for manifest in (work / folder).rglob("moeify-manifest.json"):
            manifest.unlink()
        target = work / folder / file
        target.write_bytes(mutate_csv(original, rng) if file.endswith(".csv") else mutate(original, rng))
        before = snapshot(work / folder)
        context = f"{kind} case {case}: {target.read_bytes()[:300]!r}"
        with time_limit(120, context):
            if kind.endswith("for convert"):
                result = run("convert", work / folder, "--experts", 2, "--no-check", "-o", work / "out" / "m")
            else:
                result = run("train", "--resume", "-o", work / folder, "--steps", 3)  # one more step
        outcomes[check_outcome(result, work, context)] += 1
        if kind.endswith("for convert"):
            assert (result.exit_code == 0) == (work / "out" / "m").is_dir(), context
            assert result.exit_code == 0 or not (work / "out").exists(), context  # no partial output
        elif result.exit_code == 2:  # the run keeps every file it had, the checkpoints byte for byte
            after = snapshot(work / folder)
            assert sorted(after) == sorted(before), context
            assert all(after[name] == data for name, data in before.items() if name.startswith("checkpoints/")), \
                context
        else:
            assert (work / folder / "checkpoints" / "step-3" / "trainer.json").is_file(), context
        shutil.rmtree(work)
    assert outcomes[2] >= cases // 3, outcomes  # mutations are refused, not ignored


HOSTILE = [0, -1, 10 ** 12, "nan", "inf", "1e-300", "abc"]
# Per command: the arguments before the flags, and flags that keep it small and fast; the flag under test replaces
# its own default. MODEL is the converted tiny T5, EXPORT its torch-distributed export, DENSE the local Hugging Face
# T5 and TEXT its small corpus.
FLAG_COMMANDS = {
    "convert": (["convert", "t5-tiny", "--no-check"], {"--experts": 2}),
    "train": (["train", "DENSE"], {"--experts": 2, "--steps": 2, "--batch-size": 2, "--seq-len": 16, "--eval-every": 0,
                                   "--validation-batches": 1, "--text": "TEXT"}),
    "calibrate": (["calibrate", "MODEL"], {"--batches": 1, "--batch-size": 1, "--seq-len": 8}),
    "plan": (["plan", "t5-tiny", "--topology", "hgx-a100-4"], {}),
    "export": (["export", "MODEL", "--target", "torch-distributed"], {"--world-size": 2}),
    "run": (["run", "EXPORT"], {"--steps": 1}),
}
FLAGS = {"convert": ["--experts", "--capacity-factor", "--top-k", "--every"],
         "train": ["--steps", "--batch-size", "--seq-len", "--lr"],
         "calibrate": ["--batches", "--batch-size", "--seq-len"],
         "plan": ["--experts", "--nodes", "--tokens-per-rank", "--efficiency"],
         "export": ["--world-size"],
         "run": ["--batch", "--seq", "--steps", "--nproc"]}
# Valid values that would legitimately run for a very long time: left out. (`run --steps 10**12` stays: torchrun is
# never started here.)
LONG = {("train", "--steps", 10 ** 12)}
FLAG_CASES = [(command, flag, value) for command, flags in FLAGS.items() for flag in flags for value in HOSTILE
              if (command, flag, value) not in LONG]


def hostile_args(command: str, flag: str, value, sources: Path, dense: Path, out: Path) -> list:
    head, defaults = FLAG_COMMANDS[command]
    names = {"MODEL": sources / "model", "EXPORT": sources / "export", "DENSE": dense / "hf",
             "TEXT": dense / "corpus.txt"}
    options = {**defaults, flag: value}
    args = [names.get(a, a) for a in head] + [names.get(a, a) for pair in options.items() for a in pair]
    return args + ([] if command == "run" else ["-o", out])


@pytest.mark.parametrize("command, flag, value", FLAG_CASES)
def test_hostile_numbers_in_flags_run_or_are_refused_in_one_line(sources, dense_sources, tmp_path, monkeypatch,
                                                                 command, flag, value):
    launched = []
    # A `run` that passes every check would start torchrun: record the launch instead. (`run --batch 10**12` and
    # `--seq 10**12` get there: only a rank knows its device's memory, and each refuses them, test_run_faults.py.)
    monkeypatch.setattr("moeify.cli.run.launch", lambda command: launched.append(command) or 0)
    out = tmp_path / "out" / ("p.json" if command in ("plan", "calibrate") else "o")
    args = hostile_args(command, flag, value, sources, dense_sources, out)
    context = " ".join(map(str, args))
    with time_limit(60, context):
        result = run(*args)
    if check_outcome(result, tmp_path, context) == 2:
        assert not (tmp_path / "out").exists() and not launched, context
    if value in (0, -1, "abc", "1e-300") and flag not in ("--lr", "--capacity-factor", "--efficiency"):
        assert result.exit_code == 2, context  # a count of 0, -1, "abc" or 1e-300 is no count
    if value in ("nan", "inf"):
        assert result.exit_code == 2, context


@pytest.mark.parametrize("key", ["num_layers", "num_decoder_layers"])
def test_a_huge_layer_count_is_refused_before_a_model_is_built(dense_sources, tmp_path, key):
    """One module per layer, built on meta too before any memory estimate: 10**15 of them would never finish."""
    shutil.copytree(dense_sources / "hf", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, key: 10 ** 15}))
    with time_limit(60, key):
        result = run("convert", tmp_path / "hf", "--experts", 2, "--no-check", "-o", tmp_path / "out")
    assert check_outcome(result, tmp_path, key) == 2 and not (tmp_path / "out").exists()
    assert f"{key} is 1,000,000,000,000,000, more layers than moeify builds" in result.stderr
