"""The run directory: metrics.csv and run.json written, read back and refused as the compare and the loop need."""
import json
import math

import pytest

from moeify.errors import MoeifyError
from moeify.training.runs import (
    MetricsRow,
    MetricsWriter,
    RunInfo,
    read_metrics,
    read_run,
    read_run_info,
    write_run_info,
)

LAYERS = ("encoder.block.1.layer.1.DenseReluDense", "decoder.block.1.layer.2.DenseReluDense")
HEADER = ("step,tokens,wall_seconds,lr,train_loss,val_loss,aux_loss,z_loss,dropped_fraction,load_cv_mean,"
          "load_cv/encoder.block.1.layer.1.DenseReluDense,load_cv/decoder.block.1.layer.2.DenseReluDense")


def row(step, val=None, **kw):
    return MetricsRow(step=step, tokens=step * 512, wall_seconds=step / 10, lr=1e-3, train_loss=4.0 - step / 1000,
                      val_loss=val, aux_loss=0.01, z_loss=0.002, dropped_fraction=0.05, load_cv_mean=0.25,
                      load_cv={LAYERS[0]: 0.2, LAYERS[1]: 0.3}, **kw)


def info(**kw):
    fields = dict(name="switch-s0", source="t5-small", dense=False, seed=0, params_total=200_000_000,
                  params_active=60_000_000, moe_config={"num_experts": 8}, steps=1000, batch_size=8, seq_len=128,
                  objective="span-corruption")
    return RunInfo(**{**fields, **kw})


def test_metrics_round_trip_with_an_empty_val_loss(tmp_path):
    unmeasured = MetricsRow(30, 15360, 3.0, 1e-3, 3.9, 3.125, load_cv=dict.fromkeys(LAYERS, 0.1))
    rows = [row(10), row(20, val=3.25), unmeasured]
    with MetricsWriter(tmp_path, LAYERS) as w:
        for r in rows:
            w.append(r)
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == HEADER
    assert lines[1] == "10,5120,1.0,0.001,3.99,,0.01,0.002,0.05,0.25,0.2,0.3"  # no val_loss: an empty cell
    assert lines[3] == "30,15360,3.0,0.001,3.9,3.125,,,,,0.1,0.1"  # router figures unmeasured: empty
    metrics = read_metrics(tmp_path)
    assert metrics.layers == LAYERS and metrics.rows == rows


def test_a_dense_run_has_no_load_cv_columns(tmp_path):
    with MetricsWriter(tmp_path) as w:
        w.append(MetricsRow(1, 512, 0.5, 1e-3, 4.0, 3.5))
    assert (tmp_path / "metrics.csv").read_text() == (
        "step,tokens,wall_seconds,lr,train_loss,val_loss,aux_loss,z_loss,dropped_fraction,load_cv_mean\n"
        "1,512,0.5,0.001,4.0,3.5,,,,\n")
    assert read_metrics(tmp_path).layers == ()


def test_each_row_is_on_disk_before_the_writer_closes(tmp_path):
    w = MetricsWriter(tmp_path, LAYERS)
    w.append(row(10))
    w.append(row(20, val=3.0))
    assert [r.step for r in read_metrics(tmp_path).rows] == [10, 20]  # what a killed run leaves
    w.close()


def test_a_resumed_run_appends_without_a_second_header_and_drops_a_cut_row(tmp_path):
    with MetricsWriter(tmp_path, LAYERS) as w:
        w.append(row(10))
    with (tmp_path / "metrics.csv").open("a") as f:
        f.write("20,10240,2.0,0.0")  # killed in the middle of a row
    with MetricsWriter(tmp_path, LAYERS) as w:
        w.append(row(30))
    text = (tmp_path / "metrics.csv").read_text()
    assert text.count("step,") == 1 and [r.step for r in read_metrics(tmp_path).rows] == [10, 30]
    with pytest.raises(MoeifyError, match="has other columns than this run logs"):
        MetricsWriter(tmp_path, LAYERS[:1])


def test_a_row_must_carry_every_layer_of_the_file(tmp_path):
    with MetricsWriter(tmp_path, LAYERS) as w, pytest.raises(ValueError, match="has load_cv for"):
        w.append(MetricsRow(1, 512, 0.5, 1e-3, 4.0))


def write_csv(tmp_path, text):
    (tmp_path / "metrics.csv").write_text(text)
    return tmp_path


GOOD = "step,tokens,wall_seconds,lr,train_loss,val_loss,aux_loss,z_loss,dropped_fraction,load_cv_mean\n"


@pytest.mark.parametrize("text,message", [
    (None, "{d} has no metrics.csv: not a run directory (`moeify train` writes one)"),
    ("", "{d}/metrics.csv is empty: it has no header line"),
    ("step,tokens,wall_seconds,train_loss\n", "{d}/metrics.csv lacks the columns lr, val_loss, aux_loss, z_loss, "
                                              "dropped_fraction, load_cv_mean"),
    (GOOD.strip() + ",loss_cv\n", "{d}/metrics.csv has unknown columns loss_cv"),
    (GOOD + "1,512,0.5,0.001,4.0,,,,,\n2,1024,1.0,0.001,abc,,,,,\n",
     "{d}/metrics.csv line 3, column train_loss: 'abc' is not a number"),
    (GOOD + "1.5,512,0.5,0.001,4.0,,,,,\n", "{d}/metrics.csv line 2, column step: '1.5' is not an integer"),
    (GOOD + "1,512,,0.001,4.0,,,,,\n", "{d}/metrics.csv line 2, column wall_seconds: '' is not a number"),
    (GOOD + "1,512,0.5\n", "{d}/metrics.csv line 2 has 3 cells, the header 10"),
])
def test_bad_metrics_are_one_clear_line(tmp_path, text, message):
    if text is not None:
        write_csv(tmp_path, text)
    with pytest.raises(MoeifyError) as e:
        read_metrics(tmp_path)
    assert str(e.value) == message.format(d=tmp_path)


def test_a_diverged_loss_reads_as_nan(tmp_path):
    write_csv(tmp_path, GOOD + "1,512,0.5,0.001,nan,inf,,,,\n")
    (r,) = read_metrics(tmp_path).rows
    assert math.isnan(r.train_loss) and r.val_loss == math.inf


def test_run_info_round_trip_is_atomic_and_versioned(tmp_path):
    path = write_run_info(tmp_path, info())
    data = json.loads(path.read_text())
    assert list(data) == ["schema", "version", "name", "source", "dense", "seed", "params_total", "params_active",
                          "moe_config", "steps", "batch_size", "seq_len", "objective", "group"]
    assert (data["schema"], data["version"], data["moe_config"]) == ("moeify.run", 1, {"num_experts": 8})
    assert read_run_info(tmp_path) == info()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]  # the temporary was renamed


@pytest.mark.parametrize("kw,message", [
    ({"dense": True}, "a dense run has moe_config null, a Switch run an object"),
    ({"moe_config": None}, "a dense run has moe_config null, a Switch run an object"),
    ({"seed": True}, "seed is True, not int"),
    ({"steps": "10"}, "steps is '10', not int"),
    ({"moe_config": [8]}, "moe_config is [8], not an object or null"),
    ({"batch_size": 0}, "batch_size must be positive, got 0"),
    ({"params_active": 300_000_000}, "params_active 300000000 must lie in 0..params_total 200000000"),
])
def test_run_info_is_validated_when_written(kw, message):
    with pytest.raises(MoeifyError) as e:
        info(**kw)
    assert str(e.value) == f"run.json of run 'switch-s0': {message}"


@pytest.mark.parametrize("change,message", [
    ({"schema": "moeify.load"}, " is not a moeify run file (schema 'moeify.load', not 'moeify.run')"),
    ({"version": 2}, " has version 2; this moeify reads version 1"),
    ({"seed": None, "extra": 1}, ": missing seed; unknown extra"),
    ({"steps": -1}, ": steps must be positive, got -1"),
])
def test_run_info_is_validated_when_read(tmp_path, change, message):
    data = {**info().to_dict(), **change}
    (tmp_path / "run.json").write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
    with pytest.raises(MoeifyError) as e:
        read_run_info(tmp_path)
    assert str(e.value) == f"{tmp_path / 'run.json'}{message}"


def test_read_run_refuses_what_is_no_run_directory(tmp_path):
    with pytest.raises(MoeifyError) as e:
        read_run(tmp_path / "nope")
    assert str(e.value) == f"{tmp_path / 'nope'} does not exist: pass a run directory (`moeify train` writes one)"
    with pytest.raises(MoeifyError) as e:
        read_run(tmp_path)
    assert str(e.value) == f"{tmp_path} has no run.json: not a run directory (`moeify train` writes one)"
    write_run_info(tmp_path, info())
    with MetricsWriter(tmp_path, LAYERS) as w:
        w.append(row(10, val=3.0))
    run = read_run(tmp_path)
    assert run.info.name == "switch-s0" and run.metrics.rows[0].val_loss == 3.0
