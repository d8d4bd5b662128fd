"""One rank of the static-exchange test: an expert-parallel Switch layer on the cuda kernel's device-side plan
takes a training step with every host read refused, and writes its output and gradients.

Run as `python static_worker.py OUT_DIR TOKENS_OF_RANK_0 TOKENS_OF_RANK_1 ...` with torchrun's environment set.
"""
import sys
from pathlib import Path

import torch
from hostreads import no_host_reads
from safetensors.torch import save_file
from torch import nn

from moeify.config import RoutingConfig
from moeify.layers import SwitchFFN
from moeify.layers.collector import router_losses

PLACEMENT = [1, 0, 1, 0, 0]  # 5 experts over 2 ranks, uneven and out of order
EXPERTS_OF = {0: [1, 3, 4], 1: [0, 2]}


def switch_layer(kernel: str) -> SwitchFFN:
    """The same layer on every rank and in the test; a wide router, so capacity drops assignments."""
    g = torch.Generator().manual_seed(0)
    routing = RoutingConfig(num_experts=5, top_k=2, capacity_factor=0.75, min_capacity=1, kernel=kernel)
    m = SwitchFFN(16, 32, routing, nn.GELU(), gated=True, bias=True)
    m.router.reset_parameters(10.0, g)
    m.experts.reset_parameters(1.0, g)
    for b in (m.experts.b_in, m.experts.b_gate, m.experts.b_out):
        nn.init.normal_(b, generator=g)
    return m.train()


def rank_input(rank: int, tokens: int) -> torch.Tensor:
    return torch.randn(tokens, 16, generator=torch.Generator().manual_seed(10 + rank)).requires_grad_()


def step(layer: SwitchFFN, x: torch.Tensor) -> tuple[torch.Tensor, object]:
    with router_losses(layer) as losses:
        y = layer(x)
        loss = (y * torch.arange(y.numel()).view_as(y).sin()).sum() + losses.total()
    loss.backward()
    return y.detach(), losses


def main(out: str, *tokens: str) -> None:
    from moeify.targets.distributed.env import init_distributed
    from moeify.targets.distributed.layer import ExpertGroup, ExpertParallelFFN

    torch.set_num_threads(1)
    env, _ = init_distributed(timeout_s=60)
    group = ExpertGroup(env.rank, env.world_size, torch.distributed.group.WORLD)
    layer = ExpertParallelFFN(switch_layer("cuda"), PLACEMENT, group)
    assert layer.expert_ids == EXPERTS_OF[env.rank]
    x = rank_input(env.rank, int(tokens[env.rank]))
    with no_host_reads():
        y, losses = step(layer, x)
    result = {"y": y, "x_grad": x.grad, "dropped": torch.tensor(losses.layers[0].dropped)}
    result.update({f"grad/{n}": p.grad for n, p in layer.named_parameters()})
    save_file({k: v.contiguous() for k, v in result.items()}, str(Path(out) / f"rank{env.rank}.safetensors"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
