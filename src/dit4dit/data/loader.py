"""Multi-worker, deterministic, resumable batches.

`make_loader` wraps a torch ``DataLoader`` with

- persistent workers (each keeps its lazily opened dataset reader and video decoders for the
  whole run: :class:`~dit4dit.data.samples.TrainingSamples` drops its reader when pickled);
- a shuffle order that is a pure function of ``(seed, epoch)``;
- an exact resume position ``(epoch, batch_index)``: ``state_dict()`` after batch k of an
  epoch and ``load_state_dict`` on a fresh loader yields batch k + 1 of the same epoch next,
  with the same contents as an uninterrupted run.

Iterating a :class:`ResumableLoader` runs the rest of the current epoch and advances the
epoch; :meth:`ResumableLoader.batches` is an endless stream across epochs.
"""

from __future__ import annotations

import gc
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .samples import collate as default_collate


class EpochSampler(Sampler[int]):
    """Indices of one epoch: a permutation seeded by (seed, epoch), minus the skipped batches."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool) -> None:
        self.n = int(n)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.skip_batches = 0

    def order(self, epoch: int) -> np.ndarray:
        if self.shuffle:
            rng = np.random.default_rng([self.seed, int(epoch)])
            perm = rng.permutation(self.n)
        else:
            perm = np.arange(self.n)
        if self.drop_last:
            perm = perm[: (self.n // self.batch_size) * self.batch_size]
        return perm

    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        return (self.n + self.batch_size - 1) // self.batch_size

    def set_position(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = int(epoch)
        self.skip_batches = int(skip_batches)

    def __iter__(self) -> Iterator[int]:
        perm = self.order(self.epoch)
        return iter(perm[self.skip_batches * self.batch_size:].tolist())

    def __len__(self) -> int:
        total = len(self.order(self.epoch))
        return max(0, total - self.skip_batches * self.batch_size)


def _worker_init(worker_id: int) -> None:
    # Decoding is the work; one intra-op thread per worker keeps workers from oversubscribing.
    torch.set_num_threads(1)
    info = torch.utils.data.get_worker_info()
    if info is not None:
        seed = info.seed % (2**32)
        np.random.seed(seed)


def fork_safe_iter(loader: DataLoader) -> Iterator[Any]:
    """``iter(loader)`` with the garbage collector kept away from what forked workers inherit.

    Worker processes are forked from this one and inherit its objects, among them open PyAV
    decoders whose FFmpeg threads exist only here. If a worker's garbage collector freed one of
    them (e.g. a closed dataset's reader still in a reference cycle), FFmpeg would wait forever
    for those threads. So: collect garbage here first (where the threads exist), freeze every
    surviving object out of the collector's reach while the workers fork, then unfreeze here.
    """
    if loader.num_workers == 0:
        return iter(loader)
    gc.collect()
    gc.freeze()
    try:
        return iter(loader)  # forks the workers (once, with persistent workers)
    finally:
        gc.unfreeze()


class ResumableLoader:
    """Iterates batches from a position ``(epoch, batch_index)``; see the module docstring."""

    def __init__(self, samples: Dataset, batch_size: int, num_workers: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True, collate_fn: Callable[[list], Any] | None = None,
                 prefetch_factor: int | None = 2, pin_memory: bool = False,
                 multiprocessing_context: str | None = None) -> None:
        n = len(samples)  # type: ignore[arg-type]
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if drop_last and n < batch_size:
            raise ValueError(f"{n} samples cannot fill one batch of {batch_size} with drop_last=True")
        self.samples = samples
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.sampler = EpochSampler(n, batch_size, shuffle, seed, drop_last)
        self.epoch = 0
        self.batch_index = 0  # batches of the current epoch already delivered
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs.update(persistent_workers=True, prefetch_factor=prefetch_factor, worker_init_fn=_worker_init)
            if multiprocessing_context is not None:
                kwargs["multiprocessing_context"] = multiprocessing_context
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        self.loader = DataLoader(samples, batch_size=self.batch_size, sampler=self.sampler,
                                 num_workers=self.num_workers, collate_fn=collate_fn or default_collate,
                                 drop_last=drop_last, pin_memory=pin_memory, generator=generator, **kwargs)

    def __len__(self) -> int:
        """Batches per (full) epoch."""
        return self.sampler.batches_per_epoch()

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed,
                "batch_size": self.batch_size, "num_samples": self.sampler.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for k in ("seed", "batch_size", "num_samples"):
            mine = self.state_dict()[k]
            if k in state and state[k] != mine:
                raise ValueError(f"cannot resume: the saved loader had {k}={state[k]}, this one has {mine}")
        self.set_position(state["epoch"], state["batch_index"])

    def set_position(self, epoch: int, batch_index: int = 0) -> None:
        if not 0 <= batch_index <= self.batches_per_epoch:
            raise ValueError(f"batch_index {batch_index} outside an epoch of {self.batches_per_epoch} batches")
        self.epoch, self.batch_index = int(epoch), int(batch_index)

    def __iter__(self) -> Iterator[Any]:
        """The rest of the current epoch; afterwards the position is (epoch + 1, 0)."""
        if self.batch_index >= self.batches_per_epoch:
            self.epoch, self.batch_index = self.epoch + 1, 0
        self.sampler.set_position(self.epoch, self.batch_index)
        for batch in fork_safe_iter(self.loader):
            self.batch_index += 1
            yield batch
        self.epoch, self.batch_index = self.epoch + 1, 0

    def batches(self, limit: int | None = None) -> Iterator[Any]:
        """Endless stream of batches across epochs (or ``limit`` batches)."""
        k = 0
        while True:
            for batch in self:
                yield batch
                k += 1
                if limit is not None and k >= limit:
                    return

    def close(self) -> None:
        """Stop the persistent workers."""
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None


def make_loader(samples: Dataset, batch_size: int, num_workers: int = 0, shuffle: bool = True, seed: int = 0,
                drop_last: bool = True, start_epoch: int = 0, start_batch: int = 0, **kwargs: Any) -> ResumableLoader:
    """A :class:`ResumableLoader` positioned at ``(start_epoch, start_batch)``."""
    loader = ResumableLoader(samples, batch_size, num_workers=num_workers, shuffle=shuffle, seed=seed,
                             drop_last=drop_last, **kwargs)
    loader.set_position(start_epoch, start_batch)
    return loader


def batch_order(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                drop_last: bool = True) -> list[list[int]]:
    """The sample indices of every batch of an epoch (what the loader will deliver)."""
    s = EpochSampler(n, batch_size, shuffle, seed, drop_last)
    perm = s.order(epoch).tolist()
    return [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)]


__all__: Sequence[str] = ["EpochSampler", "ResumableLoader", "make_loader", "batch_order"]
