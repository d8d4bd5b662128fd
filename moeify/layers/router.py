"""Router: a bias-free linear d_model -> E computed in float32, softmax, the top-k experts and their gates."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from moeify.layers.kernels import Kernel, get_kernel

_SOFTMAX_VECTOR = 16  # floats in torch's widest CPU vector (AVX-512)
_SOFTMAX_MIN_LOGITS = 512  # below this the transposed view's three ops cost more than the scalar loop saves


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """The router's softmax over experts of (T, E) logits. On the CPU torch's softmax over a last dimension narrower
    than a vector of 16 floats runs a scalar loop: over 8 experts and 8,192 tokens 0.54 ms, against 0.10 over the
    transposed view's first dimension, whose gradient also takes half the time (from 16 experts: 0.07 ms the usual
    way). That way for fewer experts there: within an ulp of the other, not bit for bit (its exp is the vectorised
    one). Not for fewer than 512 logits (one expert and 64 tokens: 5.4 us against 4.5; 4 and 64: 6.9 against 5.7; 8 and
    64: 7.2 against 7.9). Traced (ONNX) graphs keep the plain softmax."""
    if logits.shape[-1] < _SOFTMAX_VECTOR and logits.numel() >= _SOFTMAX_MIN_LOGITS and logits.device.type == "cpu" \
            and not torch.jit.is_tracing():
        return torch.softmax(logits.t(), dim=0).t()
    return torch.softmax(logits, dim=-1)


class RouterOutput(NamedTuple):
    logits: torch.Tensor  # (T, E) in the router dtype
    probs: torch.Tensor  # (T, E) softmax of logits
    expert_index: torch.Tensor  # (T, k) chosen experts, most probable first (k = 1: the argmax)
    gate: torch.Tensor  # (T, k) their gates: probabilities, or renormalised to sum to 1


class Router(nn.Module):
    """Switch router (top-1), or GShard / Mixtral's top-k. The weight is in nn.Linear layout:
    (num_experts, d_model). Softmax over all experts, keep the k largest; `normalize` divides the
    kept probabilities by their sum (Mixtral), otherwise the gate is the probability (Switch).

    "Selective precision" (paper, Section 2.4): the weight stays in the router dtype through
    model.to(dtype), .half() and .bfloat16(), and the forward runs with autocast off, so neither
    the expert choices nor the optimiser's updates of the weight are ever rounded to 16 bits.
    Built anywhere but on meta, the weight starts with the paper's init (reset_parameters()).
    """

    def __init__(self, d_model: int, num_experts: int, *, top_k: int = 1, normalize: bool = False,
                 jitter: float = 0.0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.normalize = normalize
        self.jitter = jitter
        self.router_dtype = dtype
        self.weight = nn.Parameter(torch.empty(num_experts, d_model, dtype=dtype, device=device))
        if not self.weight.is_meta:  # usable as built, as nn.Linear is; meta stays free (conversions build there)
            self.reset_parameters()

    def _apply(self, fn, recurse: bool = True):
        # Module.to/half/bfloat16 convert every floating parameter. A device move is welcome; a
        # dtype change is replaced by the untouched original on the new device (and its gradient),
        # so the router keeps both its dtype and every bit of its values.
        w = self.weight
        # .data aliases the storage: _apply rebinds the parameter and its gradient, not these.
        data, grad = w.data, (w.grad.data if w.grad is not None else None)
        super()._apply(fn, recurse)
        if w.dtype != self.router_dtype:
            w.data = data.to(w.device)
            if grad is not None:
                w.grad = grad.to(w.device)
        return self

    def reset_parameters(self, scale: float = 0.1, generator: torch.Generator | None = None) -> None:
        """Paper init: truncated normal with std sqrt(scale / fan_in), cut at two std."""
        truncated_normal_(self.weight, math.sqrt(scale / self.weight.shape[1]), generator)

    def forward(self, x: torch.Tensor, kernel: str | Kernel = "auto") -> RouterOutput:  # x: (T, d_model)
        """`kernel` (RoutingConfig.kernel) computes the logits: the cpu kernel's reads bfloat16 x as it lies."""
        # Autocast would run the linear in bf16/fp16. Its off-switch is entered only where it is on: a context that
        # changes nothing costs ~2 us, 0.3 % of an E = 1 layer at 64 tokens.
        if torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self._route(x, kernel)
        return self._route(x, kernel)

    def _route(self, x: torch.Tensor, kernel: str | Kernel) -> RouterOutput:
        if self.training and self.jitter > 0:
            x = x.to(self.router_dtype)
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = get_kernel(kernel, x.device).router_logits(x, self.weight)  # (T, E) in the router dtype
        probs = softmax(logits)  # (T, E)
        if self.top_k == 1:  # max: the first of tied maxima, as the paper's argmax
            gate, expert_index = probs.max(dim=-1, keepdim=True)  # (T, 1), (T, 1)
        else:
            gate, expert_index = probs.topk(self.top_k, dim=-1)  # (T, k), most probable first
        if self.normalize:
            gate = gate / gate.sum(dim=-1, keepdim=True)
        return RouterOutput(logits, probs, expert_index, gate)


def truncated_normal_(t: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill `t` from N(0, std) cut at two std. Drawn on the CPU with `generator` (a CPU generator),
    then copied, so one seed gives the same values on every device; meta tensors stay empty."""
    if t.is_meta:
        return t  # structure-only models carry no values
    with torch.no_grad():
        # By the inverse CDF: uniform over erf's image of [-2, 2] std, then erfinv, three passes in float32. torch
        # 2.13's trunc_normal_ samples by rejection (six normal_ draws of the whole tensor): 4.4 s against 0.4 s for
        # 64 experts' 67 M weights on two cores, where it made SwitchFFN(512, 2048) with 64 experts take 9 s to build.
        inplace = t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
        values = t if inplace else torch.empty(t.shape, dtype=torch.float32)
        edge = math.erf(2 / math.sqrt(2))
        values.uniform_(-edge, edge, generator=generator).erfinv_().mul_(std * math.sqrt(2))
        values.clamp_(-2 * std, 2 * std)  # erfinv's rounding at the edges
        return t if inplace else t.copy_(values)
