"""Built-in model presets: T5, the Switch Transformers paper's models, and one released model of each dense family."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeify.errors import MoeifyError

T5_VOCAB = 32128  # T5's SentencePiece vocabulary, padded to a multiple of 128
# t5-tiny trains on UTF-8 bytes (no tokenizer to ship): 3 specials (pad, eos, unk) + 256 byte tokens
# + 125 ids at the top, where span corruption puts its sentinels (T5 keeps 100 there), = 384, a
# multiple of 128 as T5 pads its vocabulary. 32128 would spend 99% of the embedding on unused ids.
T5_TINY_VOCAB = 384
# Token ids of every released T5 config: generation and label shifting need them.
T5_TOKENS = dict(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


@dataclass(frozen=True)
class Family:
    """A transformers model family: what a preset builds, and the config keys of what `moeify presets` shows."""

    config_class: str  # a transformers config class name
    architecture: str  # the transformers model class built from it
    d_model: str
    d_ff: str
    layers: tuple[str, ...]  # one key per stack: encoder and decoder, or the only stack
    ffn: str | None  # the FFN as `moeify presets` shows it; None: the config's feed_forward_proj (T5)


def _family(config_class: str, architecture: str, ffn: str, d_model: str = "hidden_size",
            d_ff: str = "intermediate_size", layers: tuple[str, ...] = ("num_hidden_layers",)) -> Family:
    return Family(config_class, architecture, d_model, d_ff, layers, ffn)


T5 = Family("T5Config", "T5ForConditionalGeneration", "d_model", "d_ff", ("num_layers", "num_layers"), None)
BERT = _family("BertConfig", "BertForMaskedLM", "gelu")
VIT = _family("ViTConfig", "ViTForImageClassification", "gelu")
GPT2 = _family("GPT2Config", "GPT2LMHeadModel", "gelu", d_model="n_embd", d_ff="n_inner", layers=("n_layer",))
BART = _family("BartConfig", "BartForConditionalGeneration", "gelu", d_model="d_model", d_ff="encoder_ffn_dim",
               layers=("encoder_layers", "decoder_layers"))
LLAMA = _family("LlamaConfig", "LlamaForCausalLM", "gated-silu")
MISTRAL = _family("MistralConfig", "MistralForCausalLM", "gated-silu")
QWEN3 = _family("Qwen3Config", "Qwen3ForCausalLM", "gated-silu")
PHI3 = _family("Phi3Config", "Phi3ForCausalLM", "gated-silu")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    config: dict[str, Any]  # keyword arguments of family.config_class
    moe: dict[str, Any] = field(default_factory=dict)  # MoEConfig defaults this preset sets
    family: Family = T5

    @property
    def d_model(self) -> int:
        return self.config[self.family.d_model]

    @property
    def d_ff(self) -> int:
        return self.config[self.family.d_ff]

    @property
    def layers(self) -> str:
        """Layers per stack: "12+12" for an encoder-decoder, "32" for one stack."""
        return "+".join(str(self.config[key]) for key in self.family.layers)

    @property
    def ffn(self) -> str:
        return self.family.ffn or self.config["feed_forward_proj"]


def _t5_v1_0(d_model: int, d_ff: int, d_kv: int, heads: int, layers: int, vocab: int = T5_VOCAB) -> dict[str, Any]:
    # Raffel et al. 2020, Table 14 / the released t5-* configs: ReLU FFN, tied embeddings.
    return dict(d_model=d_model, d_ff=d_ff, d_kv=d_kv, num_heads=heads, num_layers=layers,
                vocab_size=vocab, feed_forward_proj="relu", tie_word_embeddings=True, **T5_TOKENS)


def _t5_v1_1(d_model: int, d_ff: int, d_kv: int, heads: int, layers: int) -> dict[str, Any]:
    # The released google/t5-v1_1-* configs: gated-GELU FFN, untied embeddings.
    return dict(d_model=d_model, d_ff=d_ff, d_kv=d_kv, num_heads=heads, num_layers=layers,
                vocab_size=T5_VOCAB, feed_forward_proj="gated-gelu", tie_word_embeddings=False, **T5_TOKENS)


_PRESETS = [
    Preset("t5-tiny", "T5 v1.0 tiny, 1.9M, byte vocabulary: trains on a CPU",
           _t5_v1_0(128, 512, 32, 4, 4, vocab=T5_TINY_VOCAB)),
    Preset("t5-small", "T5 v1.0 small, 60M (ReLU FFN)", _t5_v1_0(512, 2048, 64, 8, 6)),
    Preset("t5-base", "T5 v1.0 base, 220M", _t5_v1_0(768, 3072, 64, 12, 12)),
    Preset("t5-large", "T5 v1.0 large, 770M", _t5_v1_0(1024, 4096, 64, 16, 24)),
    Preset("t5-3b", "T5 v1.0 3B", _t5_v1_0(1024, 16384, 128, 32, 24)),
    Preset("t5-11b", "T5 v1.0 11B", _t5_v1_0(1024, 65536, 128, 128, 24)),
    Preset("t5-v1_1-small", "T5 v1.1 small, 77M (gated-GELU FFN)", _t5_v1_1(512, 1024, 64, 6, 8)),
    Preset("t5-v1_1-base", "T5 v1.1 base, 250M", _t5_v1_1(768, 2048, 64, 12, 12)),
    Preset("t5-v1_1-large", "T5 v1.1 large, 780M", _t5_v1_1(1024, 2816, 64, 16, 24)),
    Preset("t5-v1_1-xl", "T5 v1.1 XL, 3B", _t5_v1_1(2048, 5120, 64, 32, 24)),
    Preset("t5-v1_1-xxl", "T5 v1.1 XXL, 11B", _t5_v1_1(4096, 10240, 64, 64, 24)),
    # Switch Transformers (Fedus et al. 2021). Geometry from the paper's Table 9 unless noted.
    # switch-base-128: the released google/switch-base-128 checkpoint, which is t5-base's
    # geometry (d_ff 3072, ReLU) with 128 experts in every other FFN (7.4B parameters).
    Preset("switch-base-128", "Switch-Base, 128 experts every other layer, 7.4B",
           _t5_v1_0(768, 3072, 64, 12, 12), dict(num_experts=128, every=2, offset=1)),
    # switch-large-128: Table 9 "Switch-Large": d_model 1024, d_ff 2816, 16 heads, d_kv 64,
    # 24 layers, 128 experts, expert frequency 1/2; gated-GELU as its T5-Large (v1.1) baseline.
    Preset("switch-large-128", "Switch-Large, 128 experts every other layer, 26B",
           _t5_v1_1(1024, 2816, 64, 16, 24), dict(num_experts=128, every=2, offset=1)),
    # switch-xxl-64: Table 9 "Switch-XXL": d_model 4096, d_ff 10240, 64 heads, d_kv 64,
    # 24 layers, 64 experts, expert frequency 1/2, gated-GELU (T5-XXL v1.1 baseline).
    # These numbers give 201B parameters, not the 395B the table lists: a count that needs
    # twice the expert parameters (128 experts, or experts at every layer), which the table does not say.
    Preset("switch-xxl-64", "Switch-XXL, 64 experts every other layer (Table 9 geometry)",
           _t5_v1_1(4096, 10240, 64, 64, 24), dict(num_experts=64, every=2, offset=1)),
    # switch-c-2048: Table 9 "Switch-C": d_model 2080, d_ff 6144, 32 heads, d_kv 64, 15 layers,
    # 2048 experts in every FFN (expert frequency 1), ReLU as in the released checkpoint: 1.6T.
    Preset("switch-c-2048", "Switch-C, 2048 experts in every layer, 1.6T",
           _t5_v1_0(2080, 6144, 64, 32, 15), dict(num_experts=2048, every=1, offset=0)),
    # One released model of each dense family moeify converts, at its real size, geometry from the
    # config.json of the checkpoint named in each comment (weights random: convert them with --device
    # meta to plan, or on a machine with the memory).
    # google-bert/bert-base-uncased: 110M.
    Preset("bert-base", "BERT base (uncased), 110M", dict(
        vocab_size=30522, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0), family=BERT),
    # openai-community/gpt2: 124M (n_inner null there, which GPT2MLP reads as 4 * n_embd).
    Preset("gpt2", "GPT-2 small, 124M", dict(
        vocab_size=50257, n_embd=768, n_inner=3072, n_layer=12, n_head=12, n_positions=1024,
        activation_function="gelu_new", bos_token_id=50256, eos_token_id=50256), family=GPT2),
    # facebook/bart-base: 139M.
    Preset("bart-base", "BART base, 139M", dict(
        vocab_size=50265, d_model=768, encoder_ffn_dim=3072, decoder_ffn_dim=3072, encoder_layers=6,
        decoder_layers=6, encoder_attention_heads=12, decoder_attention_heads=12, max_position_embeddings=1024,
        activation_function="gelu", pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
        forced_bos_token_id=0, forced_eos_token_id=2), family=BART),
    # google/vit-base-patch16-224: 86M, 1000 ImageNet classes.
    Preset("vit-base", "ViT base, patch 16, 224 px, 86M", dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
        patch_size=16, num_channels=3, qkv_bias=True, layer_norm_eps=1e-12, num_labels=1000), family=VIT),
    # microsoft/Phi-3-mini-4k-instruct: 3.8B, fused gate_up_proj.
    Preset("phi-3-mini", "Phi-3 mini (4k), 3.8B", dict(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, original_max_position_embeddings=4096,
        rms_norm_eps=1e-5, sliding_window=2047, tie_word_embeddings=False, bos_token_id=1, eos_token_id=32000,
        pad_token_id=32000), family=PHI3),
    # mistralai/Mistral-7B-v0.1: 7.2B.
    Preset("mistral-7b", "Mistral 7B (v0.1), 7.2B", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=4096,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2), family=MISTRAL),
    # meta-llama/Meta-Llama-3-8B: 8.0B.
    Preset("llama-3-8b", "Llama 3 8B, 8.0B", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001), family=LLAMA),
    # Qwen/Qwen3-8B: 8.2B.
    Preset("qwen3-8b", "Qwen3 8B, 8.2B", dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645), family=QWEN3),
]

PRESETS: dict[str, Preset] = {p.name: p for p in _PRESETS}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        close = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see `moeify presets`"
        raise MoeifyError(f"unknown preset or missing path {name!r}: {hint}") from None


def resolve_source(source: str) -> Path | Preset:
    """A SOURCE as an existing path, or as a preset; refused in one line otherwise (torch-free, so
    the CLI refuses a typo before importing torch)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if "/" in source or source.startswith((".", "~")):
        raise MoeifyError(f"{source} does not exist: pass a local Hugging Face model directory "
                          "or a preset name (see `moeify presets`)")
    return get_preset(source)  # an unknown name: "did you mean ..."
