"""SwitchTransformers <-> moeify's converted T5, both ways: sparse layers, config fields, tensor names."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from moeify.checkpoint.files import read_json
from moeify.config import MoEConfig
from moeify.errors import MoeifyError, opt

SWITCH_TYPE = "switch_transformers"  # config.json's model_type
SWITCH_CLASS = "SwitchTransformersForConditionalGeneration"
DEFAULT_SEQ_LEN = 512  # the sequence length hf-switch sizes transformers' per-sequence expert_capacity for
T5_CLASS = "T5ForConditionalGeneration"
STACKS = ("encoder.block", "decoder.block")  # moeify's stack names (select.stack_key) in both models

# Fields SwitchTransformersConfig and T5Config share, with one meaning.
SHARED_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                 "relative_attention_num_buckets", "relative_attention_max_distance", "dropout_rate",
                 "layer_norm_epsilon", "initializer_factor", "is_encoder_decoder", "use_cache", "pad_token_id",
                 "eos_token_id")
OPTIONAL_FIELDS = ("decoder_start_token_id",)  # generation reads it; copied where the config has it


def _shared(config: Any) -> dict[str, Any]:
    return {**{f: getattr(config, f) for f in SHARED_FIELDS},
            **{f: getattr(config, f) for f in OPTIONAL_FIELDS if getattr(config, f, None) is not None}}


# --- which layers are sparse ------------------------------------------------------------------

def sparse_step(num_layers: int, num_sparse: int) -> int:
    """SwitchTransformersConfig's encoder/decoder_sparse_step for num_sparse_*_layers."""
    return num_layers // num_sparse if num_sparse > 0 else num_layers


def sparse_positions(num_layers: int, step: int) -> tuple[int, ...]:
    """The sparse layers SwitchTransformersStack builds for a sparse step: every layer for step 1,
    layers 1, 1 + step, ... otherwise, none for step 0."""
    return tuple(i for i in range(num_layers) if step > 0 and (step == 1 or i % step == 1))


def num_sparse_for(num_layers: int, positions: tuple[int, ...]) -> int | None:
    """A num_sparse_*_layers value that makes exactly `positions` sparse, or None if none does.

    The count itself when it works. No sparse layer at all takes num_layers + 1 (step 0): 0 would
    give step num_layers, which makes layer 1 sparse.
    """
    for k in (len(positions), *range(1, num_layers + 2)):
        if k > 0 and sparse_positions(num_layers, sparse_step(num_layers, k)) == positions:
            return k
    return None


def stack_positions(converted: list[str], dense: list[str]) -> dict[str, tuple[int, tuple[int, ...]]]:
    """{stack: (its FFNs, converted positions)} from a conversion's converted and skipped FFN modules."""
    from moeify.conversion.select import stack_key

    depth: dict[str, int] = {}
    chosen: dict[str, list[int]] = {}
    for names, sparse in ((converted, True), (dense, False)):
        for name in names:
            stack, index = stack_key(name)
            depth[stack] = max(depth.get(stack, 0), index + 1)
            if sparse:
                chosen.setdefault(stack, []).append(index)
    return {s: (depth[s], tuple(sorted(chosen.get(s, [])))) for s in depth}


def _every_offset(step: int) -> tuple[int, int]:
    """moeify's every/offset that select the layers of SwitchTransformers' sparse step (>= 1)."""
    return (1, 0) if step == 1 else (step, 1)


def _every_offset_positions(num_layers: int, every: int, offset: int) -> tuple[int, ...] | None:
    return tuple(range(offset, num_layers, every)) if offset < num_layers else None  # select refuses the rest


def layers_regex(stacks: dict[str, tuple[int, tuple[int, ...]]]) -> str:
    """A --layers pattern choosing exactly these positions (FFN module names start with stack.index.).

    Dots as [.], not \\.: error messages show the pattern as a Python repr, which doubles backslashes.
    """
    dot = "[.]"
    return "|".join(f"^{stack.replace('.', dot)}{dot}({'|'.join(map(str, pos))}){dot}"
                    for stack, (_, pos) in stacks.items() if pos)


def selection_for(stacks: dict[str, tuple[int, tuple[int, ...]]]) -> dict[str, Any]:
    """MoEConfig selection fields (every + offset when one pair fits every stack, else a regex) that
    convert exactly the given positions."""
    longest = max(n for n, _ in stacks.values())
    for every in range(1, longest + 1):
        _, offset = _every_offset(every)
        if all(_every_offset_positions(n, every, offset) == pos for n, pos in stacks.values()):
            return {"every": every, "offset": offset}
    return {"layers": layers_regex(stacks)}


def _closest_step(num_layers: int, positions: tuple[int, ...]) -> int:
    """The sparse step whose layers are nearest `positions`: as many sparse layers, then most alike."""
    steps = {sparse_positions(num_layers, sparse_step(num_layers, k)): sparse_step(num_layers, k)
             for k in range(num_layers, 0, -1)}
    best = min(steps, key=lambda p: (abs(len(p) - len(positions)), len(set(p) ^ set(positions))))
    return steps[best]


def switch_layout(stacks: dict[str, tuple[int, tuple[int, ...]]]) -> dict[str, int]:
    """{stack: num_sparse_*_layers} that SwitchTransformers builds these positions with; refused in one
    line naming the closest selection it can build when a stack's positions are not expressible."""
    if set(stacks) != set(STACKS):
        raise MoeifyError(f"the converted FFNs lie in {sorted(stacks)}, not in a T5 encoder and decoder "
                          f"({', '.join(STACKS)}): export a converted T5 model")
    layout = {s: num_sparse_for(n, pos) for s, (n, pos) in stacks.items()}
    wrong = [s for s in STACKS if layout[s] is None]
    if not wrong:
        return layout  # type: ignore[return-value]
    # The closest layout: each stack's nearest step (a stack without sparse layers stays so).
    steps = {s: _closest_step(n, pos) if pos else 0 for s, (n, pos) in stacks.items()}
    stack = wrong[0]
    n, pos = stacks[stack]
    if len(set(steps.values())) == 1:
        every, offset = _every_offset(steps[stack])
        fix = f"{opt('every', every)} {opt('offset', offset)}"
    else:
        fix = opt("layers", layers_regex({s: (m, sparse_positions(m, steps[s])) for s, (m, _) in stacks.items()}))
    raise MoeifyError(f"SwitchTransformers cannot make FFNs {', '.join(map(str, pos))} of {stack} ({n} layers) "
                      "sparse: it makes every layer of a stack sparse, or layers 1, 1 + step, 1 + 2 step, ...; "
                      f"convert again with {fix}")


# --- configs ----------------------------------------------------------------------------------

def is_switch_directory(source: str | Path) -> bool:
    """Whether SOURCE is a local transformers SwitchTransformers directory (config.json's model_type)."""
    config = Path(source) / "config.json"
    if not config.is_file():
        return False
    data = read_json(config, fix=f"is {source} a complete model directory?")
    return data.get("model_type") == SWITCH_TYPE


def switch_config_fields(t5: Any, moe: MoEConfig, layout: dict[str, int], expert_capacity: int) -> dict[str, Any]:
    """SwitchTransformersConfig keyword arguments for a converted T5 (`t5` its T5Config)."""
    return {
        **_shared(t5),
        "dense_act_fn": t5.dense_act_fn,
        # transformers' T5 always ties lm_head to the embeddings and scales the decoder output by
        # d_model**-0.5 when scale_decoder_outputs; SwitchTransformers does both when tied, neither
        # otherwise (lm_head then holds its own copy of the embeddings, as the logits need).
        "tie_word_embeddings": bool(getattr(t5, "scale_decoder_outputs", True)),
        "num_experts": moe.num_experts, "expert_capacity": expert_capacity,
        "num_sparse_encoder_layers": layout["encoder.block"], "num_sparse_decoder_layers": layout["decoder.block"],
        "router_bias": False, "router_dtype": moe.router_dtype, "router_jitter_noise": moe.jitter,
        "router_aux_loss_coef": moe.aux_loss_coef, "router_z_loss_coef": moe.z_loss_coef,
    }


def t5_config_fields(switch: Any) -> dict[str, Any]:
    """T5Config keyword arguments for the dense T5 a SwitchTransformers config (a converted T5) came from."""
    return {**_shared(switch), "feed_forward_proj": switch.dense_act_fn,
            "tie_word_embeddings": switch.tie_word_embeddings, "architectures": [T5_CLASS]}


def switch_stacks(switch: Any) -> dict[str, tuple[int, tuple[int, ...]]]:
    """{stack: (layers, sparse positions)} as SwitchTransformersStack builds them from the config's steps."""
    return {"encoder.block": (switch.num_layers, sparse_positions(switch.num_layers, switch.encoder_sparse_step)),
            "decoder.block": (switch.num_decoder_layers,
                              sparse_positions(switch.num_decoder_layers, switch.decoder_sparse_step))}


# MoEConfig fields a SwitchTransformers checkpoint fixes (its weights were trained so), and those
# that mean nothing to it (its experts come from the weights, never initialised).
SELECTION = ("every", "offset", "layers")
FIXED = ("num_experts", "top_k", "normalize_gates", *SELECTION)
NO_EFFECT = ("init", "init_scale", "upcycle_noise", "upcycle_scale", "router_init", "text")


def switch_moe_config(switch: Any, where: str | Path, overrides: dict[str, Any] | None = None) -> MoEConfig:
    """The MoEConfig that converts the dense T5 into this SwitchTransformers model, with the given
    run-time options (capacity, losses, jitter, dropout, router dtype) in place of its own."""
    stacks = switch_stacks(switch)
    if not any(pos for _, pos in stacks.values()):
        raise MoeifyError(f"{where} has no sparse layer (num_sparse_encoder_layers and num_sparse_decoder_layers "
                          "make none): it is a dense T5; convert it as one")
    selection = selection_for(stacks)
    own = {"num_experts": switch.num_experts, "top_k": 1, "normalize_gates": False,
           "every": MoEConfig.every, "offset": None, "layers": None, **selection,
           "aux_loss_coef": switch.router_aux_loss_coef, "z_loss_coef": switch.router_z_loss_coef,
           "jitter": switch.router_jitter_noise, "router_dtype": switch.router_dtype}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    for name, value in given.items():
        if name in FIXED and value != own[name]:
            fixed = " ".join(opt(k, v) for k, v in selection.items()) if name in SELECTION else opt(name, own[name])
            raise MoeifyError(f"{where} is a SwitchTransformers checkpoint: its weights fix {fixed}; "
                              f"drop {opt(name, value)}")
        if name in NO_EFFECT:
            raise MoeifyError(f"{opt(name, value)} has no effect on a SwitchTransformers checkpoint, whose "
                              "experts come from its weights: drop it")
    config = {**own, **given}
    if config["router_dtype"] not in ("float32", "float64"):
        raise MoeifyError(f"{where} routes in {config['router_dtype']}, moeify imports float32 or float64 routers "
                          f"(selective precision): pass {opt('router_dtype', 'float32')} to import it routing in float32")
    return MoEConfig(**config)


# --- tensor names -----------------------------------------------------------------------------

# moeify's converted T5 names its FFN modules DenseReluDense (T5's own); SwitchTransformers names
# them mlp and keeps each expert as its own DenseActDense.
_EXPERT = re.compile(r"^(.*)\.mlp\.experts\.expert_(\d+)\.(wi|wo)\.weight$")
_ROUTER = re.compile(r"^(.*)\.mlp\.router\.classifier\.weight$")
_MLP = re.compile(r"^(.*)\.mlp\.(wi|wo)\.weight$")
_STACKED = {"wi": "w_in", "wo": "w_out"}
_SWITCH_OF = {v: k for k, v in _STACKED.items()}


def moeify_name(switch_name: str) -> tuple[str, int | None]:
    """(moeify tensor name, expert index or None) of a SwitchTransformers tensor."""
    if m := _EXPERT.match(switch_name):
        return f"{m[1]}.DenseReluDense.experts.{_STACKED[m[3]]}", int(m[2])
    if m := _ROUTER.match(switch_name):
        return f"{m[1]}.DenseReluDense.router.weight", None
    if m := _MLP.match(switch_name):
        return f"{m[1]}.DenseReluDense.{m[2]}.weight", None
    return switch_name, None


_M_EXPERTS = re.compile(r"^(.*)\.DenseReluDense\.experts\.(w_in|w_out)$")
_M_ROUTER = re.compile(r"^(.*)\.DenseReluDense\.router\.weight$")
_M_DENSE = re.compile(r"^(.*)\.DenseReluDense\.(wi|wo)\.weight$")


def switch_names(name: str, num_experts: int) -> list[tuple[str, int | None]] | None:
    """[(SwitchTransformers tensor name, expert index or None)] for a moeify tensor: one per expert
    for stacked expert weights; None for a tensor SwitchTransformers has no place for."""
    if m := _M_EXPERTS.match(name):
        return [(f"{m[1]}.mlp.experts.expert_{j}.{_SWITCH_OF[m[2]]}.weight", j) for j in range(num_experts)]
    if m := _M_ROUTER.match(name):
        return [(f"{m[1]}.mlp.router.classifier.weight", None)]
    if m := _M_DENSE.match(name):
        return [(f"{m[1]}.mlp.{m[2]}.weight", None)]
    if ".DenseReluDense." in name:
        return None  # biases, gates: refused before, by what they mean
    return [(name, None)]
