import json

import pytest
import torch
from tiny import t5_batch, tiny_net, tiny_t5

import moeify
from moeify.checkpoint.sources import load_dense


def converted(ff="relu", **kw):
    return moeify.convert(tiny_t5(ff), moeify.MoEConfig(num_experts=4, **kw)).eval()


@pytest.mark.parametrize("ff", ["relu", "gated-gelu"])
def test_round_trip_gives_identical_outputs(tmp_path, ff):
    sparse = converted(ff)
    moeify.save(sparse, tmp_path / "out")
    again = moeify.load(tmp_path / "out").eval()
    batch = t5_batch()
    assert torch.equal(sparse(**batch).logits, again(**batch).logits)
    assert again.moeify_record.config == sparse.moeify_record.config
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"moeify.json", "moeify-model.safetensors",
                                                             "moeify-manifest.json"}


def test_tied_embeddings_are_stored_once_and_stay_tied(tmp_path):
    sparse = converted()  # T5 v1.0 ties the input embeddings and the LM head
    moeify.save(sparse, tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "moeify.json").read_text())
    assert meta["aliases"] == {"encoder.embed_tokens.weight": "shared.weight",
                               "decoder.embed_tokens.weight": "shared.weight",
                               "lm_head.weight": "shared.weight"}
    again = moeify.load(tmp_path / "out")
    assert again.lm_head.weight is again.shared.weight


def test_large_models_are_sharded_with_an_index(tmp_path):
    sparse = converted()
    moeify.save(sparse, tmp_path / "out", max_shard_bytes=20_000)
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"moeify-model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "out" / "moeify-model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    batch = t5_batch()
    assert torch.equal(moeify.load(tmp_path / "out").eval()(**batch).logits, sparse(**batch).logits)


def test_custom_modules_load_into_a_given_structure(tmp_path):
    sparse = moeify.convert(tiny_net(), moeify.MoEConfig(num_experts=3, every=1)).eval()
    moeify.save(sparse, tmp_path / "net")
    with pytest.raises(moeify.MoeifyError, match=r"pass a fresh dense instance as model=..., e.g. moeify.load\(path, model=YourModel\(\)\)"):
        moeify.load(tmp_path / "net")
    again = moeify.load(tmp_path / "net", model=tiny_net(seed=5)).eval()
    x = torch.randn(2, 4, 8)
    assert torch.equal(again(x), sparse(x))


def test_structure_only_output_loads_on_meta(tmp_path):
    dense = load_dense("t5-small", device="meta")
    sparse = moeify.convert(dense.model, moeify.MoEConfig(num_experts=16), source=dense.source)
    moeify.save(sparse, tmp_path / "meta")
    assert not list((tmp_path / "meta").glob("*.safetensors"))
    again = moeify.load(tmp_path / "meta")
    assert again.shared.weight.is_meta
    assert moeify.summarize(again).total_params == moeify.summarize(sparse).total_params


def test_existing_output_needs_force_and_is_replaced_whole(tmp_path):
    out = tmp_path / "out"
    moeify.save(converted(), out)
    with pytest.raises(moeify.MoeifyError, match="already exists: pass force=True"):
        moeify.save(converted(), out)
    (out / "stale.txt").write_text("old")
    moeify.save(converted(init="random"), out, force=True)
    assert not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary or old directories left


def test_a_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def explode(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        moeify.save(converted(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_truncated_weights_are_refused(tmp_path):
    moeify.save(converted(), tmp_path / "out")
    f = tmp_path / "out" / "moeify-model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(moeify.MoeifyError, match="is corrupt or truncated.*re-download or re-save"):
        moeify.load(tmp_path / "out")


def test_saving_an_unconverted_model_is_refused(tmp_path):
    with pytest.raises(moeify.MoeifyError, match="not produced by moeify.convert"):
        moeify.save(tiny_t5(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_loading_a_non_moeify_directory(tmp_path):
    with pytest.raises(moeify.MoeifyError, match="does not exist"):
        moeify.load(tmp_path / "nope")
    with pytest.raises(moeify.MoeifyError, match="is not a moeify output"):
        moeify.load(tmp_path)


def test_transformers_cannot_mistake_the_output_for_the_dense_model(tmp_path):
    # With config.json and model.safetensors here, from_pretrained used to "load" the dense T5 with
    # every converted FFN initialised at random and only a warning. Now it fails at once.
    from transformers import AutoModel, T5ForConditionalGeneration

    moeify.save(converted(), tmp_path / "out")
    with pytest.raises(OSError, match="no file named model.safetensors"):
        T5ForConditionalGeneration.from_pretrained(tmp_path / "out")
    with pytest.raises(ValueError, match="Unrecognized model"):
        AutoModel.from_pretrained(tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "moeify.json").read_text())
    assert meta["dense_config"]["model_type"] == "t5" and meta["dense_config"]["d_ff"] == 32


def test_an_older_format_is_refused_with_the_fix(tmp_path):
    moeify.save(converted(), tmp_path / "out")
    meta_path = tmp_path / "out" / "moeify.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format_version": 2}))
    with pytest.raises(moeify.MoeifyError, match="has format version 2, this moeify reads 3: convert the model again"):
        moeify.load(tmp_path / "out")


def test_tokenizer_files_of_the_source_directory_travel_with_the_output(tmp_path):
    dense_dir = tmp_path / "dense"
    tiny_t5().save_pretrained(dense_dir)
    (dense_dir / "tokenizer.json").write_text('{"version": "1.0"}')
    (dense_dir / "spiece.model").write_bytes(b"\x00sentencepiece")
    dense = load_dense(str(dense_dir))
    sparse = moeify.convert(dense.model, moeify.MoEConfig(num_experts=2), source=dense.source)
    moeify.save(sparse, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert (tmp_path / "out" / "spiece.model").read_bytes() == b"\x00sentencepiece"


def test_a_bfloat16_save_loads_in_bfloat16_with_float32_routers(tmp_path):
    sparse = converted().to(torch.bfloat16)
    moeify.save(sparse, tmp_path / "out")
    again = moeify.load(tmp_path / "out").eval()
    assert again.shared.weight.dtype == torch.bfloat16
    routers = [m.router.weight for m in again.modules() if isinstance(m, moeify.SwitchFFN)]
    assert routers and all(w.dtype == torch.float32 for w in routers)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), sparse.state_dict().values()))
    assert torch.equal(again(**t5_batch()).logits, sparse(**t5_batch()).logits)
