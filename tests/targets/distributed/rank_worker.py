"""One rank of the parity tests: eval and train outputs, gradients, and parameters after one SGD step.

Run as `python rank_worker.py EXPORT_DIR OUT_DIR [EXPORT_DIR OUT_DIR ...]` with torchrun's environment
variables set: several exports run one after the other in the same processes, to pay start-up once.
"""
import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from safetensors.torch import save_file  # noqa: E402
from tiny import t5_batch  # noqa: E402

import moeify.distributed as md  # noqa: E402
from moeify.layers.collector import router_losses  # noqa: E402
from moeify.targets.distributed.layer import expert_parameters  # noqa: E402

LR = 0.5


def rank_batch(rank: int) -> dict[str, torch.Tensor]:
    """Each rank its own batch; sizes differ, so ranks have different capacities."""
    batch = t5_batch(seed=100 + rank, batch=2 + rank % 2)
    return {**batch, "labels": batch["decoder_input_ids"]}


def main(*args: str) -> None:
    env, _ = md.init(timeout_s=60)
    for export, out in zip(args[::2], args[1::2], strict=True):
        run(env, export, out)
    torch.distributed.destroy_process_group()


def run(env, export: str, out: str) -> None:
    part = md.load_rank(export)
    assert isinstance(part, md.RankPart) and part.groups.world_size == env.world_size
    model = part.model
    batch = rank_batch(env.rank)
    result = {f"batch/{k}": v for k, v in batch.items()}  # the test's reference runs the same batch
    model.eval()
    with torch.no_grad():
        result["eval_logits"] = model(**batch).logits
    model.train()  # tiny T5 has dropout 0: train mode differs from eval by the capacity factor
    ddp = md.data_parallel(part)
    with router_losses(model) as losses:
        out_train = ddp(**batch)
    loss = out_train.loss + losses.total()  # this rank's loss, unscaled: see moeify/targets/distributed/grads.py
    loss.backward()
    md.reduce_expert_gradients(part)
    result["train_logits"] = out_train.logits.detach()
    experts = expert_parameters(model)
    for name, p in model.named_parameters():
        result[f"grad/{name}"] = p.grad if p.grad is not None else torch.zeros_like(p)
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
    for name, p in model.named_parameters():
        result[f"param/{name}"] = p.detach()
    save_file({k: v.contiguous().clone() for k, v in result.items()}, str(Path(out) / f"rank{env.rank}.safetensors"))
    ids = {name: m.expert_ids for name, m in model.named_modules() if isinstance(m, md.ExpertParallelFFN)}
    (Path(out) / f"rank{env.rank}.json").write_text(json.dumps({"experts": ids, "expert_params": list(experts)}))


if __name__ == "__main__":
    main(*sys.argv[1:])
