"""`moeify compare`: table values worked out by hand from the CSVs written here, seeds grouped, the PNG, refusals."""
import dataclasses
import json
import math

import matplotlib.image
import pytest
from clitools import assert_fits, assert_user_error, run

from moeify.errors import MoeifyError
from moeify.training.compare import compare, curve, group_variants, summarize
from moeify.training.runs import MetricsRow, MetricsWriter, RunInfo, read_run, write_run_info

LAYER = "encoder.block.1.layer.1.DenseReluDense"
DENSE, SWITCH = 60_506_624, 200_000_000


def write_run(path, name, seed, val, wall, dense=False, steps=1000, **fields):
    """Evaluations at steps 100, 200, 300 (losses `val`, wall seconds `wall[:3]`), then a training-only row at
    step 350 (wall[3]); 512 tokens per step."""
    info = RunInfo(name=name, source="t5-small", dense=dense, seed=seed, params_total=DENSE if dense else SWITCH,
                   params_active=DENSE, moe_config=None if dense else {"num_experts": 8}, steps=steps,
                   batch_size=4, seq_len=128, objective="span-corruption")
    write_run_info(path, dataclasses.replace(info, **fields))
    layers = () if dense else (LAYER,)
    with MetricsWriter(path, layers) as w:
        for step, loss, seconds in zip((100, 200, 300, 350), [*val, None], wall):
            w.append(MetricsRow(step, step * 512, seconds, 1e-3, 4.0, loss, load_cv={n: 0.1 for n in layers}))
    return path


@pytest.fixture
def runs(tmp_path):
    """dense: best 3.5 at step 200, final 3.6; switch-s0 and -s1, two seeds of one variant.
    The default threshold is the worst best loss, dense's 3.5: dense reaches it at step 200 (20 s),
    s0 at 100 (12 s), s1 at 300 (42 s). tokens/s = 350 * 512 / last wall: 5120, 4266.7, 3657.1."""
    return [write_run(tmp_path / "dense", "dense", 0, [4.0, 3.5, 3.6], [10.0, 20.0, 30.0, 35.0], dense=True),
            write_run(tmp_path / "s0", "switch-s0", 0, [3.4, 3.2, 3.0], [12.0, 24.0, 36.0, 42.0]),
            write_run(tmp_path / "s1", "switch-s1", 1, [3.9, 3.6, 3.1], [14.0, 28.0, 42.0, 49.0])]


def test_table_values_at_80_columns(runs, tmp_path, console80):
    png = tmp_path / "cmp.png"
    result = run("compare", *runs, "-o", png)
    assert result.exit_code == 0, result.output
    assert_fits(result.stdout)
    lines = [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert "validation loss, threshold T = 3.5000 (the worst best loss)" in lines
    assert "dense 3.6000 3.5000 200 20.0 s 60.51M 60.51M 5.12K" in lines
    assert "switch-s0 3.0000 3.0000 100 12.0 s 200.00M 60.51M 4.27K" in lines
    assert "switch-s1 3.1000 3.1000 300 42.0 s 200.00M 60.51M 3.66K" in lines
    assert f"drew {png}" in lines


def test_a_given_threshold_and_the_runs_that_never_reach_it(runs, tmp_path, console80):
    result = run("compare", *runs, "--threshold", 3.2, "-o", tmp_path / "cmp.png")
    lines = [" ".join(line.split()) for line in result.stdout.splitlines()]
    assert "validation loss, threshold T = 3.2000" in lines
    assert "dense 3.6000 3.5000 - - 60.51M 60.51M 5.12K" in lines
    assert "switch-s0 3.0000 3.0000 200 24.0 s 200.00M 60.51M 4.27K" in lines  # 3.2 <= 3.2 counts
    assert "switch-s1 3.1000 3.1000 300 42.0 s 200.00M 60.51M 3.66K" in lines


def test_json_holds_the_table_data_and_draws_only_when_asked(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("compare", *runs, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert not (tmp_path / "compare.png").exists()
    assert (data["threshold"], data["threshold_given"]) == (3.5, False)
    assert data["variants"] == [["dense"], ["switch-s0", "switch-s1"]]
    assert data["runs"][0] == {"name": "dense", "path": str(runs[0]), "final_val_loss": 3.6, "best_val_loss": 3.5,
                               "steps_to_threshold": 200, "seconds_to_threshold": 20.0, "params_total": DENSE,
                               "params_active": DENSE, "tokens_per_second": 5120.0}
    assert [(r["steps_to_threshold"], r["seconds_to_threshold"]) for r in data["runs"][1:]] == [(100, 12.0),
                                                                                                (300, 42.0)]
    assert data["runs"][2]["tokens_per_second"] == pytest.approx(350 * 512 / 49)
    assert run("compare", *runs, "--json", "-o", "given.png").exit_code == 0
    assert (tmp_path / "given.png").is_file()


def test_the_png_has_two_panels_size_and_replaces_only_with_force(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run("compare", *runs).exit_code == 0
    png = tmp_path / "compare.png"  # the default path
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(png).shape == (450, 1100, 4)
    png.write_bytes(b"old")
    assert run("compare", *runs, "--force").exit_code == 0
    assert matplotlib.image.imread(png).shape == (450, 1100, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.png", "dense", "s0", "s1"]  # no temporary


def test_seeds_of_a_variant_differ_only_in_name_and_seed(runs, tmp_path):
    dense, s0, s1 = (read_run(p) for p in runs)
    longer = read_run(write_run(tmp_path / "s2", "switch-long", 2, [3.0, 2.9, 2.8], [1.0, 2.0, 3.0, 4.0], steps=2000))
    names = [[r.info.name for r in g] for g in group_variants([s0, dense, longer, s1])]
    assert names == [["switch-s0", "switch-s1"], ["dense"], ["switch-long"]]  # in the order first given


def test_a_group_or_the_conversion_seed_makes_seeds_of_one_variant(tmp_path):
    curves = [1.0, 2.0, 3.0, 4.0]
    a, b = (read_run(write_run(tmp_path / n, n, s, [3.0] * 3, curves, moe_config={"num_experts": 8, "seed": s}))
            for n, s in (("a", 0), ("b", 1)))
    # Upcycled from each seed's own dense checkpoint: the sources differ, the --group says they belong together.
    up0, up1 = (read_run(write_run(tmp_path / n, n, s, [3.0] * 3, curves, source=f"runs/pre-s{s}/step-9", group="up"))
                for n, s in (("up0", 0), ("up1", 1)))
    lone = read_run(write_run(tmp_path / "c", "c", 2, [3.0] * 3, curves, source="runs/pre-s2/step-9"))
    assert [[r.info.name for r in g] for g in group_variants([a, up0, lone, b, up1])] == [
        ["a", "b"], ["up0", "up1"], ["c"]]
    assert curve([up0, up1]).label == "up (2 seeds)"


@pytest.mark.parametrize("names, label", [(["dense-s0", "dense-s1"], "dense"), (["e8_seed1", "e8_seed2"], "e8"),
                                          (["a", "b"], "a"), (["run-1", "run-2"], "run")])
def test_a_variant_is_named_by_what_its_seeds_names_share(names, label):
    from moeify.training.compare import variant_name

    assert variant_name(names) == label


def test_a_variant_curve_is_the_mean_with_a_min_max_band(runs):
    c = curve([read_run(runs[1]), read_run(runs[2])])
    assert (c.label, c.steps, c.seconds) == ("switch (2 seeds)", [100, 200, 300], [13.0, 26.0, 39.0])
    assert c.mean == pytest.approx([3.65, 3.4, 3.05])
    assert (c.low, c.high) == ([3.4, 3.2, 3.0], [3.9, 3.6, 3.1])
    single = curve([read_run(runs[0])])
    assert single.label == "dense" and single.low == single.high == single.mean == [4.0, 3.5, 3.6]


def test_seeds_that_share_no_validation_step_are_refused(runs, tmp_path):
    other = tmp_path / "s9"
    write_run(other, "switch-s9", 9, [3.0, 3.0, 3.0], [1.0, 2.0, 3.0, 4.0])
    text = (other / "metrics.csv").read_text().replace("\n100,", "\n101,").replace("\n200,", "\n201,")
    (other / "metrics.csv").write_text(text.replace("\n300,", "\n301,"))
    with pytest.raises(MoeifyError, match="runs switch-s0, switch-s9 are one variant but share no validation step"):
        curve([read_run(runs[1]), read_run(other)])


def test_a_diverged_evaluation_is_never_the_best(runs, tmp_path):
    write_run(tmp_path / "nan", "switch-nan", 5, [3.3, math.nan, math.nan], [1.0, 2.0, 3.0, 0.0])
    summary = summarize(read_run(tmp_path / "nan"), 3.5)
    assert math.isnan(summary.final_val_loss) and summary.best_val_loss == 3.3
    assert summary.tokens_per_second is None  # the last row's wall clock is 0
    assert compare([read_run(p) for p in [*runs, tmp_path / "nan"]]).threshold == 3.5


def no_validation(tmp_path):
    path = write_run(tmp_path / "noval", "noval", 0, [4.0, 3.5, 3.6], [1.0, 2.0, 3.0, 4.0])
    text = (path / "metrics.csv").read_text().splitlines()
    (path / "metrics.csv").write_text("\n".join(",".join(c if i != 5 else "" for i, c in enumerate(line.split(",")))
                                                if n else line for n, line in enumerate(text)) + "\n")
    return path, f"{path}/metrics.csv has no validation loss (every val_loss cell is empty): nothing to compare"


WRITES = "(`moeify train` writes one)"


def bad_case(tmp_path, case):
    """(a run directory, the expected error line) for each kind of bad input."""
    if case == "missing":
        return tmp_path / "nope", f"{tmp_path / 'nope'} does not exist: pass a run directory {WRITES}"
    if case == "no run.json":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty", f"{tmp_path / 'empty'} has no run.json: not a run directory {WRITES}"
    if case == "no metrics.csv":
        path = write_run(tmp_path / "nometrics", "x", 0, [4.0, 3.5, 3.6], [1.0, 2.0, 3.0, 4.0])
        (path / "metrics.csv").unlink()
        return path, f"{path} has no metrics.csv: not a run directory {WRITES}"
    return no_validation(tmp_path)


@pytest.mark.parametrize("case", ["missing", "no run.json", "no metrics.csv", "no validation rows"])
def test_bad_runs_are_one_line_exit_2_and_nothing_drawn(runs, tmp_path, case):
    path, message = bad_case(tmp_path, case)
    result = run("compare", runs[0], path, "-o", tmp_path / "out")
    assert_user_error(result, tmp_path, message)
    assert result.stderr.strip() == f"error: {message}"


def test_an_existing_plot_needs_force(runs, tmp_path):
    (tmp_path / "out").write_bytes(b"old")
    result = run("compare", *runs, "-o", tmp_path / "out")
    assert result.exit_code == 2 and result.stderr.strip() == (
        f"error: {tmp_path / 'out'} already exists: pass --force to replace it, or choose another path")
    assert (tmp_path / "out").read_bytes() == b"old" and result.stdout == ""


def test_the_plot_goes_neither_onto_a_directory_nor_into_a_run(runs, tmp_path):
    metrics = runs[0] / "metrics.csv"
    before = metrics.read_bytes()
    (tmp_path / "dir").mkdir()
    for out, message in ((tmp_path / "dir", f"{tmp_path / 'dir'} is a directory, and this output is a file: name a "
                                             f"file, e.g. {tmp_path / 'dir' / 'compare.png'}"),
                         (metrics, f"-o {metrics} lies inside the source directory {runs[0]}: choose an output path "
                                   "outside it")):
        result = run("compare", *runs, "-o", out, "--force")
        assert result.exit_code == 2 and result.stderr.strip() == f"error: {message}", result.output
    assert metrics.read_bytes() == before and list((tmp_path / "dir").iterdir()) == []


def test_a_run_killed_mid_row_compares_on_its_complete_rows(runs, tmp_path):
    """A still-running or killed `train` leaves a last row without its newline: compare reads the rows before it."""
    metrics = runs[1] / "metrics.csv"
    whole = json.loads(run("compare", *runs, "--json").stdout)
    metrics.write_text(metrics.read_text() + "400,204800,4")  # cut in its third cell
    result = run("compare", *runs, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == whole


def test_a_threshold_that_is_not_a_number_is_refused(runs, tmp_path):
    result = run("compare", *runs, "--threshold", "nan", "--json")
    assert result.exit_code == 2 and result.stderr == (
        "error: --threshold must be a finite loss, got nan: pass e.g. --threshold 2.5, or leave it unset for the "
        "worst run's best validation loss\n") and result.stdout == ""


def test_help_teaches_with_an_example():
    result = run("compare", "--help")
    assert result.exit_code == 0
    assert "moeify compare runs/dense runs/switch-8e -o compare.png" in result.output
    assert "--threshold LOSS" in result.output
