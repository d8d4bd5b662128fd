"""A distributed run's checkpoint gathered into one moeify directory, streamed one weight file at a time.

Each rank of the first data-parallel replica writes its experts' rows to a scratch file, and every
rank its optimizer and RNG state; rank 0 then writes, inside `atomic_directory`, exactly the files
moeify.save writes for the whole model (the same tensor names, shapes and weight-file split, and the
moeify.json of the starting model), one weight file at a time: each expert stack is filled from the
ranks' scratch files (memory-mapped), the dense weights come from rank 0's own part. The ranks'
optimizer states go in as trainer-rank-R-of-N.safetensors (keyed by parameter index, the plain part
in its metadata), trainer.json last.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from moeify.checkpoint.files import atomic_directory, copy_tokenizer
from moeify.checkpoint.metadata import MOEIFY_FILE
from moeify.checkpoint.skeleton import skeleton
from moeify.checkpoint.sources import tied_aliases
from moeify.checkpoint.store import write_weights
from moeify.errors import MoeifyError
from moeify.targets.distributed import comm
from moeify.targets.distributed.failures import communication
from moeify.targets.distributed.layer import expert_rows
from moeify.training.checkpoints import RNG_KEY, TRAINER_JSON, TRAINER_SCHEMA, TRAINER_VERSION, join_state, split_state
from moeify.training.loop import Trainer

EXPERTS_FILE = "experts-rank-{rank:05d}.safetensors"
DISTRIBUTED = "distributed"  # trainer.json's key: {"nproc": N, "expert_parallel": EP}


def trainer_file(rank: int, world: int) -> str:
    return f"trainer-rank-{rank:05d}-of-{world:05d}.safetensors"


class Gather:
    """fit's `save` on every rank: `model_dir` is the starting model as moeify.save wrote it (moeify.json,
    tokenizer), `scratch` a directory every rank can reach (one machine: the launcher's)."""

    def __init__(self, model_dir: Path, scratch: Path, expert_parallel: int, device: torch.device) -> None:
        self.model_dir, self.scratch, self.expert_parallel = Path(model_dir), Path(scratch), expert_parallel
        self.device = device  # of the collectives (NCCL's are on the GPU)
        self.rank, self.world = comm.get_rank(), comm.get_world_size()
        self._layout: dict[str, torch.Tensor] | None = None

    def __call__(self, path: Path, trainer: Trainer, record: dict) -> Path:
        stage = self.scratch / path.name
        with communication(f"rank {self.rank}: saving {path}"):
            self._agree(lambda: self._write_rank(stage, trainer), f"writing its part of {path}")
            if self.rank == 0:
                self._agree(lambda: self._assemble(path, stage, trainer, record), f"writing {path}")
            else:
                self._agree(lambda: None, f"writing {path}")
        return path

    def _agree(self, work, what: str) -> None:
        """Run `work`, then wait for every rank; if any failed, all stop (that rank's own error is the real one)."""
        error = None
        try:
            work()
        except (MoeifyError, OSError) as e:
            error = e
        failed = torch.tensor([self.rank if error else -1], dtype=torch.float64, device=self.device)
        comm.all_reduce(failed, op="max")
        if isinstance(error, OSError):
            raise MoeifyError(f"cannot save the checkpoint ({error.strerror or error}): free some space or choose "
                              "another -o") from None
        if error is not None:
            raise error
        if failed[0] >= 0:
            raise MoeifyError(f"rank {int(failed[0])} failed {what} (see its error), so every rank stops")

    def _write_rank(self, stage: Path, trainer: Trainer) -> None:
        from safetensors.torch import save_file

        stage.mkdir(parents=True, exist_ok=True)
        tensors, plain = split_state(trainer.optimizer.state_dict())
        tensors[RNG_KEY] = torch.get_rng_state()
        save_file({k: v.cpu() for k, v in tensors.items()}, str(stage / trainer_file(self.rank, self.world)),
                  metadata={"optimizer": json.dumps(plain)})
        if self.rank < self.expert_parallel:  # the first replica: ranks 0..EP-1 hold every expert once
            state = trainer.model.state_dict()
            rows = expert_rows(trainer.model)
            save_file({name: state[name].detach().cpu().contiguous() for name in rows},
                      str(stage / EXPERTS_FILE.format(rank=self.rank)), metadata={"rows": json.dumps(rows)})

    def layout(self) -> dict[str, torch.Tensor]:
        """The whole model's tensors as moeify.save stores them (tied ones once), on meta."""
        if self._layout is None:
            structure = skeleton(self.model_dir)
            aliases = tied_aliases(structure)
            self._layout = {k: v for k, v in structure.state_dict().items() if k not in aliases}
        return self._layout

    def _assemble(self, path: Path, stage: Path, trainer: Trainer, record: dict) -> None:
        from safetensors import safe_open

        like = self.layout()
        own = trainer.model.state_dict()
        handles = [safe_open(str(stage / EXPERTS_FILE.format(rank=r)), "pt") for r in range(self.expert_parallel)]
        rows = [json.loads(h.metadata()["rows"]) for h in handles]

        def values(name: str) -> torch.Tensor:
            """An expert stack filled from the ranks' rows, or a dense weight from rank 0's own part."""
            if name not in rows[0]:
                return own[name].detach().cpu().contiguous()
            full = torch.empty(like[name].shape, dtype=like[name].dtype)
            for h, ids in zip(handles, rows):
                full[torch.tensor(ids[name], dtype=torch.long)] = h.get_tensor(name)
            return full

        with atomic_directory(path, force=True) as tmp:
            write_weights(tmp, like, values)  # one weight file at a time
            shutil.copyfile(self.model_dir / MOEIFY_FILE, tmp / MOEIFY_FILE)
            copy_tokenizer(self.model_dir, tmp)
            for r in range(self.world):
                shutil.move(stage / trainer_file(r, self.world), tmp / trainer_file(r, self.world))
            distributed = {"nproc": self.world, "expert_parallel": self.expert_parallel}
            # trainer.json last: a directory that has it is complete
            (tmp / TRAINER_JSON).write_text(json.dumps(
                {"schema": TRAINER_SCHEMA, "version": TRAINER_VERSION, **record, "optimizer": None,
                 DISTRIBUTED: distributed}, indent=2))
        shutil.rmtree(stage, ignore_errors=True)


def restore_rank(path: Path, optimizer: torch.optim.Optimizer, rank: int, world: int) -> None:
    """This rank's optimizer and torch RNG state from a gathered checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = path / trainer_file(rank, world)
    if not file.is_file():
        raise MoeifyError(f"{path} has no {file.name}: it was not saved by a run of {world} ranks")
    with safe_open(str(file), "pt") as f:
        plain = json.loads(f.metadata()["optimizer"])
    tensors = load_file(str(file))
    torch.set_rng_state(tensors.pop(RNG_KEY))
    device = next(iter(optimizer.param_groups[0]["params"])).device
    optimizer.load_state_dict(join_state({k: v.to(device) for k, v in tensors.items()}, plain))
