"""The run loop: each rank feeds its own batches through its part, forward only or training steps."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from moeify.checkpoint.sample import sample_inputs
from moeify.errors import MoeifyError
from moeify.layers.collector import router_losses
from moeify.layers.switch import switch_layers
from moeify.targets.distributed import comm
from moeify.targets.distributed.env import init_distributed
from moeify.targets.distributed.failures import communication
from moeify.targets.distributed.grads import data_parallel, reduce_expert_gradients
from moeify.targets.distributed.loader import load_rank


@dataclass(frozen=True)
class RunConfig:
    path: Path
    steps: int = 10
    train: bool = False
    batch: int = 8  # sequences per rank per step
    seq: int = 64  # encoder / decoder-only sequence length (T5 decoders get seq // 4)
    lr: float = 1e-4
    seed: int = 0
    data: Path | None = None  # safetensors with input_ids [N, S] (and optional decoder_input_ids, labels)
    timeout_s: float = 300.0  # a hung or dead peer turns into an error after this long
    log_every: int = 0  # rank 0 prints a line every N steps; 0: only the summary

    def __post_init__(self) -> None:
        from moeify.targets.distributed.entry import check_options  # the same checks as the command line's

        check_options({f.name: getattr(self, f.name) for f in fields(self)})


@dataclass
class LayerStats:
    name: str
    tokens_per_expert: list[int]  # (token, choice) assignments over all ranks and steps, before capacity
    dropped: int  # of those, assignments over their rank's capacity (they add nothing to their token)
    top_k: int = 1  # assignments per token: with 1, assignments are tokens

    @property
    def dropped_fraction(self) -> float:
        total = sum(self.tokens_per_expert)
        return self.dropped / total if total else 0.0


@dataclass
class RunReport:
    world_size: int
    steps: int
    train: bool
    tokens: int  # input tokens over all ranks and steps (encoder + decoder)
    seconds: float  # wall time of the timed steps (all but the first, when there are several)
    timed_tokens: int
    loss: float | None = None  # last step's loss, mean over ranks (training only)
    layers: list[LayerStats] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.timed_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def dropped_fraction(self) -> float:
        """Dropped assignments over routed assignments, all layers together."""
        routed = sum(sum(s.tokens_per_expert) for s in self.layers)
        return sum(s.dropped for s in self.layers) / routed if routed else 0.0


class Batches:
    """This rank's batch for each step: synthetic (seeded by step and rank) or rows of a data file."""

    def __init__(self, model: nn.Module, config: RunConfig, rank: int, world_size: int, device: torch.device):
        self.model, self.config, self.rank, self.world, self.device = model, config, rank, world_size, device
        self.data = self._read(config.data) if config.data else None
        self.encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))

    @staticmethod
    def _read(path: Path) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        if not path.is_file():
            raise MoeifyError(f"--data {path} does not exist: pass a safetensors file with input_ids [N, S]")
        data = load_file(str(path))
        if "input_ids" not in data or data["input_ids"].dim() != 2:
            raise MoeifyError(f"--data {path} has no 2-D input_ids tensor: store token ids as input_ids [N, S]")
        return data

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        c = self.config
        if self.data is None:
            seed = c.seed + step * self.world + self.rank  # every (step, rank) pair gets its own batch
            batch = sample_inputs(self.model, batch=c.batch, seq=c.seq, seed=seed)
            if batch is None:
                raise MoeifyError("synthetic batches need a transformers model with a vocabulary: pass --data")
        else:
            n = self.data["input_ids"].shape[0]
            rows = (torch.arange(c.batch) + (step * self.world + self.rank) * c.batch) % n
            batch = {k: v.index_select(0, rows) for k, v in self.data.items()}
        if c.train and "labels" not in batch:
            # Teacher forcing: an encoder-decoder shifts its labels right into decoder inputs, and a
            # causal LM shifts its inputs, so neither is asked to copy the token it already sees.
            batch["labels"] = batch.pop("decoder_input_ids") if "decoder_input_ids" in batch else batch["input_ids"]
        return {k: v.to(self.device) for k, v in batch.items()}

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Input tokens, plus decoder tokens for an encoder-decoder (from its labels when not given)."""
        decoder = batch.get("decoder_input_ids", batch.get("labels")) if self.encoder_decoder else None
        return batch["input_ids"].numel() + (decoder.numel() if decoder is not None else 0)


def run_steps(config: RunConfig, log: Callable[[str], None] = print) -> RunReport:
    """Join the process group, load this rank's part, run the steps; every rank gets the report.

    Training: loss = model loss + router losses on this rank's batch, backward, dense gradients
    averaged by DDP, expert gradients reduced by reduce_expert_gradients (see grads.py for the
    loss-scaling rule), then one AdamW step on every rank.
    """
    env, device = init_distributed(config.timeout_s)
    part = load_rank(config.path, device=device, timeout_s=config.timeout_s)
    part.model.train(config.train)
    batches = Batches(part.model, config, env.rank, env.world_size, device)
    model = data_parallel(part) if config.train else part.model
    optimizer = torch.optim.AdamW(part.model.parameters(), lr=config.lr) if config.train else None
    counts: dict[str, torch.Tensor] = {}  # layer -> (E,) routed assignments, this rank
    dropped: dict[str, int] = {}
    tokens = timed_tokens = 0
    loss = torch.zeros((), device=device)
    start = time.perf_counter()
    for step in range(config.steps):
        if step == 1:  # the first step pays for allocation and warm-up: time the rest
            start, timed_tokens = time.perf_counter(), 0
        batch = batches(step)
        with communication(f"rank {env.rank}: step {step + 1}"):
            with torch.set_grad_enabled(config.train), router_losses(part.model) as losses:
                out = model(**batch)
            if config.train:
                loss = out.loss + losses.total()
                loss.backward()
                reduce_expert_gradients(part)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        for r in losses.layers:
            counts[r.name] = counts.get(r.name, 0) + r.tokens_per_expert
            dropped[r.name] = dropped.get(r.name, 0) + r.dropped
        n = batches.tokens(batch) * env.world_size
        tokens, timed_tokens = tokens + n, timed_tokens + n
        if config.log_every and (step + 1) % config.log_every == 0 and env.rank == 0:
            log(f"step {step + 1}/{config.steps}" + (f"  loss {loss.item():.4f}" if config.train else ""))
    seconds = time.perf_counter() - start
    top_k = {name: m.top_k for name, m in switch_layers(part.model).items()}
    with communication(f"rank {env.rank}: gathering statistics"):
        report = _gather(counts, dropped, top_k, loss.detach(), env.world_size, config)
    report.tokens, report.seconds, report.timed_tokens = tokens, seconds, timed_tokens
    return report


def _gather(counts: dict[str, torch.Tensor], dropped: dict[str, int], top_k: dict[str, int], loss: torch.Tensor,
            world: int, config: RunConfig) -> RunReport:
    """Sum routing statistics over ranks (one all-reduce), average the last loss."""
    names = list(counts)
    sizes = [counts[n].numel() for n in names]  # layers may differ in expert count
    device = loss.device
    flat = torch.cat([counts[n].to(device, torch.float64) for n in names]  # float64 sums counts exactly
                     + [torch.tensor([dropped[n] for n in names] + [loss.item()], dtype=torch.float64, device=device)])
    comm.all_reduce(flat)
    parts = flat.split(sizes + [len(names), 1])
    layers = [LayerStats(n, c.round().long().tolist(), int(d), top_k[n])
              for n, c, d in zip(names, parts[:-2], parts[-2].round().long().tolist())]
    return RunReport(world_size=world, steps=config.steps, train=config.train, tokens=0, seconds=0.0,
                     timed_tokens=0, loss=parts[-1].item() / world if config.train else None, layers=layers)
