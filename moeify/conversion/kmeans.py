"""Seeded, deterministic k-means: spherical (routers from hidden states), balanced (MoEfication's neuron groups)."""
from __future__ import annotations

import torch

MAX_ITERS = 50  # both converge in well under this on FFN weights and a few thousand tokens


def _plus_plus(x: torch.Tensor, k: int, distance, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to its distance to the
    nearest centre so far. Indices of the k chosen rows of x."""
    n = x.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    nearest = distance(x, x[chosen]).squeeze(1)
    for _ in range(1, k):
        weights = nearest.clamp_min(0)
        if not float(weights.sum()) > 0:  # every point sits on a centre: take the first unused one
            unused = torch.ones(n, dtype=torch.bool)
            unused[chosen] = False
            nxt = int(unused.nonzero()[0])
        else:
            nxt = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(nxt)
        nearest = torch.minimum(nearest, distance(x, x[[nxt]]).squeeze(1))
    return torch.tensor(chosen)


def _cosine_distance(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return 1 - x @ c.t()


def _squared_distance(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return ((x * x).sum(1, keepdim=True) - 2 * x @ c.t() + (c * c).sum(1)).clamp_min(0)


def spherical_kmeans(x: torch.Tensor, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit centroids (k, d), labels (n,)) of the rows of x by cosine similarity.

    Cosine, not Euclidean: a bias-free router picks argmax_e c_e . x, which for unit c_e is the
    most similar centroid whatever |x|, so top-1 routing reproduces these clusters exactly.
    """
    x = torch.nn.functional.normalize(x.double(), dim=1)
    c = x[_plus_plus(x, k, _cosine_distance, generator)]
    labels = None
    for _ in range(MAX_ITERS):
        new = (x @ c.t()).argmax(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        empty = (torch.bincount(labels, minlength=k) == 0).nonzero().flatten()
        # An empty cluster takes the points least like their own centroid, one each: no cluster is lost.
        worst = (x * c[labels]).sum(1).argsort()[:len(empty)]
        sums[empty] = x[worst]
        c = torch.nn.functional.normalize(sums, dim=1)
    return c, (x @ c.t()).argmax(1)


def balanced_assign(distance: torch.Tensor, size: int) -> torch.Tensor:
    """Labels giving every cluster exactly `size` of the n = k * size points, greedily by distance.

    In rounds: every unplaced point proposes to its nearest cluster with room, and each cluster
    takes its closest proposers up to its room. A round places everyone or fills a cluster, so at
    most k rounds; ties go to the lower index (stable sorts), so the result is deterministic.
    """
    n, k = distance.shape
    labels = torch.full((n,), -1, dtype=torch.long)
    room = torch.full((k,), size, dtype=torch.long)
    while True:
        free = (labels < 0).nonzero().flatten()
        if len(free) == 0:
            return labels
        d = distance[free].masked_fill(room == 0, float("inf"))
        best, choice = d.min(1)
        order = best.argsort(stable=True)
        order = order[choice[order].argsort(stable=True)]  # by cluster, then by distance
        counts = torch.bincount(choice, minlength=k)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(order)) - starts[choice[order]]
        take = order[rank < room[choice[order]]]
        labels[free[take]] = choice[take]
        room -= torch.bincount(choice[take], minlength=k)


def balanced_kmeans(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Labels (n,) splitting the rows of x into k clusters of exactly n / k (n divisible by k),
    by Euclidean k-means with a balanced assignment step (MoEfication, Zhang et al., 2022)."""
    x = x.double()
    size = x.shape[0] // k
    c = x[_plus_plus(x, k, _squared_distance, generator)]
    labels = None
    for _ in range(MAX_ITERS):
        new = balanced_assign(_squared_distance(x, c), size)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        c = torch.zeros_like(c).index_add_(0, labels, x) / size
    return labels
