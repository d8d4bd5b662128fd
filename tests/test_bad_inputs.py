"""Hostile sizes, silently ignored flags, unwritable outputs and empty files: one line, exit 2, no output."""
import re
import shutil

import pytest
from clitools import assert_user_error, run

from moeify.planner import resources


@pytest.fixture(scope="module")
def model(switch_t5_tiny):
    return switch_t5_tiny


def resolve(args, model, tmp_path):
    """MODEL, OUT (tmp_path/out, which must never appear), DIR (an existing folder), EMPTY (a 0-byte file) and
    UNDER_FILE (a path below a file) in `args`, made real."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty.txt").write_bytes(b"")
    names = {"MODEL": model, "OUT": tmp_path / "out", "DIR": tmp_path / "dir", "EMPTY": tmp_path / "empty.txt"}
    return [str(names.get(a, a)).replace("UNDER_FILE", str(tmp_path / "file" / "out")).replace("MODEL/", f"{model}/")
            .replace("DIR/", f"{tmp_path / 'dir'}/") for a in args]


PLAN = ["plan", "MODEL", "--topology", "hgx-a100-4"]
CALIBRATE = ["calibrate", "MODEL", "--batches", "1", "--batch-size", "1", "--seq-len", "16"]


@pytest.mark.parametrize("args,message", [
    # Hostile sizes: refused with an estimate before any work.
    (["plan", "t5-small", "--experts", "1000000000", "--topology", "dgx-a100", "-o", "OUT"],
     r"planning 1000000000 experts on 8 GPUs needs about \d[\d,]* GiB of memory, [\d.]+ GiB is available: "
     r"use fewer --experts"),
    (["plan", "MODEL", "--topology", "dgx-a100", "--nodes", "100000", "-o", "OUT"],
     r"planning 800000 GPUs needs about [\d,]+ GiB of memory, [\d.]+ GiB is available: plan fewer --nodes "
     r"\(about \d+ fit\)"),
    (["plan", "MODEL", "--topology", "localhost-gloo:100000", "-o", "OUT"],
     r"planning 100000 GPUs needs about [\d,]+ GiB of memory, [\d.]+ GiB is available: plan fewer ranks, "
     r"e\.g\. localhost-gloo:\d+"),
    ([*CALIBRATE[:2], "--batches", "100000000", "--batch-size", "64", "--seq-len", "512", "-o", "OUT"],
     r"--batches 100000000 of 40,960 tokens through [\d.]+M active parameters take at least [\d,]+ days on \d+ CPU "
     r"cores: use a smaller --batches \(8 to 64 measure the loads\)"),
    (["export", "MODEL", "--target", "torch-distributed", "--world-size", "1000000", "-o", "OUT"],
     r"1000000 ranks need at least [\d,.]+ GiB on disk \(each shard holds the [\d.]+ MiB of dense weights\), "
     r"[\d,.]+ GiB is free under .+: export for fewer ranks \(about [\d,]+ fit\), or to another disk with -o"),
    (["export", "MODEL", "--target", "torch-distributed", "--world-size", "0", "-o", "OUT"],
     r"--world-size must be a positive integer, got 0"),
    ([*CALIBRATE[:2], "--batches", "1", "--batch-size", "8", "--seq-len", "100000", "-o", "OUT"],
     r"a forward pass needs at least [\d,.]+ GiB \(weights, activations\) but [\d,.]+ GiB of memory is available: "
     r"lower --batch-size or --seq-len"),
    (["train", "t5-tiny", "--experts", "1000000000", "-o", "OUT"],
     r"one training step needs at least [\d,.]+ GiB \(weights, gradients, optimizer state\) but [\d,.]+ GiB of "
     r"memory is available: train a smaller model or fewer --experts, or use --optimizer adafactor"),
    # Flags that would be silently ignored, or values that mean nothing.
    ([*PLAN, "--experts", "8", "-o", "OUT"],
     r".+/switch is already converted; its experts are fixed: drop --experts \(or plan the dense model with them\)"),
    ([*PLAN, "--top-k", "2", "--no-normalize-gates", "-o", "OUT"],
     r".+ is already converted; its MoE options are fixed: drop --top-k, --no-normalize-gates .+"),
    ([*PLAN, "--replicate-hot", "2", "-o", "OUT"],
     r"--replicate-hot copies the experts that calibration found hot: add --load load\.json \(from `moeify "
     r"calibrate`\), or drop --replicate-hot"),
    *[([*PLAN, "--efficiency", value, "-o", "OUT"],
       rf"--efficiency must be in \(0, 1\], got {shown}: pass the fraction of peak FLOPs reached, e\.g\. 0\.5")
      for value, shown in [("nan", "nan"), ("inf", "inf"), ("0", r"0\.0"), ("1.5", r"1\.5")]],
    ([*PLAN, "-o", "OUT", "--draw", "plan.gif"],
     r"--draw plan\.gif: matplotlib writes the format its suffix names, and \.gif is none of \.png, \.svg, \.pdf: "
     r"name the file plan\.png, or \.svg or \.pdf"),
    # File outputs that are directories, or cannot be made; empty inputs.
    ([*PLAN, "-o", "DIR", "--force"], r".+/dir is a directory, and this output is a file: name a file, e\.g\. "
                                      r".+/dir/plan\.json"),
    ([*CALIBRATE, "-o", "DIR", "--force"], r".+/dir is a directory, and this output is a file: name a file, "
                                           r"e\.g\. .+/dir/load\.json"),
    ([*PLAN, "-o", "UNDER_FILE"], r"cannot write .+/file/out \(Not a directory\): choose another output path"),
    ([*PLAN, "-o", "OUT", "--draw", "UNDER_FILE.png"],
     r"cannot write .+/file/out\.png \(Not a directory\): choose another output path"),
    ([*CALIBRATE, "-o", "UNDER_FILE"], r"cannot write .+/file/out \(Not a directory\): choose another output path"),
    ([*CALIBRATE, "-o", "/proc/moeify/out"], r"cannot write /proc/moeify/out \(.+\): choose another output path"),
    # A file or directory where the other is expected; a source that is not there.
    (["run", "EMPTY"], r".+/empty\.txt is a file, not a torch-distributed export directory: pass the directory "
                       r"`moeify export MODEL --target torch-distributed -o DIR` wrote"),
    ([*PLAN[:2], "--topology", "DIR", "-o", "OUT"], r"topology .+/dir is a directory: pass a preset \(.+\) or a file "
                                                    r"\(nvidia-smi topo -m text, node-link JSON or GraphML\)"),
    (["convert", "t5-tiny", "--experts", "2", "-o", "EMPTY", "--force"],
     r".+/empty\.txt exists and is not a directory: remove it or choose another -o"),
    *[(["export", "MODEL", "--target", target, *extra, "-o", "EMPTY", "--force"],
       r".+/empty\.txt exists and is not a directory: remove it or choose another -o")
      for target, extra in (("torch", []), ("torch-distributed", ["--world-size", "2"]), ("onnx", []),
                            ("hf-switch", []))],
    *[([command, "DIR/nope", *rest], r".+/dir/nope does not exist: convert a model first with `moeify convert \.\.\. "
                                     r"-o .+/dir/nope`")
      for command, rest in (("export", ["--target", "onnx", "-o", "OUT"]), ("calibrate", ["-o", "OUT"]),
                            ("inspect", []))],
    (["inspect", "EMPTY"], r".+/empty\.txt is not a moeify output \(no moeify\.json\): convert it with `moeify convert`"),
    (["calibrate", "MODEL", "--batches", "0", "-o", "OUT"],
     r"--batches must be at least 1, got 0: leave it unset for --batches 8, the default"),
    (["train", "DIR/nope", "-o", "OUT"], r".+/dir/nope does not exist: pass a local Hugging Face model directory or a "
                                         r"preset name \(see `moeify presets`\)"),
    # A file output inside the input it reads would replace it: the model's own moeify.json.
    ([*PLAN, "-o", "MODEL/moeify.json", "--force"],
     r"-o .+/moeify\.json lies inside the source directory .+: choose an output path outside it"),
    ([*CALIBRATE, "-o", "MODEL/moeify.json", "--force"],
     r"-o .+/moeify\.json lies inside the source directory .+: choose an output path outside it"),
    (["convert", "t5-tiny", "--experts", "2", "-o", "/proc/moeify/out"],
     r"cannot write /proc/moeify/out \(.+\): choose another output path"),
    (["convert", "t5-tiny", "--experts", "2", "-o", "UNDER_FILE"],
     r"cannot write .+/file/out \(Not a directory\): choose another output path"),
    (["export", "MODEL", "--target", "torch-distributed", "--world-size", "2", "-o", "UNDER_FILE"],
     r"cannot write .+/file/out \(Not a directory\): choose another output path"),
    (["export", "MODEL", "--target", "onnx", "-o", "UNDER_FILE"],
     r"cannot write .+/file/out \(Not a directory\): choose another output path"),
    (["convert", "t5-tiny", "--experts", "2", "--init", "moefy", "--text", "EMPTY", "--no-check", "-o", "OUT"],
     r"the calibration text is empty: give --text a file with text, or leave it unset for the Python standard "
     r"library's source"),
    ([*CALIBRATE, "--text", "EMPTY", "-o", "OUT"],
     r"--text '.+/empty\.txt' is empty: give a UTF-8 text file with text, or leave it unset for the Python "
     r"standard library's source"),
])
def test_bad_input_is_one_line_exit_2_and_no_output(model, tmp_path, args, message):
    result = run(*resolve(args, model, tmp_path))
    assert_user_error(result, tmp_path, "")
    assert re.fullmatch(f"error: {message}", result.stderr.strip()), result.stderr
    assert not result.stdout


@pytest.mark.parametrize("index, message", [
    ('{"weight_map": 5}', "has no weight_map of tensor names to file names: re-save the model"),
    ('{"weight_map": {"a": "../x.safetensors"}}', "names '../x.safetensors', not a file beside it: re-save the model"),
    ("{cut", "is not valid JSON"),
])
def test_a_malformed_shard_index_is_one_line(hf_t5_dir, tmp_path, index, message):
    (hf_t5_dir / "model.safetensors.index.json").write_text(index)
    result = run("convert", hf_t5_dir, "--experts", 2, "-o", tmp_path / "out")
    assert_user_error(result, tmp_path, message)


@pytest.mark.parametrize("args, message", [
    (["convert", "t5-tiny", "--device", "tpu"],
     "error: Invalid value for '--device': 'tpu' is not one of 'cpu', 'meta', 'cuda': see `moeify convert --help`"),
    (["export", "MODEL"], "error: Missing option '--target'. Choose from: torch, torch-distributed, onnx, hf-switch, "
                          "hf-mixtral, hf-qwen3-moe: see `moeify export --help`"),
    (["plan", "MODEL", "--bogus"], "error: No such option '--bogus'. Did you mean '--gpu'?: see `moeify plan --help`"),
    (["frob"], "error: No such command 'frob': see `moeify --help`"),
])
def test_click_usage_errors_are_one_line_too(model, tmp_path, args, message):
    result = run(*resolve(args, model, tmp_path))
    assert result.exit_code == 2 and result.stderr.strip() == message and not result.stdout


@pytest.mark.parametrize("broken", ["empty", "cut"])
def test_inspect_names_an_empty_or_cut_weight_file(model, tmp_path, broken):
    copy = shutil.copytree(model, tmp_path / "copy")
    weights = copy / "moeify-model.safetensors"
    weights.write_bytes(b"" if broken == "empty" else weights.read_bytes()[:50])
    result = run("inspect", copy)
    assert result.exit_code == 2, result.output
    expected = (f"error: {weights} is empty (0 bytes): copy it again, or convert the model again" if broken == "empty"
                else f"error: {weights} is not a whole safetensors file (50 bytes, its header cut or unreadable): "
                     "copy it again, or convert the model again")
    assert result.stderr.strip() == expected and not result.stdout


def test_inspect_reads_a_shard_index_as_loading_does(model, tmp_path):
    """The one index reader (files.indexed_shards): a shard outside the directory is refused, not read."""
    copy = shutil.copytree(model, tmp_path / "copy")
    (copy / "moeify-model.safetensors.index.json").write_text('{"weight_map": {"a": "../x.safetensors"}}')
    result = run("inspect", copy)
    assert result.exit_code == 2 and result.stderr.strip() == (
        f"error: {copy / 'moeify-model.safetensors.index.json'} names '../x.safetensors', not a file beside it: "
        "re-save the model") and not result.stdout


def test_inspect_names_an_empty_onnx_file(tmp_path):
    graph = tmp_path / "encoder_model.onnx"
    graph.write_bytes(b"")
    result = run("inspect", graph)
    assert result.exit_code == 2 and not result.stdout
    assert result.stderr.strip() == (f"error: {graph} is empty (0 bytes): export it again with `moeify export ... "
                                     "--target onnx`")


@pytest.mark.parametrize("suffix,magic", [(".svg", b"<?xml"), (".pdf", b"%PDF"), (".png", b"\x89PNG")])
def test_plan_draws_the_format_its_suffix_names(model, tmp_path, suffix, magic):
    drawing = tmp_path / f"plan{suffix}"
    result = run("plan", model, "--topology", "hgx-a100-4", "--capacity-factor", 1.5, "-o", tmp_path / "p.json",
                 "--draw", drawing)
    assert result.exit_code == 0, result.output
    assert drawing.read_bytes().startswith(magic)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["p.json", drawing.name])  # no temporaries


@pytest.mark.parametrize("args, message", [
    (["train", "t5-tiny", "--seq-len", "512", "--batch-size", "64", "-o", "OUT"],
     r"one training step needs at least [\d.]+ GiB \(weights, gradients, optimizer state, activations\) but "
     r"1\.0 GiB of memory is available: lower --batch-size or --seq-len"),
    (["export", "MODEL", "--target", "onnx", "-o", "OUT"],
     r"--target onnx needs at least [\d.]+ MiB for the model and its graph but 1\.0 MiB of memory is available: "
     r"export on a machine with more memory"),
    (["export", "MODEL", "--target", "hf-switch", "-o", "OUT"],
     r"--target hf-switch needs at least [\d.]+ MiB for the model but 1\.0 MiB of memory is available: export on "
     r"a machine with more memory"),
])
def test_work_that_cannot_fit_in_memory_is_refused_before_it_starts(model, tmp_path, monkeypatch, args, message):
    """The checks compare lower bounds with the memory there is: with less memory, the same job is refused."""
    available = 2**30 if args[0] == "train" else 2**20
    monkeypatch.setattr(resources, "available_memory", lambda: available)
    result = run(*resolve(args, model, tmp_path))
    assert_user_error(result, tmp_path, "")
    assert re.fullmatch(f"error: {message}", result.stderr.strip()), result.stderr


@pytest.mark.parametrize("target", ["torch", "onnx", "hf-switch"])
def test_an_export_the_disk_cannot_hold_is_refused_before_it_starts(model, tmp_path, monkeypatch, target):
    monkeypatch.setattr(resources, "free_disk", lambda path: (2**20, tmp_path))
    result = run("export", model, "--target", target, "-o", tmp_path / "out")
    assert_user_error(result, tmp_path, "")
    assert re.fullmatch(rf"error: --target {target} writes at least [\d.]+ MiB, 1\.0 MiB is free under "
                        rf"{re.escape(str(tmp_path))}: export to another disk with -o, or free space",
                        result.stderr.strip()), result.stderr
