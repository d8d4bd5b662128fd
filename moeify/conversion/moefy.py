"""--init moefy (MoEfication, Zhang et al., 2022): each expert is one balanced cluster of the dense FFN's neurons."""
from __future__ import annotations

import torch

from moeify.config import MoEConfig
from moeify.conversion.dense_weights import DenseFFN
from moeify.conversion.kmeans import balanced_kmeans
from moeify.errors import MoeifyError, opt
from moeify.layers import SwitchFFN


def expert_d_ff(site: str, d_ff: int, config: MoEConfig) -> int:
    """Each expert's width: the dense FFN's, or d_ff / E for moefy (refused unless E divides d_ff)."""
    if config.init != "moefy":
        return d_ff
    e = config.num_experts
    if d_ff % e:
        fits = min((n for n in range(1, d_ff + 1) if d_ff % n == 0), key=lambda n: (abs(n - e), -n))
        raise MoeifyError(f"{opt('init', 'moefy')} splits the {d_ff} neurons of {site} into equal groups, but "
                          f"{d_ff} is not divisible by {opt('num_experts', e)}: try {opt('num_experts', fits)}")
    return d_ff // e


def neuron_groups(dense: DenseFFN, num_experts: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(groups (E, d_ff / E) of neuron indices, centroids (E, d_model) float64) by balanced k-means.

    A neuron is the row of the weight that feeds the activation (w_gate in a gated FFN, else w_in):
    that row decides when the neuron fires, so neurons that fire together share an expert.
    """
    keys = (dense.w_gate if dense.w_gate is not None else dense.w_in).detach().cpu().double()
    labels = balanced_kmeans(keys, num_experts, generator)
    groups = labels.argsort(stable=True).view(num_experts, -1)  # each group's neurons in dense order
    return groups, keys[groups].mean(1)


@torch.no_grad()
def moefy(layer: SwitchFFN, dense: DenseFFN, generator: torch.Generator) -> None:
    """Expert e holds neuron group e; the router's rows are the groups' centroids.

    With every expert active and every gate 1 the layer's output is the dense FFN's exactly.
    """
    ex = layer.experts
    if ex.w_in.is_meta:
        return  # structure only: nothing to cluster
    groups, centroids = neuron_groups(dense, layer.num_experts, generator)
    idx = groups.to(ex.w_in.device)
    ex.w_in.copy_(dense.w_in[idx])  # (E, d_ff / E, d_model)
    ex.w_out.copy_(dense.w_out[:, idx].permute(1, 0, 2))  # (d_model, E, d_ff / E) -> (E, d_model, d_ff / E)
    for source, target in ((dense.w_gate, ex.w_gate), (dense.b_in, ex.b_in), (dense.b_gate, ex.b_gate)):
        if target is not None:
            target.copy_(source[idx])
    if ex.b_out is not None:
        # The output bias is not a neuron's: each expert carries 1/E of it, so the E experts together
        # add it once (the exact property); a token routed to k experts gets k/E of it.
        ex.b_out.copy_((dense.b_out / layer.num_experts).unsqueeze(0).expand_as(ex.b_out))
    # The router scores an expert by its neurons' mean pre-activation, c_e . x (MoEfication's routing).
    layer.router.weight.copy_(centroids.to(layer.router.weight.dtype))


@torch.no_grad()
def routed_error(layer: SwitchFFN, x: torch.Tensor, y: torch.Tensor, k: int) -> float:
    """||y_k - y|| / ||y||, where y_k sums each token's k most probable experts with gate 1 (as a
    MoEfied FFN computes) and y is the dense FFN's output on the same inputs x (N, d_model)."""
    ex = layer.experts
    x = x.to(ex.w_in.device)
    logits = torch.nn.functional.linear(x.to(layer.router.weight.dtype), layer.router.weight)
    expert = logits.topk(k, dim=-1).indices.t().reshape(-1)  # (k * N,), choice-major
    token = torch.arange(x.shape[0], device=x.device).repeat(k)
    order = expert.argsort(stable=True)
    counts = torch.bincount(expert, minlength=layer.num_experts).tolist()
    training = ex.training
    ex.eval()  # no expert dropout in a measurement
    out = ex(x[token[order]], counts)
    ex.train(training)
    y_k = out.new_zeros(x.shape[0], out.shape[1]).index_add_(0, token[order], out).float()
    y = y.to(y_k)
    return float((y_k - y).norm() / y.norm().clamp_min(torch.finfo(y.dtype).tiny))
