"""Data-parallel batch samplers with exact resume (Megatron's pretraining samplers).

Both yield, per step, this rank's micro-batch of ``micro_batch_size`` sample indices; a step consumes
``micro_batch_size * data_parallel_size`` samples globally. Resuming from ``consumed_samples`` (kept in
the checkpoint via ``state_dict``) yields exactly the batches an uninterrupted run would have yielded.

- ``PretrainingSampler``: samples in order 0, 1, 2, ... (the dataset is already shuffled by its
  shuffle index); rank r takes slice ``[r*mbs, (r+1)*mbs)`` of each global batch. Never repeats a sample.
``state_dict()`` counts the samples *handed out*; a DataLoader fetches batches ahead, so a trainer should
checkpoint its own count (steps done x global batch size) and build a new sampler from it on resume.

- ``RandomPretrainingSampler``: for cyclic datasets; every epoch is a fresh seeded permutation of each
  rank's own bucket, so no sample repeats within an epoch.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from megacpt.errors import UserError


def _check(total_samples: int, consumed_samples: int, micro_batch_size: int, rank: int, world: int) -> None:
    if total_samples <= 0:
        raise UserError(f"sampler: total_samples must be > 0, got {total_samples}")
    if micro_batch_size <= 0:
        raise UserError(f"sampler: micro_batch_size must be > 0, got {micro_batch_size}")
    if world <= 0 or not 0 <= rank < world:
        raise UserError(f"sampler: data_parallel_rank {rank} not in [0, {world})")
    if consumed_samples < 0:
        raise UserError(f"sampler: consumed_samples must be >= 0, got {consumed_samples}")


class PretrainingSampler:
    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, drop_last: bool = True):
        _check(total_samples, consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
        if consumed_samples >= total_samples:
            raise UserError(f"sampler: consumed_samples {consumed_samples} >= total_samples {total_samples}: "
                            "the run already saw every sample")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.rank, self.world = data_parallel_rank, data_parallel_size
        self.global_batch = micro_batch_size * data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        left = self.total_samples - self.consumed_samples
        return left // self.global_batch if self.drop_last else -(-left // self.global_batch)

    def __iter__(self) -> Iterator[list[int]]:
        start = self.consumed_samples
        while start + self.global_batch <= self.total_samples or (not self.drop_last and start < self.total_samples):
            end = min(start + self.global_batch, self.total_samples)
            # a last partial global batch is split evenly; ranks with nothing left stop
            per_rank = -(-(end - start) // self.world)
            lo = start + self.rank * per_rank
            batch = list(range(lo, min(lo + per_rank, end)))
            self.consumed_samples = end
            if batch:
                yield batch
            start = end

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed_samples = int(state["consumed_samples"])


class RandomPretrainingSampler:
    """Cycles over ``total_samples`` (the dataset length) forever, one seeded permutation per epoch."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, seed: int = 0):
        _check(total_samples, consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
        self.micro_batch_size = micro_batch_size
        self.rank, self.world = data_parallel_rank, data_parallel_size
        self.global_batch = micro_batch_size * data_parallel_size
        # samples beyond a whole number of global batches are never used (like Megatron)
        self.usable = (total_samples // self.global_batch) * self.global_batch
        if self.usable == 0:
            raise UserError(f"sampler: {total_samples} samples < one global batch ({self.global_batch})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.seed = seed

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.usable

    def __iter__(self) -> Iterator[list[int]]:
        bucket = self.usable // self.world  # this rank's share of every epoch
        while True:
            epoch, in_epoch = divmod(self.consumed_samples, self.usable)
            perm = np.random.default_rng([self.seed, epoch]).permutation(bucket)
            own = self.rank * bucket + perm  # rank r owns [r*bucket, (r+1)*bucket)
            for k in range(in_epoch // self.world, bucket, self.micro_batch_size):
                self.consumed_samples += self.global_batch
                yield own[k : k + self.micro_batch_size].tolist()

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed_samples = int(state["consumed_samples"])
        self.seed = int(state.get("seed", self.seed))
