"""write_hf: check a checkpoint against its transformers class built on the meta device, then save it atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from moeify.checkpoint.files import atomic_directory, copy_tokenizer
from moeify.checkpoint.sources import tied_aliases
from moeify.errors import MoeifyError
from moeify.targets.hf.family import HFCheckpoint

SHOWN = 3  # mismatches named in one error line


def target_skeleton(ckpt: HFCheckpoint) -> nn.Module:
    """The checkpoint's class built from its config on the meta device, in the config's dtype."""
    import transformers

    cls = getattr(transformers, ckpt.model_class, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise MoeifyError(f"transformers {transformers.__version__} has no {ckpt.model_class}: upgrade transformers")
    with torch.device("meta"):
        model = cls(ckpt.config)
    return model.to(_dtype(ckpt.config))


def _dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def check_checkpoint(ckpt: HFCheckpoint, skeleton: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor's name, shape and dtype against `skeleton`; the tensors to write, tied copies left out.

    A missing, extra, transposed or retyped tensor is refused in one line naming it: a checkpoint
    that loads with random or misplaced experts is worse than none.
    """
    expected = skeleton.state_dict()
    aliases = tied_aliases(skeleton)  # {alias: source}: written once, re-tied by from_pretrained
    wanted = {k for k in expected if k not in aliases}
    given = {k for k in ckpt.tensors if k not in aliases}
    where = f"{ckpt.model_class} checkpoint"
    missing, extra = sorted(wanted - given), sorted(given - wanted)
    if missing:
        raise MoeifyError(f"the {where} lacks {len(missing)} tensors ({', '.join(missing[:SHOWN])}): "
                          "this is a moeify bug, please report it")
    if extra:
        raise MoeifyError(f"the {where} has {len(extra)} tensors {ckpt.model_class} does not "
                          f"({', '.join(extra[:SHOWN])}): this is a moeify bug, please report it")
    wrong = [f"{k} is {tuple(ckpt.tensors[k].shape)} {_name(ckpt.tensors[k].dtype)}, expected "
             f"{tuple(expected[k].shape)} {_name(expected[k].dtype)}"
             for k in sorted(wanted) if ckpt.tensors[k].shape != expected[k].shape
             or ckpt.tensors[k].dtype != expected[k].dtype]
    if wrong:
        raise MoeifyError(f"refusing to write a {where} with misplaced weights: {'; '.join(wrong[:SHOWN])}"
                          f"{f' (+{len(wrong) - SHOWN} more)' if len(wrong) > SHOWN else ''}: "
                          "this is a moeify bug, please report it")
    for alias, source in aliases.items():
        if alias in ckpt.tensors and not torch.equal(ckpt.tensors[alias], ckpt.tensors[source]):
            raise MoeifyError(f"the {where} gives {alias} and {source} different values, but "
                              f"{ckpt.model_class} ties them: this is a moeify bug, please report it")
    return _unshared({k: ckpt.tensors[k] for k in sorted(wanted)})


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors that share storage copied apart. The class's tied weights are already left out, so any
    sharing left is accidental (one expert's slice of a stacked tensor, an embedding the target does
    not tie), and save_pretrained would write one of them and drop the others as "tied"."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_hf(ckpt: HFCheckpoint, out: Path, *, force: bool = False, tokenizer_dir: Path | None = None,
             progress: Callable[[str, int, int], None] | None = None, show_bars: bool = False) -> Path:
    """Check `ckpt` against its class on the meta device, then save_pretrained it into `out`, atomically.

    transformers' own save_pretrained writes the files, so the layout on disk is the one every
    reader of transformers checkpoints expects. Tokenizer files in `tokenizer_dir` are copied.
    """
    from transformers.utils import logging as hf_logging

    skeleton = target_skeleton(ckpt)
    tensors = check_checkpoint(ckpt, skeleton)  # before anything is written
    if progress:
        progress("check", 1, 1)
    skeleton.load_state_dict({k: v.detach().contiguous() for k, v in tensors.items()}, strict=False, assign=True)
    skeleton.tie_weights()
    left = [n for n, p in skeleton.named_parameters() if p.is_meta]
    if left:  # every parameter was checked above; a class that creates more on tying is a bug
        raise MoeifyError(f"{ckpt.model_class} kept {len(left)} parameters without values ({left[0]}): "
                          "this is a moeify bug, please report it")
    if not show_bars:
        hf_logging.disable_progress_bar()
    try:
        with atomic_directory(out, force=force) as tmp:
            skeleton.save_pretrained(tmp)
            copy_tokenizer(tokenizer_dir, tmp)
    finally:
        if not show_bars:
            hf_logging.enable_progress_bar()
    if progress:
        progress("write", 1, 1)
    return Path(out)
