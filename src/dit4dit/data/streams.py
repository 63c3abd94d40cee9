"""Training batch streams: endless per-rank micro-batches with a saveable position.

Exact resume with any number of workers rests on two things the caller supplies:

- a resumable batch sampler (``batches_per_epoch``, ``set_position(epoch, batch)``, iterating
  lists of ``(epoch, index)`` keys), e.g. the per-rank ``ShardedBatchSampler`` of the training
  loop;
- ``sample_seed(epoch, index) -> int``: the seed of the RNG states each sample is produced under
  (:class:`KeyedSamples`), so any randomness of a sample (augmentation) is the same whichever
  worker produces it. It must pickle (a module-level function or a ``functools.partial`` of one)
  for worker processes.

:class:`BatchStream` is one stream; :class:`MixedBatchStream` pairs a labelled stream with an
action-free video one for co-training (:func:`concat_batches`).
"""

from __future__ import annotations

import random
from operator import attrgetter
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .loader import fork_safe_iter

SampleSeed = Callable[[int, int], int]


class ResumableBatchSampler(Protocol):
    """What :class:`BatchStream` needs of its batch sampler."""

    batches_per_epoch: int

    def set_position(self, epoch: int, batch: int) -> None: ...

    def __iter__(self) -> Iterator[list[tuple[int, int]]]: ...


class KeyedSamples(Dataset):
    """``dataset[(epoch, i)] -> (i, samples[i])``, produced under RNG states seeded by
    ``sample_seed(epoch, i)`` so any randomness of the samples (augmentation) is reproducible
    whatever the worker that produced it. In the main process the caller's RNG states are restored."""

    def __init__(self, samples: Dataset, sample_seed: SampleSeed):
        self.samples = samples
        self.sample_seed = sample_seed

    def __len__(self) -> int:
        return len(self.samples)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, Any]:
        epoch, i = key
        s = self.sample_seed(epoch, i)
        in_worker = torch.utils.data.get_worker_info() is not None
        if in_worker:
            self._seed_all(s)
            return i, self.samples[i]
        torch_state = torch.get_rng_state()
        np_state = np.random.get_state()
        py_state = random.getstate()
        try:
            self._seed_all(s)
            return i, self.samples[i]
        finally:
            torch.set_rng_state(torch_state)
            np.random.set_state(np_state)
            random.setstate(py_state)

    @staticmethod
    def _seed_all(s: int) -> None:
        torch.default_generator.manual_seed(s)  # CPU only: never touches the CUDA generators
        np.random.seed(s % (2**32))
        random.seed(s)


class KeyedCollate:
    """Collate ``(index, sample)`` pairs with ``inner`` and add ``sample_index`` (int64)."""

    def __init__(self, inner: Callable[[list], dict]):
        self.inner = inner

    def __call__(self, items: list[tuple[int, Any]]) -> dict[str, Any]:
        batch = self.inner([s for _, s in items])
        batch["sample_index"] = torch.tensor([i for i, _ in items], dtype=torch.long)
        return batch


def _worker_init(worker_id: int) -> None:  # noqa: ARG001
    torch.set_num_threads(1)  # workers decode; one intra-op thread each avoids oversubscription


class BatchStream:
    """Endless micro-batches across epochs with a saveable position ``(epoch, batch)``.

    ``sampler`` yields the keys of each micro-batch (see the module docstring); ``seed`` seeds
    the loader's own generator (the workers' base seed); ``sample_seed`` the RNG states of each
    sample."""

    def __init__(self, samples: Dataset, collate: Callable, sampler: ResumableBatchSampler, *, seed: int,
                 sample_seed: SampleSeed, num_workers: int, pin_memory: bool = False):
        self.sampler = sampler
        kwargs: dict[str, Any] = {}
        if num_workers > 0:
            kwargs.update(persistent_workers=True, prefetch_factor=2, worker_init_fn=_worker_init)
        self.loader = DataLoader(KeyedSamples(samples, sample_seed), batch_sampler=sampler,  # type: ignore[arg-type]
                                 num_workers=num_workers, collate_fn=KeyedCollate(collate), pin_memory=pin_memory,
                                 generator=torch.Generator().manual_seed(int(seed)), **kwargs)
        self.epoch = 0
        self.batch = 0  # micro-batches of the current epoch already delivered
        self._it = None

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    @property
    def num_samples(self) -> int:
        return len(self.loader.dataset)  # type: ignore[arg-type]

    def set_position(self, epoch: int, batch: int) -> None:
        if batch >= self.batches_per_epoch:
            epoch, batch = epoch + 1, 0
        self.epoch, self.batch = int(epoch), int(batch)
        self._it = None

    def next(self) -> dict[str, Any]:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
            self._it = None
        if self._it is None:
            self.sampler.set_position(self.epoch, self.batch)
            self._it = fork_safe_iter(self.loader)
        batch = next(self._it)
        self.batch += 1
        if self.batch >= self.batches_per_epoch:
            # Drain the iterator so a persistent-worker loader is ready for the next epoch.
            for _ in self._it:
                pass
            self._it = None
        return batch

    def close(self) -> None:
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None
        self._it = None


def concat_batches(labelled: dict[str, Any], free: dict[str, Any]) -> dict[str, Any]:
    """One batch of ``labelled`` rows followed by ``free`` (action-free video) rows, with
    ``has_actions`` telling them apart."""
    out: dict[str, Any] = {}
    for k, v in labelled.items():
        w = free[k]
        out[k] = torch.cat([v, w]) if isinstance(v, torch.Tensor) else list(v) + list(w)
    n, m = len(labelled["instruction"]), len(free["instruction"])
    out["has_actions"] = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(m, dtype=torch.bool)])
    return out


class MixedBatchStream:
    """Co-training batches: a labelled stream's micro-batch followed by an action-free one's
    (``train.video_data_fraction`` of the rows). Epochs, the saved position and the resume check
    follow the labelled stream; the action-free stream's position is saved beside it."""

    def __init__(self, labelled: BatchStream, free: BatchStream):
        self.labelled = labelled
        self.free = free

    # read-only views of the labelled stream: its DataLoader, position (epoch, batch) and epoch size
    loader = property(attrgetter("labelled.loader"))
    epoch = property(attrgetter("labelled.epoch"))
    batch = property(attrgetter("labelled.batch"))
    batches_per_epoch = property(attrgetter("labelled.batches_per_epoch"))
    num_samples = property(attrgetter("labelled.num_samples"))

    def set_position(self, epoch: int, batch: int) -> None:
        self.labelled.set_position(epoch, batch)

    def next(self) -> dict[str, Any]:
        return concat_batches(self.labelled.next(), self.free.next())

    def close(self) -> None:
        self.labelled.close()
        self.free.close()
