"""`torchrun -m moeify.training.rank LAUNCH.json`: one rank of `moeify train --nproc N` (launch.py writes the file)."""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path


def train_rank(launch: dict) -> dict:
    """Join the group, load this rank's part of the export, train its slice of every global batch with fit."""
    import torch

    from moeify.targets.distributed.env import init_distributed
    from moeify.targets.distributed.loader import load_rank
    from moeify.training.batches import DataPosition
    from moeify.training.config import DataConfig, TrainConfig
    from moeify.training.data import prepare_data, source_tokenizer
    from moeify.training.fit import RunState, fit
    from moeify.training.gather import Gather, restore_rank
    from moeify.training.rank_trainer import AgreedStop, RankTrainer
    from moeify.training.slices import slice_data

    env, device = init_distributed(launch["timeout_s"])
    part = load_rank(launch["export"], device=device, timeout_s=launch["timeout_s"])
    train = TrainConfig(**launch["train"])
    data_config = DataConfig(**{k: (Path(v) if k in ("text", "data") and v is not None else v)
                                for k, v in launch["data"].items()})
    resume = launch.get("resume")
    position = DataPosition.from_dict(resume["data_position"]) if resume else None
    data = slice_data(prepare_data(part.model, data_config, source_tokenizer(launch["source"]), position),
                      env.rank, env.world_size)
    torch.manual_seed(data_config.seed)  # as the single process; dropout would draw per rank
    trainer = RankTrainer(part, train, step=resume["step"] if resume else 0)
    state = RunState()
    if resume:
        restore_rank(Path(resume["checkpoint"]), trainer.optimizer, env.rank, env.world_size)
        state = RunState(resume["tokens"], resume["wall_seconds"], resume["best_val_loss"])
    stop = AgreedStop(device)
    stop.install()
    save = Gather(Path(launch["model_dir"]), Path(launch["scratch"]), launch["expert_parallel"], device)
    saved = fit(trainer, data, data_config, Path(launch["run_dir"]), state, stop=stop, save=save, lead=env.rank == 0)
    return {"step": trainer.step, "tokens": state.tokens, "best_val_loss": state.best_val_loss,
            "saved": None if saved is None else str(saved)}


def main(path: str) -> None:
    from moeify.errors import MoeifyError
    from moeify.targets.distributed import comm
    from moeify.targets.distributed.entry import rank_errors, write_rank_report

    launch = json.loads(Path(path).read_text())
    rank = int(os.environ.get("RANK", "0"))

    def report(message: str, code: int) -> None:  # for the launcher, which prints one line
        write_rank_report(Path(launch["errors"]), message, code)

    with rank_errors(report):
        try:
            result = train_rank(launch)
        except Exception as e:
            if not isinstance(e, MoeifyError):  # a bug: the launcher shows its traceback
                report(traceback.format_exc(), 1)
            raise
    if rank == 0:
        Path(launch["result"]).write_text(json.dumps(result))
    comm.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
