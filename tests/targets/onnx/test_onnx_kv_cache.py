"""KV cache: optimum's with-past layouts, and greedy generation in onnxruntime equal to PyTorch's generate()."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tiny import tiny_t5

import moeify
from moeify.targets.onnx import OnnxOptions, export_onnx
from moeify.targets.onnx.generate import Seq2SeqGenerator, greedy
from moeify.targets.onnx.verify import dropless

NEW_TOKENS = 10
LAYERS, HEADS, HEAD_DIM, VOCAB, D_MODEL = 4, 2, 4, 64, 16  # tiny_t5


def sparse_t5() -> torch.nn.Module:
    """A tiny Switch-T5 whose greedy output depends on its history: T5's own small init repeats one token."""
    model = moeify.convert(tiny_t5("relu"), moeify.MoEConfig(num_experts=4)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def batch(size: int):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, VOCAB, (size, 9), generator=g)
    mask = torch.ones(size, 9, dtype=torch.long)
    if size > 1:
        mask[1, 5:] = 0  # padded rows
        mask[-1, 7:] = 0
    return ids, mask


def pytorch_greedy(model, ids, mask, layers=()) -> np.ndarray:
    with torch.no_grad(), dropless(model, set(layers)):
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                              max_new_tokens=NEW_TOKENS).numpy()


@pytest.fixture(scope="module")
def model():
    model = sparse_t5()
    # An EOS that one row produces mid-way, after varied tokens: finished rows continue with padding.
    model.generation_config.eos_token_id = int(pytorch_greedy(model, *batch(3))[1, 5])
    return model


@pytest.fixture(scope="module", params=["fused", "portable"])
def exported(request, model, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "onnx"
    report = export_onnx(model, out, OnnxOptions(mode=request.param, with_past=True, optimize=False))
    return out, report


def dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_graphs_have_optimums_names_and_shapes(exported):
    out, report = exported
    assert [g.file for g in report.graphs] == ["encoder_model.onnx", "decoder_model.onnx",
                                               "decoder_with_past_model.onnx"]
    batch_, dec, enc = "batch_size", "decoder_sequence_length", "encoder_sequence_length"
    past, grown = "past_decoder_sequence_length", "past_decoder_sequence_length + 1"
    cross = "encoder_sequence_length_out"

    def cache(prefix, length, with_cross):
        parts = [("decoder.key", length), ("decoder.value", length)]
        parts += [("encoder.key", cross), ("encoder.value", cross)] if with_cross else []
        return [(f"{prefix}.{i}.{p}", [batch_, HEADS, n, HEAD_DIM]) for i in range(LAYERS) for p, n in parts]

    first = onnx.load(str(out / "decoder_model.onnx")).graph
    assert [(v.name, dims(v)) for v in first.input] == [
        ("input_ids", [batch_, dec]), ("encoder_hidden_states", [batch_, enc, D_MODEL]),
        ("encoder_attention_mask", [batch_, enc])]
    assert [(v.name, dims(v)) for v in first.output] == [("logits", [batch_, dec, VOCAB]),
                                                         *cache("present", grown, True)]
    step = onnx.load(str(out / "decoder_with_past_model.onnx")).graph
    assert [(v.name, dims(v)) for v in step.input] == [
        ("input_ids", [batch_, 1]), ("encoder_attention_mask", [batch_, enc]), *cache("past_key_values", past, True)]
    assert [(v.name, dims(v)) for v in step.output] == [("logits", [batch_, dec, VOCAB]),
                                                        *cache("present", grown, False)]
    # At run time: batch 3, a past of 5 decoder positions and 9 encoder positions.
    feed = {"input_ids": np.ones((3, 1), np.int64), "encoder_attention_mask": np.ones((3, 9), np.int64)}
    feed.update((n, np.zeros((3, HEADS, 9 if ".encoder." in n else 5, HEAD_DIM), np.float32))
                for n, _ in cache("past_key_values", past, True))
    outs = ort.InferenceSession(str(out / "decoder_with_past_model.onnx"),
                                providers=["CPUExecutionProvider"]).run(None, feed)
    assert [o.shape for o in outs] == [(3, 1, VOCAB)] + [(3, HEADS, 6, HEAD_DIM)] * (2 * LAYERS)


def test_report_records_the_graph_and_its_parity(exported):
    out, report = exported
    saved = json.loads((out / "moeify_onnx.json").read_text())
    assert saved["options"]["with_past"] is True
    assert saved["generation"] == {"decoder_start_token_id": 0, "eos_token_id": saved["generation"]["eos_token_id"],
                                   "pad_token_id": 0}
    step = next(g for g in saved["graphs"] if g["file"] == "decoder_with_past_model.onnx")
    assert step["max_abs_diff"] < 1e-4  # another batch, past and encoder length than the trace's
    assert step["moe_nodes"] == (2 if report.options.mode == "fused" else 0)  # the decoder's two Switch layers


@pytest.mark.parametrize("size", [1, 3])
def test_cached_greedy_equals_pytorch_generate(model, exported, size):
    out, report = exported
    ids, mask = batch(size)
    fused = [p.spec.name for p in report.layers if p.lowering == "fused"]
    expected = pytorch_greedy(model, ids, mask, fused)
    got = greedy(out, ids, mask, NEW_TOKENS)
    np.testing.assert_array_equal(got, expected)
    if size > 1:
        eos = model.generation_config.eos_token_id
        assert eos in got[1] and got.shape == (size, 1 + NEW_TOKENS)  # one row stopped, others went on
        assert len(set(got[1, 1:].tolist())) > 3  # not one repeated token: the history matters


def test_without_cache_gives_the_same_tokens(exported):
    """decoder_model.onnx over the whole prefix. Fused layers are dropless, so routing a token never
    depends on the others; portable layers apply a capacity over the tokens of one call, which
    differ between the two routes (as between PyTorch with and without its cache)."""
    out, report = exported
    if report.options.mode != "fused":
        pytest.skip("capacity depends on the tokens routed together")
    ids, mask = batch(3)
    generator = Seq2SeqGenerator(out)
    np.testing.assert_array_equal(generator.greedy(ids, mask, NEW_TOKENS, cache=False),
                                  generator.greedy(ids, mask, NEW_TOKENS))


def test_default_export_has_no_cache_and_says_how_to_get_one(model, tmp_path):
    export_onnx(model, tmp_path / "o", OnnxOptions(check=False, optimize=False))
    assert sorted(p.name for p in (tmp_path / "o").glob("*.onnx")) == ["decoder_model.onnx", "encoder_model.onnx"]
    assert [o.name for o in onnx.load(str(tmp_path / "o" / "decoder_model.onnx")).graph.output] == ["logits"]
    with pytest.raises(moeify.MoeifyError, match="with_past=True"):
        greedy(tmp_path / "o", *batch(1), NEW_TOKENS)
    ids, mask = batch(1)
    assert greedy(tmp_path / "o", ids, mask, 3, cache=False).shape[1] <= 4


def causal_lm(arch: str) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        dense = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, initializer_range=0.5,
                                           bos_token_id=1, eos_token_id=1, pad_token_id=0))
    else:  # grouped-query attention: one K/V head for two query heads
        dense = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, vocab_size=50,
                                             initializer_range=0.5, pad_token_id=0))
    return moeify.convert(dense.eval(), moeify.MoEConfig(num_experts=4, every=1)).eval()


@pytest.mark.parametrize("arch, mode", [("gpt2", "fused"), ("llama", "fused"), ("llama", "portable")])
def test_decoder_only_model_with_past(tmp_path, arch, mode):
    """optimum's text-generation-with-past model.onnx; the first step feeds an empty past."""
    model = causal_lm(arch)
    report = export_onnx(model, tmp_path / "o", OnnxOptions(mode=mode, with_past=True, optimize=False))
    assert report.graphs[0].max_abs_diff < 1e-4
    graph = onnx.load(str(tmp_path / "o" / "model.onnx")).graph
    heads = 2 if arch == "gpt2" else 1
    cache = [(f"{{}}.{i}.{p}", ["batch_size", heads, "{}", 8]) for i in range(2) for p in ("key", "value")]
    past, grown = "past_sequence_length", "past_sequence_length + sequence_length"
    assert [(v.name, dims(v)) for v in graph.input] == [
        ("input_ids", ["batch_size", "sequence_length"]), ("attention_mask", ["batch_size", grown]),
        ("position_ids", ["batch_size", "sequence_length"]),
        *[(n.format("past_key_values"), [*s[:2], past, s[3]]) for n, s in cache]]
    assert [(v.name, dims(v)) for v in graph.output] == [
        ("logits", ["batch_size", "sequence_length", 50]),
        *[(n.format("present"), [*s[:2], grown, s[3]]) for n, s in cache]]

    g = torch.Generator().manual_seed(3)
    ids, mask = torch.randint(2, 50, (3, 7), generator=g), torch.ones(3, 7, dtype=torch.long)
    mask[1, :3] = mask[2, :1] = 0  # left padding, as transformers wants for decoder-only generation
    for rows in (slice(0, 1), slice(0, 3)):
        fused = [p.spec.name for p in report.layers if p.lowering == "fused"]
        expected = pytorch_greedy(model, ids[rows], mask[rows], fused)
        np.testing.assert_array_equal(greedy(tmp_path / "o", ids[rows], mask[rows], NEW_TOKENS), expected)
    assert max(len(set(row[7:].tolist())) for row in expected) > 3  # the history matters
    if mode == "fused":
        np.testing.assert_array_equal(greedy(tmp_path / "o", ids, mask, NEW_TOKENS, cache=False), expected)


def test_with_past_refuses_what_it_does_not_cover(tmp_path):
    from tiny import tiny_net

    with pytest.raises(moeify.MoeifyError, match="drop --dynamo"):
        OnnxOptions(with_past=True, dynamo=True)
    with pytest.raises(moeify.MoeifyError, match="not custom modules"):
        export_onnx(tiny_net(), tmp_path / "o", OnnxOptions(with_past=True), example_inputs=(torch.randn(2, 5, 8),))
    assert not (tmp_path / "o").exists()


def test_cli_with_past(tmp_path):
    from clitools import run

    moeify.save(moeify.convert(tiny_t5("relu"), moeify.MoEConfig(num_experts=4)), tmp_path / "switch")
    result = run("export", tmp_path / "switch", "--target", "onnx", "--with-past", "--no-optimize",
                 "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "decoder_with_past_model.onnx" in result.stdout
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx", "moeify_onnx.json",
        "moeify-manifest.json"}
    result = run("export", tmp_path / "switch", "--target", "torch", "--with-past", "-o", tmp_path / "t")
    assert result.exit_code != 0 and "--with-past is an option of --target onnx" in result.output
