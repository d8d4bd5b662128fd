"""Built-in model presets: T5 v1.0 / v1.1 configs and the Switch Transformers paper's models."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeify.errors import MoeifyError

T5_VOCAB = 32128  # T5's SentencePiece vocabulary, padded to a multiple of 128
# Token ids of every released T5 config: generation and label shifting need them.
T5_TOKENS = dict(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    t5: dict[str, Any]  # transformers.T5Config keyword arguments
    moe: dict[str, Any] = field(default_factory=dict)  # MoEConfig defaults this preset sets


def _t5_v1_0(d_model: int, d_ff: int, d_kv: int, heads: int, layers: int) -> dict[str, Any]:
    # Raffel et al. 2020, Table 14 / the released t5-* configs: ReLU FFN, tied embeddings.
    return dict(d_model=d_model, d_ff=d_ff, d_kv=d_kv, num_heads=heads, num_layers=layers,
                vocab_size=T5_VOCAB, feed_forward_proj="relu", tie_word_embeddings=True, **T5_TOKENS)


def _t5_v1_1(d_model: int, d_ff: int, d_kv: int, heads: int, layers: int) -> dict[str, Any]:
    # The released google/t5-v1_1-* configs: gated-GELU FFN, untied embeddings.
    return dict(d_model=d_model, d_ff=d_ff, d_kv=d_kv, num_heads=heads, num_layers=layers,
                vocab_size=T5_VOCAB, feed_forward_proj="gated-gelu", tie_word_embeddings=False, **T5_TOKENS)


_PRESETS = [
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
