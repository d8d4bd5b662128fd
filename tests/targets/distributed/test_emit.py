"""Emission: one shard per rank with its experts and the dense weights, a plan, a sha256 manifest."""
import hashlib
import json
import re

import pytest
import torch
from dist_helpers import converted_t5
from safetensors import safe_open
from safetensors.torch import load_file

import moeify
from moeify.targets.distributed.export import export_distributed
from moeify.targets.distributed.manifest import read_export_manifest, verify

FFN = "encoder.block.1.layer.1.DenseReluDense"


def test_each_shard_holds_its_experts_and_the_dense_weights(t5_source, dist2):
    source = load_file(str(t5_source / "moeify-model.safetensors"))
    expert_keys = {k for k in source if ".experts." in k}
    assert sorted(p.name for p in dist2.iterdir()) == [
        "manifest.json", "moeify.json", "plan.json",
        "rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors"]
    for rank, ids in enumerate(([0, 1], [2, 3])):
        shard = load_file(str(dist2 / f"rank-{rank:05d}-of-00002.safetensors"))
        assert set(shard) == set(source)  # same names; tied weights stored once, as in the source
        for name, t in shard.items():
            want = source[name][ids] if name in expert_keys else source[name]
            assert torch.equal(t, want), name
        with safe_open(str(dist2 / f"rank-{rank:05d}-of-00002.safetensors"), "pt") as f:
            assert f.metadata()["rank"] == str(rank)


def test_the_manifest_lists_every_file_with_its_sha256(dist2):
    manifest = json.loads((dist2 / "manifest.json").read_text())
    assert manifest["format"] == "moeify.distributed" and manifest["world_size"] == 2
    assert set(manifest["files"]) == {p.name for p in dist2.iterdir()} - {"manifest.json"}
    for name, entry in manifest["files"].items():
        data = (dist2 / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert [r["experts"][FFN] for r in manifest["ranks"]] == [[0, 1], [2, 3]]
    assert json.loads((dist2 / "moeify.json").read_text())["target"] == "torch-distributed"


def test_uneven_plans_give_uneven_shards(t5_source, tmp_path):
    out = export_distributed(t5_source, tmp_path / "d3", world_size=3, allow_uneven=True)
    assert [r.experts[FFN] for r in out.manifest.ranks] == [[0, 1], [2], [3]]
    sizes = [load_file(str(tmp_path / "d3" / r.file))[f"{FFN}.experts.w_in"].shape[0] for r in out.manifest.ranks]
    assert sizes == [2, 1, 1]


def test_a_corrupt_shard_is_refused(t5_source, tmp_path):
    out = export_distributed(t5_source, tmp_path / "d2", world_size=2).path
    shard = out / "rank-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last weight: still a valid safetensors file
    shard.write_bytes(bytes(data))
    manifest = read_export_manifest(out)
    verify(out, manifest, ["rank-00000-of-00002.safetensors"])  # the intact shard passes
    with pytest.raises(moeify.MoeifyError, match=r"rank-00001-of-00002.safetensors is corrupt: its sha256 is "
                                                 r"[0-9a-f]{16}\.\.\., the manifest says [0-9a-f]{16}\.\.\.: copy it "
                                                 r"again or re-run `moeify export`"):
        verify(out, manifest, ["rank-00001-of-00002.safetensors"])
    shard.unlink()
    with pytest.raises(moeify.MoeifyError, match="rank-00001-of-00002.safetensors is missing"):
        verify(out, manifest, ["rank-00001-of-00002.safetensors"])


def test_export_errors_leave_nothing_behind(t5_source, tmp_path):
    with pytest.raises(moeify.MoeifyError, match="give exactly one of --plan and --world-size"):
        export_distributed(t5_source, tmp_path / "out")
    other = export_distributed(t5_source, tmp_path / "other", world_size=2).plan
    other.layers[0].num_experts = 8
    other.layers[0].placement = [0] * 4 + [1] * 4
    with pytest.raises(moeify.MoeifyError, match="the plan was made for another model: "
                                                 f"{FFN} has 4 experts, the plan 8"):
        export_distributed(t5_source, tmp_path / "out", other)
    with pytest.raises(moeify.MoeifyError, match="already exists: pass force=True"):
        export_distributed(t5_source, tmp_path / "other", world_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]  # no temporary leftovers


def test_structure_only_sources_are_refused(tmp_path):
    moeify.save(converted_t5(), tmp_path / "src")
    meta = json.loads((tmp_path / "src" / "moeify.json").read_text())
    (tmp_path / "src" / "moeify.json").write_text(json.dumps({**meta, "weights": False}))
    with pytest.raises(moeify.MoeifyError, match="is structure only \\(converted with --device meta\\)"):
        export_distributed(tmp_path / "src", tmp_path / "out", world_size=2)


def test_print_export_shows_each_rank(t5_source, tmp_path):
    from rich.console import Console

    from moeify.cli.export_distributed import print_export

    console = Console(width=200, record=True)
    print_export(export_distributed(t5_source, tmp_path / "d3", world_size=3, allow_uneven=True), console)
    text = console.export_text()
    assert f"{tmp_path / 'd3'}: 3 ranks, mesh dp=1 x ep=3, default plan (not estimated)" in text
    row = r"^ +1  rank-00001-of-00003\.safetensors +[\d.]+  E2 in each of 4 layers *$"
    assert re.search(row, text, flags=re.M), text
    assert "manifest.json: 5 files with sha256; largest shard" in text


def test_the_export_command(t5_source, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from moeify import cli

    monkeypatch.setattr(cli.console, "width", 200)

    def run(*args):
        return CliRunner().invoke(cli.main, ["export", str(t5_source), *map(str, args)])

    result = run("--target", "torch-distributed", "--world-size", 2, "-o", tmp_path / "d2")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "d2" / "rank-00001-of-00002.safetensors").is_file() and "2 ranks" in result.stdout
    for args, message in [
        (("--target", "torch-distributed", "--plan", tmp_path / "plan.json", "--world-size", 2),
         "give exactly one of --plan and --world-size"),
        (("--target", "onnx", "--world-size", 2), "--world-size is an option of --target torch-distributed, not onnx"),
        (("--target", "torch-distributed", "--world-size", 2, "--mode", "portable"),
         "--mode is an option of --target onnx"),
    ]:
        result = run(*args, "-o", tmp_path / "x")
        assert result.exit_code == 2 and message in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()

