"""Each rank's slice of the global batches: rank r of N takes rows [r * B/N, (r + 1) * B/N) of every batch."""
from __future__ import annotations

import dataclasses

import torch

from moeify.errors import MoeifyError, opt
from moeify.training.batches import DataPosition, TrainBatches
from moeify.training.data import TrainingData


def check_divisible(batch_size: int, nproc: int) -> None:
    """The global batch must split evenly: equal slices make the mean of the ranks' losses the global mean."""
    if batch_size % nproc:
        lower, upper = batch_size - batch_size % nproc, batch_size + nproc - batch_size % nproc
        raise MoeifyError(f"{opt('batch_size', batch_size)} does not split over --nproc {nproc}: "
                          f"use a multiple of {nproc}, e.g. {lower or upper} or {upper}")


def rank_slice(batch: dict[str, torch.Tensor], rank: int, nproc: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s contiguous rows of a global batch (every tensor's first dimension)."""
    rows = next(iter(batch.values())).shape[0]
    check_divisible(rows, nproc)
    size = rows // nproc
    return {k: v[rank * size:(rank + 1) * size] for k, v in batch.items()}


class SlicedBatches:
    """A TrainBatches stream seen by one rank: the same global batches (every rank draws them all, from
    the same seed), each cut to the rank's slice; `position` is the global stream's."""

    def __init__(self, batches: TrainBatches, rank: int, nproc: int) -> None:
        check_divisible(batches.batch_size, nproc)
        self.batches, self.rank, self.nproc = batches, rank, nproc

    @property
    def position(self) -> DataPosition:
        return self.batches.position

    def __iter__(self) -> SlicedBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return rank_slice(next(self.batches), self.rank, self.nproc)


def slice_data(data: TrainingData, rank: int, nproc: int) -> TrainingData:
    """`data` with rank `rank`'s slice of every training and validation batch."""
    return dataclasses.replace(data, train=SlicedBatches(data.train, rank, nproc),
                              validation=[rank_slice(b, rank, nproc) for b in data.validation])
