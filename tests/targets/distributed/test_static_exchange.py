"""The cuda kernel's device-side plan across ranks (gloo, real processes): a training step reads nothing on the
host, and gives the host-planned single-process layer's outputs and gradients."""
from pathlib import Path

import pytest
import torch
from dist_helpers import finish, start_ranks
from safetensors.torch import load_file
from static_worker import EXPERTS_OF, rank_input, step, switch_layer

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("static_worker.py")


def run(tmp_path: Path, tokens: list[int]) -> list[tuple[int, str, str]]:
    return finish(start_ranks(2, [str(WORKER), str(tmp_path), *map(str, tokens)]))


def test_two_ranks_on_the_static_exchange_match_the_single_process_layer(tmp_path):
    tokens = [12, 12]
    for rank, (code, out, err) in enumerate(run(tmp_path, tokens)):
        assert code == 0, f"rank {rank}:\n{out}\n{err}"
    expert_grads = {}  # every rank's tokens reach every expert: its gradient sums over the ranks
    for rank in range(2):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        ref = switch_layer("reference")
        x = rank_input(rank, tokens[rank])
        y, losses = step(ref, x)
        assert losses.layers[0].dropped > 0 and int(got["dropped"]) == losses.layers[0].dropped
        torch.testing.assert_close(got["y"], y)
        torch.testing.assert_close(got["x_grad"], x.grad)
        torch.testing.assert_close(got["grad/router.weight"], ref.router.weight.grad)
        for name, p in ref.experts.named_parameters():
            expert_grads[name] = expert_grads.get(name, 0) + p.grad
    for rank in range(2):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        for name, grad in expert_grads.items():
            torch.testing.assert_close(got[f"grad/experts.{name}"], grad[EXPERTS_OF[rank]], msg=name)


def test_ranks_routing_different_token_counts_are_refused_not_mismatched(tmp_path):
    """Capacities 4 and 3: the static exchange cannot size its splits from shapes; the device check stops it."""
    for code, out, err in run(tmp_path, [12, 9]):
        assert code != 0 and "route different token counts" in err, err
