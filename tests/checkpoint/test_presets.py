"""Presets of every dense family: released sizes on meta, exact converted counts, convert -> plan, presets listing."""
import json
import re

import pytest
from clitools import assert_fits, assert_user_error, run

import moeify
from moeify.checkpoint.sources import load_dense
from moeify.planner import resources


def plain(d: int, f: int) -> int:
    return 2 * d * f + f + d  # Linear -> act -> Linear with biases


def gated(d: int, f: int) -> int:
    return 3 * d * f  # bias-free gate, input and output


# name, transformers class, parameters of the released checkpoint, one expert's parameters, d_model,
# FFNs converted by the default every 2 / offset 1 (half of each stack).
FAMILIES = [
    ("bert-base", "BertForMaskedLM", 109_514_298, plain(768, 3072), 768, 6),
    ("gpt2", "GPT2LMHeadModel", 124_439_808, plain(768, 3072), 768, 6),
    ("bart-base", "BartForConditionalGeneration", 139_420_416, plain(768, 3072), 768, 3 + 3),
    ("vit-base", "ViTForImageClassification", 86_567_656, plain(768, 3072), 768, 6),
    ("phi-3-mini", "Phi3ForCausalLM", 3_821_079_552, gated(3072, 8192), 3072, 16),
    ("mistral-7b", "MistralForCausalLM", 7_241_732_096, gated(4096, 14336), 4096, 16),
    ("llama-3-8b", "LlamaForCausalLM", 8_030_261_248, gated(4096, 14336), 4096, 16),
    ("qwen3-8b", "Qwen3ForCausalLM", 8_190_735_360, gated(4096, 12288), 4096, 18),
]


@pytest.mark.parametrize("name,cls,dense_params,expert,d_model,layers", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_presets_have_released_sizes_and_convert_exactly_on_meta(name, cls, dense_params, expert, d_model,
                                                                         layers):
    dense = load_dense(name, device="meta")
    assert type(dense.model).__name__ == cls
    assert sum(p.numel() for p in dense.model.parameters()) == dense_params
    sparse = moeify.convert(dense.model, moeify.MoEConfig(num_experts=8), inplace=True, source=dense.source)
    assert len(sparse.moeify_record.sites) == layers
    # Each converted FFN: its dense weights become expert 0 of 8, plus a bias-free d_model x 8 router.
    assert sum(p.numel() for p in sparse.parameters()) == dense_params + layers * (7 * expert + 8 * d_model)


def test_llama_3_8b_converts_on_meta_loads_and_plans(tmp_path):
    out = tmp_path / "llama"
    result = run("convert", "llama-3-8b", "--experts", 8, "--device", "meta", "-o", out)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "moeify.json").read_text())
    assert meta["summary"]["total_params"] == 8_030_261_248 + 16 * (7 * gated(4096, 14336) + 8 * 4096)
    assert meta["sites"] == [f"model.layers.{i}.mlp" for i in range(1, 32, 2)]
    assert moeify.load(out).moeify_record.site_names == meta["sites"]
    # Adam's 16 bytes per parameter for the 5.2B replicated dense weights alone exceed an 80 GB GPU.
    refused = run("plan", out, "--topology", "dgx-h100", "-o", tmp_path / "plan.json")
    assert refused.exit_code == 2 and refused.stderr.strip() == (
        "error: the model does not fit: at best 167.7 GB per GPU (expert parallel 8) against 72.0 GB usable; "
        "even at expert parallel 8 a GPU needs 167.7 GB: lower --tokens-per-rank, or use fewer layers or "
        "smaller experts")
    planned = run("plan", out, "--topology", "dgx-h100", "--optimizer", "adafactor", "--tokens-per-rank", 1024,
                  "-o", tmp_path / "plan.json")
    assert planned.exit_code == 0, planned.output
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["mesh"]["shape"] == [1, 8] and plan["model"]["name"] == "LlamaForCausalLM"
    assert [layer["name"] for layer in plan["layers"]] == meta["sites"]


def test_a_big_preset_on_the_cpu_refuses_when_memory_is_short(tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda: 16 * 2**30)
    result = run("convert", "llama-3-8b", "--experts", 8, "-o", tmp_path / "out")
    assert_user_error(result, tmp_path, "the converted model needs 103.4 GiB for its weights but 16.0 GiB of memory "
                                        "is available: use --device meta for a structure-only conversion, or fewer "
                                        "--experts")


def test_presets_lists_every_family_at_80_columns(console80):
    result = run("presets")
    assert result.exit_code == 0
    assert_fits(result.stdout)
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[2:] if line.strip()}
    assert {name: rows[name] for name, *_ in FAMILIES} == {
        "bert-base": ["768", "3072", "12", "gelu", "-"],
        "gpt2": ["768", "3072", "12", "gelu", "-"],
        "bart-base": ["768", "3072", "6+6", "gelu", "-"],
        "vit-base": ["768", "3072", "12", "gelu", "-"],
        "phi-3-mini": ["3072", "8192", "32", "gated-silu", "-"],
        "mistral-7b": ["4096", "14336", "32", "gated-silu", "-"],
        "llama-3-8b": ["4096", "14336", "32", "gated-silu", "-"],
        "qwen3-8b": ["4096", "12288", "36", "gated-silu", "-"],
    }
    assert re.search(r"^t5-v1_1-xl +2048 +5120 +24\+24 +gated-gelu +-\s*$", result.stdout, flags=re.MULTILINE)
