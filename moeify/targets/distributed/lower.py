"""lower_expert_parallel: each planned SwitchFFN => an ExpertParallelFFN holding this rank's experts."""
from __future__ import annotations

from torch import nn

from moeify.config import MoEConfig
from moeify.conversion.passes import Pass, PassContext, PassManager, PassResult, Program
from moeify.errors import MoeifyError
from moeify.layers.switch import SwitchFFN
from moeify.planner.plan import LayerPlan, ShardingPlan
from moeify.targets.distributed.layer import ExpertGroup, ExpertParallelFFN


def check_plan_fits(model: nn.Module, plan: ShardingPlan) -> None:
    """The plan must name exactly the model's Switch layers, with their expert counts and well-formed replicas."""
    layers = {name: m.num_experts for name, m in model.named_modules() if isinstance(m, SwitchFFN)}
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


class LowerExpertParallel(Pass):
    """Rewrite: every SwitchFFN named in the plan becomes an ExpertParallelFFN for one rank.

    Preserves computation: each rank's output on its own batch equals the SwitchFFN's output on
    that batch (capacity is per rank), which the multi-process parity tests check.
    """

    name = "lower_expert_parallel"
    matches = "SwitchFFN modules named in the sharding plan's layers"
    preserves_computation = True

    def __init__(self, plan: ShardingPlan, group: ExpertGroup) -> None:
        if group.size != plan.expert_parallel_size:
            raise MoeifyError(f"the expert-parallel group has {group.size} ranks, the plan "
                              f"{plan.expert_parallel_size}")
        self.plan, self.group = plan, group

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        model = program.model
        check_plan_fits(model, self.plan)
        layers = {layer.name: layer for layer in self.plan.layers}
        jobs = [(name, m) for name, m in model.named_modules()
                if isinstance(m, SwitchFFN) and not isinstance(m, ExpertParallelFFN)]
        for done, (name, switch) in enumerate(jobs):
            lowered = ExpertParallelFFN(switch, layers[name].placement, self.group, layers[name].replicas)
            if name:
                model.set_submodule(name, lowered)
            else:
                program.model = lowered  # the whole model was one FFN
            if ctx.progress:
                ctx.progress(self.name, done + 1, len(jobs))
        return PassResult(program, modified=bool(jobs))


def lower_expert_parallel(model: nn.Module, plan: ShardingPlan, group: ExpertGroup) -> nn.Module:
    """Lower a converted model, in place, to this rank's part; returns it (a new object only for a bare FFN)."""
    record = getattr(model, "moeify_record", None)
    config = record.config if record is not None else MoEConfig()
    ctx = PassContext(config, generator=None, skip_init=True)  # a structural rewrite: no randomness
    out = PassManager([LowerExpertParallel(plan, group)])(Program(model, []), ctx).model
    if record is not None:
        out.moeify_record = record
    return out
