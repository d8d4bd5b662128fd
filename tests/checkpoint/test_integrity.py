"""moeify-manifest.json: every output directory lists its files' sha256 and size, and readers refuse a changed file."""
import hashlib
import json
import os
import struct

import pytest
import torch
from clitools import assert_user_error, run
from tiny import tiny_t5

import moeify
from moeify.checkpoint.integrity import MANIFEST_FILE, unverified
from moeify.errors import MoeifyError
from moeify.targets.distributed.export import export_distributed
from moeify.training.checkpoints import load_model, save_checkpoint

WEIGHTS = "moeify-model.safetensors"
CHANGED = "sha256 differs from moeify-manifest.json: the file was changed or corrupted; write it again " \
          "(`moeify convert`/`export`), or pass {flag} for trusted files"


def files_of(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def assert_manifest_matches(directory, listing=MANIFEST_FILE, size="size"):
    """`listing` names every other file of `directory` with its sha256 and size."""
    manifest = json.loads((directory / listing).read_text())
    assert sorted(manifest["files"]) == [f for f in files_of(directory) if f != listing]
    for name, entry in manifest["files"].items():
        data = (directory / name).read_bytes()
        assert (entry["sha256"], entry[size]) == (hashlib.sha256(data).hexdigest(), len(data)), name


def flip_payload_byte(path):
    """Flip one bit of a tensor's bytes, past the safetensors header: the file still opens, its values differ."""
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    data = bytearray(path.read_bytes())
    assert len(data) > 8 + header
    data[8 + header + (len(data) - 8 - header) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def model():
    return moeify.convert(tiny_t5("relu"), moeify.MoEConfig(num_experts=4)).eval()


@pytest.fixture
def saved(model, tmp_path):
    moeify.save(model, tmp_path / "m")
    return tmp_path / "m"


@pytest.fixture
def corrupted(saved):
    flip_payload_byte(saved / WEIGHTS)
    return saved


def test_a_convert_output_lists_every_file(hf_t5_dir, tmp_path):
    result = run("convert", hf_t5_dir, "--experts", 2, "--no-check", "-o", tmp_path / "m")
    assert result.exit_code == 0, result.output
    assert files_of(tmp_path / "m") == [MANIFEST_FILE, WEIGHTS, "moeify.json"]
    assert_manifest_matches(tmp_path / "m")


def test_sharded_weights_are_each_listed(model, tmp_path):
    moeify.save(model, tmp_path / "m", max_shard_bytes=20_000)
    assert len(list((tmp_path / "m").glob("*.safetensors"))) > 1
    assert_manifest_matches(tmp_path / "m")


def test_a_training_checkpoint_lists_model_and_trainer_files(model, tmp_path):
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path / "step-1", model, optimizer, {"step": 1})
    assert {"trainer.json", "trainer.safetensors", WEIGHTS} <= set(files_of(tmp_path / "step-1"))
    assert_manifest_matches(tmp_path / "step-1")


def test_an_hf_export_lists_every_file(saved, tmp_path):
    result = run("export", saved, "--target", "hf-switch", "-o", tmp_path / "hf")
    assert result.exit_code == 0, result.output
    assert "config.json" in files_of(tmp_path / "hf")
    assert_manifest_matches(tmp_path / "hf")


def test_an_onnx_export_lists_every_file(saved, tmp_path):
    result = run("export", saved, "--target", "onnx", "--no-optimize", "--no-check", "-o", tmp_path / "onnx")
    assert result.exit_code == 0, result.output
    assert "encoder_model.onnx" in files_of(tmp_path / "onnx")
    assert_manifest_matches(tmp_path / "onnx")


def test_a_distributed_export_keeps_its_own_manifest(saved, tmp_path):
    out = export_distributed(saved, tmp_path / "dist", world_size=2).path
    assert not (out / MANIFEST_FILE).exists()  # manifest.json lists every file already
    assert_manifest_matches(out, "manifest.json", size="bytes")


def test_load_refuses_a_flipped_weight_byte_naming_the_file(corrupted):
    with pytest.raises(MoeifyError) as e:
        moeify.load(corrupted)
    assert str(e.value) == f"{corrupted / WEIGHTS}: " + CHANGED.format(flag="verify=False")
    moeify.load(corrupted, verify=False)  # trusted: not hashed


@pytest.mark.parametrize("command", [
    ("export", "--target", "torch", "-o", "{out}"),
    ("export", "--target", "torch-distributed", "--world-size", 2, "-o", "{out}"),
    ("export", "--target", "onnx", "--no-optimize", "-o", "{out}"),
    ("calibrate", "--batches", 1, "--batch-size", 1, "--seq-len", 16, "-o", "{out}"),
    ("plan", "--topology", "hgx-a100-4", "-o", "{out}"),
], ids=lambda c: " ".join(map(str, c[:3])))
def test_commands_refuse_a_flipped_weight_byte_and_trust_it_with_no_verify(corrupted, tmp_path, command):
    args = [str(a).format(out=tmp_path / "out") for a in command]
    result = run(args[0], corrupted, *args[1:])
    assert_user_error(result, tmp_path, f"{corrupted / WEIGHTS}: " + CHANGED.format(flag="--no-verify"))
    trusted = run(args[0], corrupted, *args[1:], "--no-verify")
    assert trusted.exit_code == 0, trusted.output


def test_inspect_checks_a_model_and_says_so(saved):
    shown = run("inspect", saved)
    assert shown.exit_code == 0 and f"files: 2 files checked: sha256 and size as in {MANIFEST_FILE}" in shown.stdout
    assert json.loads(run("inspect", saved, "--json").stdout)["integrity"].startswith("2 files checked")
    flip_payload_byte(saved / WEIGHTS)
    refused = run("inspect", saved)
    assert refused.exit_code == 2 and not refused.stdout
    assert refused.stderr.strip() == f"error: {saved / WEIGHTS}: " + CHANGED.format(flag="--no-verify")
    trusted = run("inspect", saved, "--no-verify")
    assert trusted.exit_code == 0 and "files: not checked against their sha256 (--no-verify)" in trusted.stdout
    (saved / MANIFEST_FILE).unlink()
    older = run("inspect", saved)
    assert older.exit_code == 0 and f"files: not checked: no {MANIFEST_FILE}" in older.stdout


def test_inspect_checks_an_onnx_graph_against_its_directorys_manifest(saved, tmp_path):
    out = tmp_path / "onnx"
    assert run("export", saved, "--target", "onnx", "--no-optimize", "--no-check", "-o", out).exit_code == 0
    shown = run("inspect", out / "encoder_model.onnx")
    assert shown.exit_code == 0 and "files: 1 file checked" in shown.stdout
    graph = bytearray((out / "encoder_model.onnx").read_bytes())
    graph[len(graph) // 2] ^= 0x01
    (out / "encoder_model.onnx").write_bytes(bytes(graph))
    refused = run("inspect", out / "encoder_model.onnx")
    assert refused.exit_code == 2 and refused.stderr.startswith(f"error: {out / 'encoder_model.onnx'}: sha256 differs")


def test_unverified_skips_every_check_within_the_block(corrupted):
    with unverified():
        moeify.load(corrupted)
    with pytest.raises(MoeifyError, match="sha256 differs"):
        moeify.load(corrupted)


def test_a_dense_checkpoint_is_checked_as_it_loads(tmp_path):
    dense = tiny_t5("relu")
    save_checkpoint(tmp_path / "step-1", dense, torch.optim.AdamW(dense.parameters()), {"step": 1})
    assert_manifest_matches(tmp_path / "step-1")
    flip_payload_byte(tmp_path / "step-1" / "model.safetensors")
    with pytest.raises(MoeifyError) as e:
        load_model(tmp_path / "step-1")
    assert str(e.value) == f"{tmp_path / 'step-1' / 'model.safetensors'}: " + CHANGED.format(flag="verify=False")
    load_model(tmp_path / "step-1", verify=False)


def test_a_changed_moeify_json_is_refused(saved):
    meta = json.loads((saved / "moeify.json").read_text())
    (saved / "moeify.json").write_text(json.dumps({**meta, "skipped": ["edited"]}, indent=2))
    with pytest.raises(MoeifyError, match=r"moeify\.json: \d+ bytes, \d+ in moeify-manifest\.json: the file was"):
        moeify.load(saved)


def test_a_missing_listed_file_is_refused(model, tmp_path):
    moeify.save(model, tmp_path / "m", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "m" / "moeify-model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / "m" / shard).unlink()
    with pytest.raises(MoeifyError) as e:
        moeify.load(tmp_path / "m")
    assert str(e.value) == (f"{tmp_path / 'm' / shard} is missing, but moeify-manifest.json lists it: "
                            "copy the whole directory again, or write it again")


def test_an_unlisted_weight_file_is_refused(saved):
    (saved / "moeify-model-extra.safetensors").write_bytes((saved / WEIGHTS).read_bytes())
    with pytest.raises(MoeifyError) as e:
        moeify.load(saved)
    assert str(e.value) == (f"{saved / 'moeify-model-extra.safetensors'} is not listed in moeify-manifest.json: "
                            "it was added after moeify wrote the directory; remove it, or write the directory again")


def test_other_added_files_are_left_alone(saved):
    (saved / "README.md").write_text("notes")
    moeify.load(saved)


def test_a_directory_without_a_manifest_loads_as_before(corrupted):
    (corrupted / MANIFEST_FILE).unlink()  # as an older moeify wrote it: nothing to check against
    moeify.load(corrupted)


def test_a_damaged_manifest_is_refused_by_its_schema(saved):
    manifest = json.loads((saved / MANIFEST_FILE).read_text())
    manifest["files"][WEIGHTS]["sha256"] = "xyz"
    (saved / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(MoeifyError) as e:
        moeify.load(saved)
    assert str(e.value) == (f'{saved / MANIFEST_FILE}: files["{WEIGHTS}"].sha256 must be a sha256 hex digest, '
                            'got "xyz": write the directory again (`moeify convert`/`export`)')


def test_train_resume_refuses_a_corrupted_checkpoint(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"line {i} of the tiny corpus for the resume check." for i in range(400)))
    out = tmp_path / "run"
    result = run("train", "t5-tiny", "-o", out, "--text", text, "--experts", 2, "--steps", 1, "--seq-len", 32,
                 "--batch-size", 2, "--validation-batches", 1, "--eval-every", 0, "--save-every", 1)
    assert result.exit_code == 0, result.output
    step = out / "checkpoints" / "step-1"
    flip_payload_byte(step / "trainer.safetensors")
    resumed = run("train", "-o", out, "--resume", "--steps", 2)
    assert resumed.exit_code == 2, resumed.output
    assert resumed.stderr == f"error: {step / 'trainer.safetensors'}: " + \
        CHANGED.format(flag="--no-verify") + "\n"
    trusted = run("train", "-o", out, "--resume", "--steps", 2, "--no-verify")  # the flag skips the hashing
    assert trusted.exit_code == 0, trusted.output
    os.remove(out / "checkpoints" / "step-2" / MANIFEST_FILE)  # unverified, as an older moeify's: the run goes on
    assert run("train", "-o", out, "--resume", "--steps", 3).exit_code == 0
