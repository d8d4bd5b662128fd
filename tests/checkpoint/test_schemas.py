"""Every file moeify reads meets its schema (checkpoint/schemas.py): a valid one passes, each corruption is one line
naming the file, the JSON path, what was expected and the fix, with exit 2, through the command that reads it."""
import copy
import json
import shutil

import pytest
from clitools import assert_user_error, run
from tiny import tiny_t5

import moeify
from moeify.training.runs import RunInfo, write_run_info

L0 = "encoder.block.1.layer.1.DenseReluDense"
FIX = {"moeify.json": "convert the model again with `moeify convert`",
       "plan.json": "regenerate it with `moeify plan`",
       "load.json": "create it again with `moeify calibrate`",
       "topology.json": "fix the file: node-link JSON as the README's \"Planning the sharding\" describes",
       "manifest.json": "re-run `moeify export --target torch-distributed`"}
PLAN = {"schema": "moeify.plan", "version": 1, "world_size": 2,
        "mesh": {"shape": [1, 2], "dim_names": ["dp", "ep"], "ranks": [[0, 1]]}, "layout": "contiguous",
        "expert_parallel_groups": [[0, 1]], "data_parallel_groups": [[0], [1]],
        "layers": [{"name": L0, "num_experts": 4, "placement": [0, 0, 1, 1], "all_to_all": "flat",
                    "replicas": {"0": [0, 1]}, "all_to_all_ms": 0.5, "lower_bound_ms": 0.25, "compute_ms": 1.0}],
        "estimate": {"step_ms": 2.0, "all_to_all_ms": 0.5, "lower_bound_ms": 0.25, "compute_ms": 1.0,
                     "allreduce_ms": 0.5, "memory_per_rank_bytes": 1000, "memory_limit_bytes": 2000,
                     "busiest_link": ["node0/gpu0", "node0/gpu1"]},
        "model": {"name": "T5ForConditionalGeneration", "tokens_per_rank": 1024, "calibrated": False},
        "topology": {"name": "hgx-a100-4", "hosts": 1, "gpus_per_host": 2, "device": "A100-SXM4-80GB"},
        "alternatives": [{"expert_parallel": 2, "data_parallel": 1, "layout": "contiguous", "all_to_all": ["flat"],
                          "step_ms": 2.0, "all_to_all_ms": 0.5, "lower_bound_ms": 0.25,
                          "memory_per_rank_bytes": 1000, "fits": True}]}
TOPOLOGY = {"directed": False, "multigraph": False, "graph": {"message_overhead_us": 5.0},
            "nodes": [{"id": f"node0/gpu{i}", "kind": "gpu", "host": "node0", "local_index": i, "numa": 0,
                       "device": "x", "memory_GB": 80.0, "peak_TFLOPs": 100.0} for i in range(2)],
            "edges": [{"source": "node0/gpu0", "target": "node0/gpu1", "bw_GBps": 50.0, "latency_us": 1.0,
                       "link": "nvlink3"}]}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A converted tiny T5 (4 Switch layers of 4 experts), saved once; each test copies it."""
    out = tmp_path_factory.mktemp("converted") / "m"
    moeify.save(moeify.convert(tiny_t5(), moeify.MoEConfig(num_experts=4)), out)
    return out


@pytest.fixture(scope="module")
def exported(converted, tmp_path_factory):
    """Its torch-distributed export for 2 ranks: `moeify run` checks the whole directory before any process starts."""
    out = tmp_path_factory.mktemp("exported") / "d"
    assert run("export", converted, "--target", "torch-distributed", "--world-size", 2, "-o", out).exit_code == 0
    return out


@pytest.fixture
def meta(converted):
    return json.loads((converted / "moeify.json").read_text())


def valid(kind, meta, exported):
    if kind == "moeify.json":
        return copy.deepcopy(meta)
    if kind == "manifest.json":
        return json.loads((exported / "manifest.json").read_text())
    if kind == "load.json":
        layers = {layer["name"]: {"tokens": [3, 1, 0, 0], "fraction": [0.75, 0.25, 0.0, 0.0], "dropped_fraction": 0.0}
                  for layer in meta["summary"]["moe_layers"]}
        return {"schema": "moeify.load", "version": 1, "model": "T5ForConditionalGeneration", "layers": layers,
                "tokenizer": "utf-8 bytes"}
    return copy.deepcopy({"plan.json": PLAN, "topology.json": TOPOLOGY}[kind])


def read_by_cli(tmp_path, kind, data, converted, exported):
    """Write `data` as a file of `kind` and run the command that reads it; returns (its path, the result)."""
    model = tmp_path / "m"
    shutil.copytree(converted, model)
    if kind == "moeify.json":
        (model / "moeify.json").write_text(json.dumps(data))
        # The manifest would refuse any rewritten moeify.json first: here its schema is what faces the file.
        return model / "moeify.json", run("inspect", model, "--no-verify")
    if kind == "manifest.json":  # a valid manifest passes on to the rank count, before any process starts
        shutil.copytree(exported, tmp_path / "d")
        (tmp_path / "d" / kind).write_text(json.dumps(data))
        return tmp_path / "d" / kind, run("run", tmp_path / "d", "--nproc", 3)
    path = tmp_path / kind
    path.write_text(json.dumps(data))
    if kind == "plan.json":
        return path, run("inspect", path)
    flags = ["--topology", path] if kind == "topology.json" else ["--topology", "hgx-a100-4", "--load", path]
    return path, run("plan", model, *flags, "-o", tmp_path / "p.json")


@pytest.mark.parametrize("kind", list(FIX))
def test_a_valid_file_passes(tmp_path, kind, meta, converted, exported):
    path, result = read_by_cli(tmp_path, kind, valid(kind, meta, exported), converted, exported)
    if kind == "manifest.json":
        assert_user_error(result, tmp_path, f"{path.parent} was exported for 2 ranks: pass --nproc 2")
    else:
        assert result.exit_code == 0, result.output


DROP = object()
CASES = [  # kind, JSON path to change, its new value (DROP: remove the key), the message between path and fix
    ("moeify.json", ("moe_config", "num_experts"), "8", ': moe_config.num_experts must be an integer >= 1, got "8"'),
    ("moeify.json", ("summary", "dtype"), DROP, ": summary.dtype is missing"),
    ("moeify.json", ("moe_config", "num_expert"), 8,
     ": moe_config.num_expert is an unknown key (did you mean num_experts?)"),
    ("moeify.json", ("format_version",), 2, " has format version 2, this moeify reads 3"),
    ("moeify.json", ("format",), "moeify.plan",
     ' is not a moeify model\'s metadata ("format" is "moeify.plan", not "moeify")'),
    ("moeify.json", ("summary",), None, ": summary must be an object, got null"),
    ("moeify.json", ("summary", "moe_layers", 1, "experts_held"), -3,
     ": summary.moe_layers[1].experts_held must be an integer >= 0, got -3"),
    ("moeify.json", ("summary", "moe_layers", 0, "routing", "capacity_factor"), "1.25",
     ': summary.moe_layers[0].routing.capacity_factor must be a finite number > 0, got "1.25"'),
    ("moeify.json", ("summary", "moe_layers", 0, "init_report"), {"tokens": 5, "load_cv": "x", "random_load_cv": 0.1},
     ': summary.moe_layers[0].init_report.load_cv must be a finite number, got "x"'),
    ("moeify.json", ("source",), ["hf"], ': source must be an object, got ["hf"]'),
    ("moeify.json", ("summary", "total_params"), True, ": summary.total_params must be an integer >= 0, got true"),
    ("plan.json", ("layers", 0, "num_experts"), "4", ': layers[0].num_experts must be an integer >= 1, got "4"'),
    ("plan.json", ("estimate", "step_ms"), DROP, ": estimate.step_ms is missing"),
    ("plan.json", ("layers", 0, "experts"), 4, ": layers[0].experts is an unknown key (did you mean num_experts?)"),
    ("plan.json", ("version",), 2, " has version 2, this moeify reads 1"),
    ("plan.json", ("schema",), DROP, ' is not a moeify sharding plan (no "schema" key)'),
    ("plan.json", ("layers",), None, ": layers must be a non-empty array, got null"),
    ("plan.json", ("layers",), [], ": layers must be a non-empty array, got []"),
    ("plan.json", ("mesh", "ranks", 0, 1), -1, ": mesh.ranks[0][1] must be an integer >= 0, got -1"),
    ("plan.json", ("layers", 0, "replicas", "0", 1), "1",
     ': layers[0].replicas["0"][1] must be an integer >= 0, got "1"'),
    ("plan.json", ("layers", 0, "replicas", "x"), [0], ": layers[0].replicas.x is not an expert id"),
    ("plan.json", ("layers", 0, "all_to_all"), "ring", ': layers[0].all_to_all must be one of flat, hierarchical, '
                                                       'got "ring"'),
    ("plan.json", ("alternatives", 0, "fits"), "yes", ': alternatives[0].fits must be true or false, got "yes"'),
    ("load.json", ("layers", L0, "fraction", 0), "0.75",
     f': layers["{L0}"].fraction[0] must be a finite number >= 0 and <= 1, got "0.75"'),
    ("load.json", ("layers", L0, "fraction"), DROP, f': layers["{L0}"].fraction is missing'),
    ("load.json", ("layers", L0, "fractions"), [1.0], f': layers["{L0}"].fractions is an unknown key '
                                                      "(did you mean fraction?)"),
    ("load.json", ("version",), 2, " has version 2, this moeify reads 1"),
    ("load.json", ("schema",), "moeify.plan",
     ' is not a `moeify calibrate` load file ("schema" is "moeify.plan", not "moeify.load")'),
    ("load.json", ("layers",), None, ": layers must be an object, got null"),
    ("load.json", ("layers", L0, "tokens", 2), -1, f': layers["{L0}"].tokens[2] must be an integer >= 0, got -1'),
    ("load.json", ("layers", L0), [0.5, 0.5], f': layers["{L0}"] must be an object, got [0.5, 0.5]'),
    ("topology.json", ("nodes", 0, "memory_GB"), "80", ': nodes[0].memory_GB must be a finite number, got "80"'),
    ("topology.json", ("nodes", 1, "kind"), DROP, ": nodes[1].kind is missing"),
    ("topology.json", ("nodes", 0, "colour"), "red", ": nodes[0].colour is an unknown key"),
    ("topology.json", ("edges",), DROP, ": the top level must have exactly one of edges or links"),
    ("topology.json", ("links",), [], ": the top level must have exactly one of edges or links"),
    ("topology.json", ("edges", 0, "bw_GBps"), None, ": edges[0].bw_GBps must be a finite number, got null"),
    ("topology.json", ("nodes", 0, "local_index"), -1, ": nodes[0].local_index must be an integer >= 0, got -1"),
    ("topology.json", ("graph", "message_overhead_us"), "5", ': graph.message_overhead_us must be a finite number '
                                                           '>= 0, got "5"'),
    ("topology.json", ("nodes", 0, "kind"), "tpu", ': nodes[0].kind must be one of gpu, nvswitch, pcie, nic, cpu, '
                                                  'switch, got "tpu"'),
    ("topology.json", (), [], ": the top level must be an object, got []"),
    ("manifest.json", ("world_size",), "2", ': world_size must be an integer >= 1, got "2"'),
    ("manifest.json", ("ranks", 0, "file"), DROP, ": ranks[0].file is missing"),
    ("manifest.json", ("ranks", 0, "shard"), "x", ": ranks[0].shard is an unknown key"),
    ("manifest.json", ("version",), 2, " has version 2, this moeify reads 1"),
    ("manifest.json", ("format",), DROP, ' is not a torch-distributed manifest (no "format" key)'),
    ("manifest.json", ("files",), None, ": files must be an object, got null"),
    ("manifest.json", ("files", "plan.json", "bytes"), -1, ': files["plan.json"].bytes must be an integer >= 0, '
                                                           'got -1'),
    ("manifest.json", ("ranks", 1, "experts", L0, 0), "2", f': ranks[1].experts["{L0}"][0] must be an integer >= 0, '
                                                           'got "2"'),
    ("manifest.json", ("ranks", 0, "file"), "../m/moeify-model.safetensors",
     ': ranks[0].file must be a file name in the export directory, got "../m/moeify-model.safetensors"'),
    ("manifest.json", ("files", ".."), {"sha256": "0" * 64, "bytes": 1},
     ': files[".."] is not a file name in the export directory'),
    ("manifest.json", ("files", "plan.json", "sha256"), "abc",
     ': files["plan.json"].sha256 must be a sha256 hex digest, got "abc"'),
]


def changed(data, keys, value):
    if not keys:
        return value
    *parents, last = keys
    target = data
    for key in parents:
        target = target[key]
    if value is DROP:
        del target[last]
    else:
        target[last] = value
    return data


@pytest.mark.parametrize("kind, keys, value, message", CASES,
                         ids=[f"{c[0]}:{'.'.join(map(str, c[1]))}={c[2] if c[2] is not DROP else 'drop'}"
                              for c in CASES])
def test_a_bad_value_is_one_line_naming_path_expectation_and_fix(tmp_path, meta, converted, exported, kind, keys,
                                                                 value, message):
    data = changed(valid(kind, meta, exported), keys, value)
    path, result = read_by_cli(tmp_path, kind, data, converted, exported)
    assert_user_error(result, tmp_path, message)
    assert result.stderr == f"error: {path}{message}: {FIX[kind]}\n"


def test_another_version_is_named_before_any_other_difference(tmp_path, meta, converted):
    data = {**valid("load.json", meta, None), "version": 2, "layers": [], "shares": {}}  # version is optional here
    path, result = read_by_cli(tmp_path, "load.json", data, converted, None)
    assert result.stderr == f"error: {path} has version 2, this moeify reads 1: {FIX['load.json']}\n"


def write_run(path, metrics):
    info = RunInfo(name=path.name, source="t5-tiny", dense=True, seed=0, params_total=10, params_active=10,
                   moe_config=None, steps=10, batch_size=2, seq_len=8, objective="span-corruption")
    write_run_info(path, info)
    (path / "metrics.csv").write_text(metrics)
    return path


HEADER = "step,tokens,wall_seconds,lr,train_loss,val_loss,aux_loss,z_loss,dropped_fraction,load_cv_mean"


@pytest.mark.parametrize("metrics, message", [
    (HEADER + ",load_cv/x\n1,16,0.5,0.001,4.0,3.9,,,,,0.1\n", None),
    ("step,tokens,lr,train_loss,val_loss\n", "{}/metrics.csv lacks the columns wall_seconds, aux_loss, z_loss, "
                                             "dropped_fraction, load_cv_mean"),
    (HEADER + ",loss_cv\n", "{}/metrics.csv has unknown columns loss_cv"),
    (HEADER + "\n1,16,0.5,0.001,4.0,3.9,,,,\n2,x,1.0,0.001,4.0,3.8,,,,\n",
     "{}/metrics.csv line 3, column tokens: 'x' is not an integer"),
    (HEADER + "\n1,16,0.5,0.001,4.0,three,,,,\n", "{}/metrics.csv line 2, column val_loss: 'three' is not a number"),
])
def test_compare_checks_the_metrics_header_and_numbers(tmp_path, metrics, message):
    good = write_run(tmp_path / "good", HEADER + "\n1,16,0.5,0.001,4.0,3.9,,,,\n")
    result = run("compare", good, write_run(tmp_path / "bad", metrics), "--json")
    if message is None:
        assert result.exit_code == 0, result.output
    else:
        assert_user_error(result, tmp_path, message.format(tmp_path / "bad"))
        assert result.stderr == f"error: {message.format(tmp_path / 'bad')}\n"
