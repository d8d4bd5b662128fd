"""lower_expert_parallel: each planned SwitchFFN => an ExpertParallelFFN holding this rank's experts."""
from __future__ import annotations

from torch import nn

from moeify.errors import MoeifyError
from moeify.layers.switch import SwitchFFN, expert_counts
from moeify.planner.plan import LayerPlan, ShardingPlan
from moeify.targets.distributed.layer import ExpertGroup, ExpertParallelFFN


def check_plan_fits(model: nn.Module, plan: ShardingPlan) -> None:
    """The plan must name exactly the model's Switch layers, with their expert counts and well-formed replicas."""
    layers = expert_counts(model)
    planned = {layer.name: layer.num_experts for layer in plan.layers}
    if layers != planned:
        missing, extra = sorted(set(layers) - set(planned)), sorted(set(planned) - set(layers))
        if missing or extra:
            what = f"it lacks {missing[:2]}" if missing else f"it names layers the model lacks ({extra[:2]})"
        else:
            wrong = sorted(n for n in layers if layers[n] != planned[n])[0]
            what = f"{wrong} has {layers[wrong]} experts, the plan {planned[wrong]}"
        raise MoeifyError(f"the plan was made for another model: {what}: re-run `moeify plan` on this model")
    for layer in plan.layers:
        _check_replicas(layer, plan.expert_parallel_size)


def _check_replicas(layer: LayerPlan, ep: int) -> None:
    """Each replicated expert: a list of distinct group ranks that includes its home rank."""
    for key, ranks in layer.replicas.items():
        where = f"the plan's replicas of {layer.name} expert {key}"
        if not (key.isdigit() and int(key) < layer.num_experts):
            raise MoeifyError(f"{where}: no such expert (the layer has {layer.num_experts}): re-run `moeify plan`")
        if not isinstance(ranks, list) or not all(isinstance(r, int) and 0 <= r < ep for r in ranks):
            raise MoeifyError(f"{where} ({ranks}) must be group ranks in 0..{ep - 1}: re-run `moeify plan`")
        if len(set(ranks)) != len(ranks):
            raise MoeifyError(f"{where} ({ranks}) name a rank twice: re-run `moeify plan`")
        if layer.placement[int(key)] not in ranks:
            raise MoeifyError(f"{where} ({ranks}) lack its home rank {layer.placement[int(key)]}: "
                              "re-run `moeify plan`")


def lower_expert_parallel(model: nn.Module, plan: ShardingPlan, group: ExpertGroup) -> nn.Module:
    """Every SwitchFFN named in the plan => an ExpertParallelFFN holding `group.rank`'s experts.

    In place; returns the model (a new object only when the whole model was one FFN). On each
    rank's own batch the lowered model computes what the converted one computes on that batch
    (capacity is per rank): the multi-process parity tests hold it to that.
    """
    if group.size != plan.expert_parallel_size:
        raise MoeifyError(f"the expert-parallel group has {group.size} ranks, the plan {plan.expert_parallel_size}")
    check_plan_fits(model, plan)
    record = getattr(model, "moeify_record", None)
    layers = {layer.name: layer for layer in plan.layers}
    for name, switch in [(n, m) for n, m in model.named_modules()
                         if isinstance(m, SwitchFFN) and not isinstance(m, ExpertParallelFFN)]:
        lowered = ExpertParallelFFN(switch, layers[name].placement, group, layers[name].replicas)
        if name:
            model.set_submodule(name, lowered)
        else:
            model = lowered  # the whole model was one FFN
    if record is not None:
        model.moeify_record = record
    return model
