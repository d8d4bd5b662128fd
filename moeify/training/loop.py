"""The training step: the optimizer, one update (cross-entropy + router losses) and the validation loss."""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from moeify.layers.collector import RouterLosses, router_losses
from moeify.layers.switch import switch_layers
from moeify.training.config import TrainConfig


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # One fixed implementation, so a resumed run repeats the uninterrupted one bit for bit. AdamW: the fused
    # kernel, which updates each tensor in one pass; the per-parameter loop allocates temporaries the size of a
    # stacked expert weight for every step and was 7x slower on a t5-small Switch-8 (docs/performance.md).
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    return torch.optim.Adafactor(params, lr=config.lr, weight_decay=config.weight_decay, foreach=False)


@dataclass(frozen=True)
class StepResult:
    """What one training step measured. Router figures are None for a dense model."""

    loss: torch.Tensor  # the optimised loss: cross-entropy + the routers' coefficient-weighted losses
    ce_loss: float
    aux_loss: float | None
    z_loss: float | None
    dropped_fraction: float | None
    load_cv: dict[str, float]  # Switch layer -> std / mean of its tokens per expert in this step


def load_cv(counts: torch.Tensor) -> float:
    """std / mean of an expert-load vector (population std: the loads are the whole population)."""
    counts = counts.double()
    mean = counts.mean()
    return float(counts.std(correction=0) / mean) if mean > 0 else 0.0


def no_cache(model: nn.Module) -> dict:
    """Keyword arguments that keep `model` from building a key/value cache while it computes a loss: T5's and
    GPT-2's forwards build one by default (config.use_cache), concatenating every decoder layer's keys and values on
    each step for nothing (8 % of a t5-small training step on CPU; docs/performance.md)."""
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


class Trainer:
    """One model and its optimizer; `step` counts the updates done so far."""

    def __init__(self, model: nn.Module, config: TrainConfig, step: int = 0) -> None:
        self.model, self.config, self.step = model, config, step
        self.forward: nn.Module = model  # what a step calls: the model, or a wrapper of it (DDP on a rank)
        self.optimizer = make_optimizer(model, config)
        self.switch = bool(switch_layers(model))
        self.call = no_cache(model)

    def _autocast(self):
        if self.config.precision == "bf16":  # on the device the weights are on: a rank's GPU, or the CPU
            device = next(self.model.parameters()).device.type
            return torch.autocast(device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _routing(self):
        return router_losses(self.model) if self.switch else contextlib.nullcontext(None)

    def train_step(self, batch: dict[str, torch.Tensor]) -> StepResult:
        self.model.train()
        lr = self.config.lr_at(self.step + 1)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        with self._routing() as routing, self._autocast():
            ce = self.forward(**batch, **self.call).loss
            loss = ce.float() + (routing.total() if routing is not None else 0.0)
        loss.backward()
        self.after_backward()
        if self.config.clip > 0:
            self.clip_gradients(self.config.clip)
        self.optimizer.step()
        self.step += 1
        return self._result(loss.detach(), float(ce.detach()), routing)

    def after_backward(self) -> None:
        """Between backward and clipping: where a distributed trainer reduces its gradients."""

    def clip_gradients(self, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=False)

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Input tokens a step trained on (a distributed trainer counts every rank's)."""
        return int(batch["input_ids"].numel())

    @staticmethod
    def _result(loss: torch.Tensor, ce: float, routing: RouterLosses | None) -> StepResult:
        if routing is None:
            return StepResult(loss, ce, None, None, None, {})
        return StepResult(loss, ce, float(routing.aux_loss().detach()), float(routing.z_loss().detach()),
                          routing.dropped_fraction(),
                          {r.name: load_cv(r.tokens_per_expert) for r in routing.layers})

    @torch.no_grad()
    def evaluate(self, batches: list[dict[str, torch.Tensor]]) -> float:
        """Mean cross-entropy over `batches` in eval mode (no dropout, the eval capacity factor)."""
        self.model.eval()
        with self._autocast():
            losses = [float(self.model(**batch, **self.call).loss) for batch in batches]
        self.model.train()
        return sum(losses) / len(losses)
