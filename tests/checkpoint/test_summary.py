"""summarize(): exact parameter counts, for a whole converted model and for one rank's part."""
import copy

from tiny import tiny_t5

import moeify
from moeify.layers.switch import expert_counts
from moeify.targets.distributed.export import default_plan
from moeify.targets.distributed.layer import ExpertGroup
from moeify.targets.distributed.lower import lower_expert_parallel

D, F, E = 16, 32, 4  # tiny_t5: d_model 16, d_ff 32 (ReLU, no biases); 4 experts


def test_counts_of_a_converted_model_by_hand():
    dense = tiny_t5()
    sparse = moeify.convert(dense, moeify.MoEConfig(num_experts=E))  # 2 + 2 of the 4 + 4 FFNs
    s = moeify.summarize(sparse)
    dense_total = sum(p.numel() for p in dense.parameters())
    per_expert, layers = 2 * D * F, 4
    assert s.total_params == dense_total + layers * ((E - 1) * per_expert + E * D)  # experts added, routers
    assert s.active_params == dense_total + layers * E * D  # one expert per token: the dense FFN's size
    assert s.dense_params == s.total_params - layers * E * per_expert
    assert [(r.params_per_expert, r.experts_held, r.router_params) for r in s.moe_layers] == [(per_expert, E, E * D)] * 4


def test_a_rank_part_counts_its_own_experts_and_one_active_expert_per_layer():
    sparse = moeify.convert(tiny_t5(), moeify.MoEConfig(num_experts=E))
    full = moeify.summarize(sparse)
    layers = expert_counts(sparse)
    part = lower_expert_parallel(copy.deepcopy(sparse), default_plan(layers, 2), ExpertGroup(0, 2))
    s = moeify.summarize(part)
    per_expert = 2 * D * F
    assert [r.experts_held for r in s.moe_layers] == [2] * 4  # experts 0 and 1 of each layer
    assert s.total_params == full.total_params - 4 * 2 * per_expert
    assert s.active_params == full.active_params  # what one token touches does not depend on placement
    assert s.dense_params == full.dense_params
