"""read_json: the one JSON reader, and every reader built on it refuses bad files in one line."""
import json
import re

import pytest
from clitools import assert_user_error, run

import moeify
from moeify.checkpoint.files import atomic_directory, read_json, write_text_atomically
from moeify.checkpoint.metadata import read_metadata
from moeify.planner.plan import ShardingPlan
from moeify.planner.workload import read_load
from moeify.targets.distributed.manifest import read_export_manifest


def test_read_json_names_the_problem_and_the_fix(tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "bad.json").write_text("{nope")
    (tmp_path / "dir.json").mkdir()
    cases = [("missing.json", r"^plan .*missing.json does not exist: FIX$"),
             ("dir.json", r"^plan .*dir.json is a directory, not a JSON file: FIX$"),
             ("bad.json", r"^.*bad.json is not valid JSON \(Expecting property name .*\): FIX$"),
             ("list.json", r"^.*list.json holds an array, not an object: FIX$")]
    for name, message in cases:
        with pytest.raises(moeify.MoeifyError, match=message):
            read_json(tmp_path / name, what="plan", fix="FIX")
    assert read_json(tmp_path / "list.json", fix="FIX", expect=list) == [1, 2]


@pytest.mark.parametrize("reader, name, fix", [
    (ShardingPlan.load, "plan.json", "make one with `moeify plan"),
    (read_load, "load.json", "create it with `moeify calibrate`"),
])
def test_file_readers_refuse_the_wrong_json_type(tmp_path, reader, name, fix):
    (tmp_path / name).write_text(json.dumps(["not", "an", "object"]))
    with pytest.raises(moeify.MoeifyError, match=f"holds an array, not an object: {fix}"):
        reader(tmp_path / name)


def test_directory_readers_refuse_the_wrong_json_type(tmp_path):
    (tmp_path / "moeify.json").write_text("3")
    with pytest.raises(moeify.MoeifyError, match="moeify.json holds a number, not an object: re-run `moeify convert`"):
        read_metadata(tmp_path)
    (tmp_path / "manifest.json").write_text("null")
    with pytest.raises(moeify.MoeifyError, match="manifest.json holds null, not an object: re-run `moeify export`"):
        read_export_manifest(tmp_path)


def test_the_cli_turns_a_wrong_plan_file_into_one_line(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text("[]")
    assert_user_error(run("inspect", plan), tmp_path, "holds an array, not an object")


@pytest.mark.parametrize("write", [lambda out: write_text_atomically(out, "{}"),
                                   lambda out: atomic_directory(out).__enter__()])
def test_an_output_under_a_file_is_one_line_naming_it(tmp_path, write):
    (tmp_path / "a-file").write_text("in the way")
    out = tmp_path / "a-file" / "out"
    with pytest.raises(moeify.MoeifyError) as e:
        write(out)
    # The reason is the system's own words ("File exists" on Linux): the line names the path and the fix.
    assert re.fullmatch(rf"cannot write {re.escape(str(out))} \([^)]+\): choose another output path", str(e.value))


def test_the_cli_refuses_an_unwritable_output_in_one_line(tmp_path):
    from tiny import tiny_t5

    moeify.save(moeify.convert(tiny_t5(), moeify.MoEConfig(num_experts=2)), tmp_path / "src")
    (tmp_path / "a-file").write_text("in the way")
    for args in (("export", tmp_path / "src", "--target", "hf-switch", "-o", tmp_path / "a-file" / "hf"),
                 ("calibrate", tmp_path / "src", "--batches", 1, "-o", tmp_path / "a-file" / "load.json"),
                 ("train", "t5-tiny", "--steps", 1, "-o", tmp_path / "a-file" / "run")):
        result = run(*args)
        assert result.exit_code == 2, result.output
        assert re.fullmatch(rf"error: cannot write {re.escape(str(args[-1]))} \([^)]+\): choose another output "
                            r"path\n", result.stderr), result.stderr
    assert (tmp_path / "a-file").read_text() == "in the way"
