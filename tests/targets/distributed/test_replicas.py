"""Replicated experts without processes: the plan checks, the buffer/replica mapping, and emission."""
import copy
import json

import pytest
import torch
from dist_helpers import converted_t5
from safetensors.torch import load_file

import moeify
from moeify.distributed import ExpertGroup, lower_expert_parallel
from moeify.layers.switch import expert_counts
from moeify.targets.distributed.export import (
    default_plan,
    export_distributed,
    skeleton,
)
from moeify.targets.distributed.lower import check_plan_fits


@pytest.mark.parametrize("replicas, message", [
    ({"0": [1]}, r"replicas of \S+ expert 0 \(\[1\]\) lack its home rank 0"),
    ({"0": [0, 0]}, r"replicas of \S+ expert 0 \(\[0, 0\]\) name a rank twice"),
    ({"2": [1, 2]}, r"replicas of \S+ expert 2 \(\[1, 2\]\) must be group ranks in 0..1"),
    ({"4": [0, 1]}, r"replicas of \S+ expert 4: no such expert \(the layer has 4\)"),
])
def test_malformed_replicas_are_refused(replicas, message):
    model = converted_t5()
    plan = default_plan(expert_counts(model), 2)  # placement [0, 0, 1, 1]
    plan.layers[1].replicas = replicas
    with pytest.raises(moeify.MoeifyError, match=message):
        check_plan_fits(model, plan)
    plan.layers[1].replicas = {"0": [1, 0], "3": [1]}  # unsorted and single copies are fine
    check_plan_fits(model, plan)


def parts(placement, replicas):
    """Every rank's ExpertParallelFFN of one layer, for a group of len(placement's ranks)."""
    model = converted_t5(num_experts=len(placement))
    size = max(placement) + 1
    plan = default_plan(expert_counts(model), size, allow_uneven=True)
    for layer in plan.layers:
        layer.placement, layer.replicas = placement, replicas
    name = plan.layers[0].name
    return [lower_expert_parallel(copy.deepcopy(model), plan, ExpertGroup(r, size)).get_submodule(name)
            for r in range(size)]


def test_each_sender_fills_one_copy_and_it_receives_exactly_those_rows():
    """Simulates the all-to-all on labelled rows: source s's rows for expert e reach rank
    holders[e][s % len(holders[e])] only, and arrive grouped under that copy, senders in order."""
    placement, replicas = [0, 0, 1, 2, 3, 3], {"0": [2, 0], "4": [1, 2, 3]}
    ranks = parts(placement, replicas)
    assert [m.expert_ids for m in ranks] == [[0, 1], [2, 4], [0, 3, 4], [4, 5]]
    capacities = [2, 3, 1, 2]  # ranks' batches differ, so their capacities do
    sent = []  # per source: its buffer split by destination
    for s, (m, c) in enumerate(zip(ranks, capacities)):
        label = torch.empty(6 * c)  # the whole [E * C] buffer: each expert goes to exactly one rank
        for e in range(6):
            label[m._block[e] * c: (m._block[e] + 1) * c] = torch.arange(c) + 100 * e + 10 * s
        sent.append(label.split([n * c for n in m._per_rank]))
    for r, m in enumerate(ranks):
        received = torch.cat([sent[s][r] for s in range(4)])
        assert received.numel() == sum(len(f) * c for f, c in zip(m._from, capacities))
        order, counts = m._grouping(capacities, received.device)
        grouped = received[order].split(counts)
        for e, rows in zip(m.expert_ids, grouped):
            senders = [s for s in range(4) if m.holders[e][s % len(m.holders[e])] == r]
            want = torch.cat([torch.arange(capacities[s]) + 100 * e + 10 * s for s in senders])
            assert senders and torch.equal(rows, want), (r, e)


def test_without_replicas_the_buffer_is_ordered_by_owning_rank():
    ranks = parts([1, 0, 1, 0], {})
    assert [m.expert_ids for m in ranks] == [[1, 3], [0, 2]]
    for m in ranks:  # every sender's blocks: rank 0's experts 1, 3, then rank 1's 0, 2
        assert m._block == [2, 0, 3, 1] and m._per_rank == [2, 2] and m._from == [[0, 1], [0, 1]]
        assert m.replicated == []


def test_a_replicated_expert_lands_in_every_holding_shard(t5_source, tmp_path):
    plan = default_plan(expert_counts(skeleton(t5_source)), 2)  # placement [0, 0, 1, 1]
    ffn = plan.layers[1].name
    plan.layers[1].replicas = {"1": [0, 1], "2": [1, 0]}
    export = export_distributed(t5_source, tmp_path / "dist2", plan).path
    manifest = json.loads((export / "manifest.json").read_text())
    assert [r["experts"][ffn] for r in manifest["ranks"]] == [[0, 1, 2], [1, 2, 3]]
    assert [r["experts"][plan.layers[0].name] for r in manifest["ranks"]] == [[0, 1], [2, 3]]
    source = load_file(str(t5_source / "moeify-model.safetensors"))
    for rank, ids in enumerate(([0, 1, 2], [1, 2, 3])):
        shard = load_file(str(export / f"rank-{rank:05d}-of-00002.safetensors"))
        for name in (f"{ffn}.experts.w_in", f"{ffn}.experts.w_out"):
            assert torch.equal(shard[name], source[name][ids]), (rank, name)
