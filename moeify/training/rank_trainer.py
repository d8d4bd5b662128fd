"""The distributed training step: Trainer on one rank's part, with gradients, clipping and figures over all ranks.

Every rank runs Trainer.train_step on its slice of the global batch (slices.py): the forward goes
through DDP (dense gradients averaged over all ranks), then reduce_expert_gradients (expert
gradients summed over their holders and divided by the world size: see grads.py), so each rank
takes the optimizer step the single process takes on the global batch, provided
  - every slice has the same number of sequences and label tokens (fixed shapes: the mean of the
    ranks' mean losses is the global mean);
  - no token drops: capacity is per rank batch here (use --dropless, or a capacity factor nothing
    overflows);
  - no dropout or router jitter: each rank draws its own.
The load-balancing loss E * sum_e f_e * P_e is a product of two batch means, so the mean of the ranks'
own losses would not be the global batch's: each rank takes f from the global batch (its layer's
counts all-reduced in the router hook, no gradient) and P from its own tokens, and the mean over
ranks of E * sum_e f_e * P_e(rank) is exactly the global loss, gradients included. The z-loss is a
mean over tokens and needs nothing. Gradient clipping uses the global norm (dense weights once, each
expert once over its group). The figures a step reports are global: cross-entropy, aux and z losses
as means over ranks, dropped fraction and load CV from expert counts summed over ranks; evaluation
averages the ranks' losses.
"""
from __future__ import annotations

import torch

from moeify.layers.collector import RouterLosses, router_losses
from moeify.targets.distributed import comm
from moeify.targets.distributed.failures import communication
from moeify.targets.distributed.grads import data_parallel, reduce_expert_gradients
from moeify.targets.distributed.groups import RankPart
from moeify.targets.distributed.layer import ExpertParallelFFN
from moeify.training.config import TrainConfig
from moeify.training.fit import StopRequest
from moeify.training.loop import StepResult, Trainer, load_cv


class RankTrainer(Trainer):
    """A Trainer of one rank's part: `model` is the part itself (what a checkpoint saves), `forward` its DDP."""

    def __init__(self, part: RankPart, config: TrainConfig, step: int = 0) -> None:
        super().__init__(part.model, config, step)
        self.part, self.world = part, part.groups.world_size
        self.forward = data_parallel(part)
        self.device = next(part.model.parameters()).device

    def train_step(self, batch: dict[str, torch.Tensor]) -> StepResult:
        with communication(f"rank {self.part.groups.rank}: step {self.step + 1}"):
            return super().train_step({k: v.to(self.device) for k, v in batch.items()})

    def _routing(self):
        return router_losses(self.model, fractions=self._global_fractions)

    def _global_fractions(self, routed: torch.Tensor, tokens: int) -> torch.Tensor:
        """A layer's f over the global batch: assignments per expert over tokens, both summed over ranks."""
        flat = torch.cat([routed.to(torch.float64), torch.tensor([tokens], dtype=torch.float64, device=routed.device)])
        comm.all_reduce(flat)
        return flat[:-1] / flat[-1]

    def after_backward(self) -> None:
        reduce_expert_gradients(self.part)

    def clip_gradients(self, max_norm: float) -> None:
        """torch's clip_grad_norm_ over the whole model: dense gradients are the same on every rank, each
        expert counts once in its expert-parallel group (a replicated one at its first holder)."""
        experts, owned = [], set()
        for m in self.model.modules():
            if isinstance(m, ExpertParallelFFN):
                first = torch.tensor([m.holders[e][0] == m.group.rank for e in m.expert_ids], device=self.device)
                for w in m.experts.parameters():
                    owned.add(id(w))
                    if w.grad is not None:
                        experts.append(w.grad[first])
        dense = [p.grad for p in self.model.parameters() if p.grad is not None and id(p) not in owned]
        zero = torch.zeros((), dtype=torch.float32, device=self.device)
        square = torch.stack([zero] + [g.float().square().sum() for g in dense]).sum()
        local = torch.stack([zero] + [g.float().square().sum() for g in experts]).sum().reshape(1)
        comm.all_reduce(local, group=self.part.groups.expert_parallel)
        norm = (square + local[0]).sqrt()
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale.to(p.grad.dtype))

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return super().tokens(batch) * self.world  # the slices are equal

    def _result(self, loss: torch.Tensor, ce: float, routing: RouterLosses | None) -> StepResult:
        local = Trainer._result(loss, ce, routing)
        layers = routing.layers if routing is not None else []
        flat = torch.tensor([ce, local.aux_loss or 0.0, local.z_loss or 0.0, sum(r.dropped for r in layers),
                             sum(r.tokens for r in layers)], dtype=torch.float64)
        flat = torch.cat([flat] + [r.tokens_per_expert.to(torch.float64).cpu() for r in layers]).to(self.device)
        with communication(f"rank {self.part.groups.rank}: gathering step {self.step}'s figures"):
            comm.all_reduce(flat)
        flat = flat.cpu()
        head, counts = flat[:5], flat[5:].split([r.tokens_per_expert.numel() for r in layers])
        if routing is None:
            return StepResult(loss, float(head[0]) / self.world, None, None, None, {})
        return StepResult(loss, float(head[0]) / self.world, float(head[1]) / self.world, float(head[2]) / self.world,
                          float(head[3] / head[4]) if head[4] > 0 else 0.0,
                          {r.name: load_cv(c) for r, c in zip(layers, counts)})

    def evaluate(self, batches: list[dict[str, torch.Tensor]]) -> float:
        """The mean over ranks of each rank's mean loss on its slices: every rank takes part (experts are spread)."""
        with communication(f"rank {self.part.groups.rank}: evaluating"):
            local = super().evaluate([{k: v.to(self.device) for k, v in b.items()} for b in batches])
            loss = torch.tensor([local], dtype=torch.float64, device=self.device)
            comm.all_reduce(loss)
        return float(loss[0]) / self.world


class AgreedStop(StopRequest):
    """A StopRequest every rank reads alike: a Ctrl-C seen by any rank stops all of them after the same step."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.seen, self.device = False, device

    def __call__(self, signum: int, frame) -> None:
        if self.seen:
            raise KeyboardInterrupt
        self.seen = True

    @property
    def requested(self) -> bool:
        flag = torch.tensor([1.0 if self.seen else 0.0], device=self.device)
        comm.all_reduce(flag, op="max")
        return bool(flag[0])

    @requested.setter
    def requested(self, value: bool) -> None:
        self.seen = value
