from moeify.layers.switch import expert_counts

"""The contract, with real processes (gloo): each rank's outputs, gradients and one optimiser step
equal the single-process model's on the same batches."""
import json
from pathlib import Path

import pytest
import torch
from dist_helpers import WORKER, converted_t5, finish, start_ranks
from safetensors.torch import load_file

import moeify
from moeify.layers.collector import router_losses
from moeify.targets.distributed.export import (
    default_plan,
    export_distributed,
    skeleton,
)

pytestmark = pytest.mark.slow
LR = 0.5  # as in rank_worker.py
TOL = dict(rtol=1e-4, atol=1e-5)


def run_ranks(export: Path, world: int, out: Path) -> list[tuple[dict, dict]]:
    out.mkdir()
    results = finish(start_ranks(world, [str(WORKER), str(export), str(out)]), timeout=150)
    for rank, (code, stdout, stderr) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{stdout}\n{stderr}"
    return [(load_file(str(out / f"rank{r}.safetensors")), json.loads((out / f"rank{r}.json").read_text()))
            for r in range(world)]


def reference(source: Path, batches: list[dict]) -> dict:
    """The single-process model on every rank's batch, each with its own capacity.

    Loss-scaling rule: the reference loss is the mean over ranks of each rank's loss
    (model loss + router losses), L = (1/W) * sum_r L_r.
    """
    model = moeify.load(source)
    model.eval()
    with torch.no_grad():
        eval_logits = [model(**b).logits for b in batches]
    model.train()
    train_logits, total, dropped = [], 0.0, 0
    for b in batches:
        with router_losses(model) as losses:
            out = model(**b)
        train_logits.append(out.logits.detach())
        total = total + (out.loss + losses.total()) / len(batches)
        dropped += sum(r.dropped for r in losses.layers)
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    after = {n: p.detach() - LR * grads[n] for n, p in model.named_parameters()}
    return {"eval": eval_logits, "train": train_logits, "grads": grads, "after": after, "dropped": dropped}


def check_parity(source: Path, export: Path, world: int, tmp_path: Path) -> None:
    ranks = run_ranks(export, world, tmp_path / "results")
    batches = [{k.removeprefix("batch/"): v for k, v in res.items() if k.startswith("batch/")} for res, _ in ranks]
    assert len({b["input_ids"].shape[0] for b in batches}) > 1  # ranks differ in batch size, hence capacity
    ref = reference(source, batches)
    assert ref["dropped"] > 0  # capacity really bites, so per-rank capacity is what is tested
    for rank, (res, meta) in enumerate(ranks):
        torch.testing.assert_close(res["eval_logits"], ref["eval"][rank], **TOL)
        torch.testing.assert_close(res["train_logits"], ref["train"][rank], **TOL)
        experts = set(meta["expert_params"])
        checked = 0
        for name, grad in ref["grads"].items():
            for kind, want in (("grad", grad), ("param", ref["after"][name])):
                if name in experts:  # this rank's rows of the stacked expert tensor
                    want = want[meta["experts"][name.rsplit(".experts.", 1)[0]]]
                torch.testing.assert_close(res[f"{kind}/{name}"], want, **TOL, msg=f"rank {rank}: {kind} of {name}")
            checked += 1
        assert checked == len([k for k in res if k.startswith("grad/")])  # every parameter compared


def test_two_ranks_match_the_single_process_model(t5_source, dist2, tmp_path):
    check_parity(t5_source, dist2, 2, tmp_path)


def strided_plan(source: Path):
    """dp=2 x ep=2 on a strided mesh: ep groups [0, 2] and [1, 3]."""
    plan = default_plan(expert_counts(skeleton(source)), 4, expert_parallel=2, allow_uneven=True)
    plan.layout = "strided"
    plan.mesh.ranks = plan.expert_parallel_groups = [[0, 2], [1, 3]]
    plan.data_parallel_groups = [[0, 1], [2, 3]]
    return plan


def test_four_ranks_uneven_strided_plan_match_the_single_process_model(tmp_path):
    """dp=2 x ep=2 on a strided mesh; 5 experts placed unevenly and out of order (3 on one rank, 2 on
    the other), so the all-to-all has uneven splits and expert gradients are reduced over dp."""
    source = tmp_path / "src"
    moeify.save(converted_t5(num_experts=5), source)
    plan = strided_plan(source)
    for layer in plan.layers:
        layer.placement = [1, 0, 1, 0, 0]
    export = export_distributed(source, tmp_path / "dist4", plan).path
    manifest = json.loads((export / "manifest.json").read_text())
    assert [len(r["experts"][plan.layers[0].name]) for r in manifest["ranks"]] == [3, 3, 2, 2]
    check_parity(source, export, 4, tmp_path)


def test_four_ranks_with_replicated_experts_match_the_single_process_model(t5_source, tmp_path):
    """ep=4: copies on 2, 3 and 4 ranks, so senders reach remote copies (expert 0: ranks 1 and 3
    send to rank 2, rank 2 to rank 0) and ranks hold 1 to 3 experts. Every copy must end with the
    reference's gradient and parameters (check_parity compares each rank's rows)."""
    plan = default_plan(expert_counts(skeleton(t5_source)), 4)  # placement [0, 1, 2, 3]
    for layer, replicas in zip(plan.layers, ({"0": [0, 2], "3": [1, 2, 3]}, {"1": [0, 1, 2, 3]}, {"2": [1, 2]}, {})):
        layer.replicas = replicas
    export = export_distributed(t5_source, tmp_path / "dist4", plan).path
    manifest = json.loads((export / "manifest.json").read_text())
    assert [r["experts"][plan.layers[0].name] for r in manifest["ranks"]] == [[0], [1, 3], [0, 2, 3], [3]]
    check_parity(t5_source, export, 4, tmp_path)


def test_replicas_with_data_parallel_match_the_single_process_model(t5_source, tmp_path):
    """dp=2 x ep=2, strided: a replicated expert's gradient is summed over its copies in the ep group,
    then over dp, like the other experts."""
    plan = strided_plan(t5_source)  # placement [0, 0, 1, 1]
    for layer in plan.layers[::2]:
        layer.replicas = {"1": [0, 1]}
    export = export_distributed(t5_source, tmp_path / "dist4", plan).path
    check_parity(t5_source, export, 4, tmp_path)
