"""SwitchFFN: route each token to its top-k experts (Switch: one), under a capacity limit or dropless."""
from __future__ import annotations

import torch
from torch import nn

from moeify.config import RoutingConfig
from moeify.layers import memory
from moeify.layers.combine import gated_combine
from moeify.layers.dispatch import Dispatch, StaticDispatch, dispatch, dispatch_static
from moeify.layers.experts import Experts
from moeify.layers.kernels import get_kernel
from moeify.layers.profiling import phase
from moeify.layers.router import Router, RouterOutput


class SwitchFFN(nn.Module):
    """Drop-in replacement for a dense FFN: (..., d_model) -> (..., d_model).

    A token gives the sum over its kept choices of gate * expert(x); a token whose every choice
    was dropped gives exactly zero, so the residual connection around the FFN carries it
    unchanged (paper, Section 2.2). With top_k = 1 this is the paper's layer.

    With the cuda kernel the layer plans on the device (dispatch_static): no count goes to the host, so a
    CUDA forward never waits for it.
    """

    # A subclass whose _expert_step sizes buffers on the host (ExpertParallelFFN) sets this False.
    device_dispatch = True

    def __init__(self, d_model: int, d_ff: int, routing: RoutingConfig, activation: nn.Module, *,
                 gated: bool = False, bias: bool = False, out_bias: bool | None = None,
                 dropout: float = 0.0, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, router: Router | None = None,
                 experts: Experts | None = None) -> None:
        """`router` / `experts`: prebuilt parts, used as they are instead of new ones (then the
        arguments that shape them are not used). A subclass whose `_expert_step` reaches experts
        elsewhere passes the experts it holds, which may be fewer than routing.num_experts."""
        super().__init__()
        self.routing = routing
        if router is None:
            router = Router(d_model, routing.num_experts, top_k=routing.top_k, normalize=routing.normalize_gates,
                            jitter=routing.jitter, dtype=getattr(torch, routing.router_dtype), device=device)
        if experts is None:
            experts = Experts(routing.num_experts, d_model, d_ff, activation, gated=gated, bias=bias,
                              out_bias=out_bias, dropout=dropout, dtype=dtype, device=device)
        if router.num_experts != routing.num_experts or d_model != router.weight.shape[1] or d_model != experts.d_model:
            raise ValueError(f"parts do not fit {routing.num_experts} experts of width {d_model}: a router for "
                             f"{router.num_experts} of width {router.weight.shape[1]}, "
                             f"experts of width {experts.d_model}")
        self.router = router
        self.experts = experts

    @property
    def num_experts(self) -> int:
        return self.routing.num_experts

    @property
    def top_k(self) -> int:
        return self.routing.top_k

    def capacity(self, num_tokens: int) -> int | None:
        """Slots per expert for a batch of `num_tokens` (train or eval capacity factor); None if dropless."""
        return self.routing.capacity(num_tokens, self.training)

    def keeps_every_token(self, num_tokens: int) -> bool:
        """Whether routing is the identity for a batch of `num_tokens`: one expert, top-1, no token dropped."""
        r = self.routing
        if r.num_experts != 1 or r.top_k != 1:  # every layer with experts asks: no capacity to compute
            return False
        capacity = r.capacity(num_tokens, self.training)
        return capacity is None or capacity >= num_tokens

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (T, d_model), flattened (batch, position) order
        kernel = get_kernel(self.routing.kernel, x.device)  # once: its parts and the combine take the instance
        # The phase scopes name the phases in torch.profiler traces (benchmarks/profile_step.py).
        with phase("moeify::router"):
            route = self.router(x, kernel)
        if self.keeps_every_token(x.shape[0]):
            # One expert with room for every token: the plan is the identity and each gate exactly 1 (a softmax
            # over one logit), so dispatch's sort and both row copies are skipped; the gate still multiplies, so
            # the router's gradient is what the general path gives.
            with phase("moeify::experts"):
                y = self.experts(x, [x.shape[0]], kernel)
            with phase("moeify::combine"):
                gate = route.gate.to(y.dtype)  # (T, 1)
                if kernel.pool and memory.pools(tuple(y.shape), y.dtype, y.device):
                    return gated_combine(y, gate.view(-1), None, x.shape[0], pool=True).view(*shape[:-1], -1)
                # Where gated_combine would not pool, its product without its Python (E 1 / 64 tokens: 1-1.5 % of the
                # forward, interleaved)
                return (y * gate).view(*shape[:-1], -1)
        if self.device_dispatch and kernel.name == "cuda":
            return self._static_forward(x, route).view(*shape[:-1], -1)
        with phase("moeify::dispatch"):
            plan = dispatch(route.expert_index, self.num_experts, self.capacity(x.shape[0]))
        with phase("moeify::experts"):
            y = self._expert_step(x, route, plan)  # (K, d_model)
        with phase("moeify::combine"):
            # One kept assignment per token with k = 1: a copy; with k > 1 a token sums its choices. (Gating after the
            # copy, in token order as the static plan below does for the GPU, saves three small ops here but cost an
            # E 8 / 8,192-token bfloat16 training step 5 % on the CPU, five interleaved pairs.)
            gate = route.gate.t().reshape(-1).index_select(0, plan.assignment).to(y.dtype)  # (K,)
            out = gated_combine(y, gate, plan.token_index, x.shape[0], accumulate=self.top_k > 1, pool=kernel.pool)
        return out.view(*shape[:-1], y.shape[-1])

    def _static_forward(self, x: torch.Tensor, route: RouterOutput) -> torch.Tensor:
        """forward's arithmetic over every assignment (static shapes): dropped ones enter as zeros and leave
        masked, so they add nothing, gradients included. (T, d_model)."""
        with phase("moeify::dispatch"):
            plan = dispatch_static(route.expert_index, self.num_experts, self.capacity(x.shape[0]))
        with phase("moeify::experts"):
            y = self._static_expert_step(x, route, plan)  # (A, d_model)
        with phase("moeify::combine"):
            if self.top_k == 1:
                # Each token has its one row (A = T): a permutation back, no zeros first, then each token times its
                # gate, masked where the token was dropped (its row is the experts' output for a zero input).
                out = y.new_empty(x.shape[0], y.shape[-1]).index_copy_(0, plan.token_index, y)
                return out * torch.where(plan.keep_by_assignment.unsqueeze(-1), route.gate, 0.0).to(y.dtype)
            gate = route.gate.t().reshape(-1).index_select(0, plan.assignment).to(y.dtype)  # (A,)
            y = y * torch.where(plan.keep, gate, 0.0).unsqueeze(-1)  # masked on the (A,) gate, not on all of y
            return y.new_zeros(x.shape[0], y.shape[-1]).index_add_(0, plan.token_index, y)

    def _static_expert_step(self, x: torch.Tensor, route: RouterOutput, plan: StaticDispatch) -> torch.Tensor:
        """Expert outputs of every assignment in plan.assignment order, (A, d_model); the dropped ones' rows are
        masked by the caller. The static plan's step a subclass overrides (see ExpertParallelFFN)."""
        rows = x.index_select(0, plan.token_index) * plan.keep.unsqueeze(-1)  # (A, d_model), dropped ones zero
        return self.experts(rows, plan.counts, self.routing.kernel)

    def _expert_step(self, x: torch.Tensor, route: RouterOutput, plan: Dispatch) -> torch.Tensor:
        """Expert outputs of the kept assignments, ungated, in plan.assignment order: (K, d_model).

        x is (T, d_model); `plan.capacity` is the slots per expert the plan was made with. The one
        step a subclass overrides to run the experts somewhere else (see ExpertParallelFFN).
        """
        return self.experts(x, plan.counts, self.routing.kernel, rows=plan.token_index)

    def extra_repr(self) -> str:
        r = self.routing
        routing = f"top_k={r.top_k}{', normalize_gates=True' if r.normalize_gates else ''}"
        if r.dropless:
            return f"{routing}, dropless=True"
        return f"{routing}, capacity_factor={r.capacity_factor}, eval_capacity_factor={r.eval_capacity_factor}"


def switch_layers(model: nn.Module) -> dict[str, SwitchFFN]:
    """{qualified name: layer} of every Switch layer (a rank's expert-parallel ones too), in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SwitchFFN)}


def expert_counts(model: nn.Module) -> dict[str, int]:
    """{qualified name: experts} of every Switch layer, in module order (what a sharding plan must match)."""
    return {name: m.num_experts for name, m in switch_layers(model).items()}
