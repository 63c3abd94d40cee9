"""Scale-out: process groups from the environment, per-rank data shards, DDP / FSDP2 wrapping.

Launch with ``torchrun`` (it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``); a plain ``python`` process is a world of one. The backend is NCCL on CUDA and
gloo on CPU.

Strategies (``train.distributed``):

- ``ddp``: every rank holds the whole model; gradients are averaged in buckets during backward;
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) applied to every video-DiT block,
  every action-DiT block, then to the roots of the trainable parts (video DiT, action DiT, a
  trainable text encoder). Parameters, gradients and optimiser states are sharded; the frozen
  codec and a frozen text encoder stay replicated and outside the optimiser;
- ``auto``: FSDP2 when the trainable weights exceed ``FSDP_AUTO_PARAMS`` (the 2B model), DDP
  otherwise; a world of one is never wrapped.

Data: :class:`ShardedBatchSampler` gives rank ``r`` the positions ``r, r + W, r + 2W, ...`` of the
epoch's permutation, so the union of the ranks' j-th batches is exactly batch j of a single
process whose batch is ``W`` times larger. Only rank 0 logs and writes checkpoints; gathering
full state dicts is collective (every rank calls it).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

FSDP_AUTO_PARAMS = 1_000_000_000


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False  # this process initialised the group (and destroys it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | torch.device | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join (or create) the default process group described by torchrun's environment.

    ``device``: ``None`` = CUDA (this rank's ``LOCAL_RANK`` GPU) when available, else CPU;
    ``"cpu"`` forces CPU (gloo); ``"cuda"`` picks the local GPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = torch.device(device) if device is not None else None
    use_cuda = torch.cuda.is_available() if want is None else want.type == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    if use_cuda:
        index = want.index if (want is not None and want.index is not None and world == 1) else local_rank
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.get_backend(), False)
    if world <= 1:
        return DistInfo(0, 1, 0, dev, None, False)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {missing} are not set: launch with torchrun")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
    if dev.type == "cuda":
        kwargs["device_id"] = dev
    dist.init_process_group(**kwargs)
    # The group lives until the process exits: re-creating it in the same process (a second
    # `train` call) can deadlock FSDP2/DTensor collectives that cached the first group.
    atexit.register(_destroy_group)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend, True)


def _destroy_group() -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def shutdown(info: DistInfo) -> None:
    """End of a training call: wait for every rank (the group itself is destroyed at exit)."""
    if info.distributed and dist.is_initialized():
        barrier(info)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        if info.backend == "nccl":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


# --------------------------------------------------------------------------------------------
# Data sharding
# --------------------------------------------------------------------------------------------


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The epoch's sample order: the same function as the data layer's ``EpochSampler.order``
    (a permutation seeded by ``(seed, epoch)``), so a world of one sees the batches
    ``dit4dit.data.loader.batch_order`` describes."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


class ShardedBatchSampler:
    """Deterministic, resumable, per-rank batches of ``(epoch, index)`` keys.

    Each epoch keeps the first ``batches_per_epoch * batch_size * world_size`` positions of the
    permutation (drop-last: every rank gets the same number of full batches); rank ``r`` takes
    positions ``r::world_size`` and cuts them into batches. ``set_position(epoch, batch)`` makes
    the next iteration start at that batch of that epoch.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        self.n = int(num_samples)
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.batches_per_epoch = self.n // (self.batch_size * self.world_size)
        if self.batches_per_epoch < 1:
            raise ValueError(f"the dataset has {self.n} samples: too few for one global batch of "
                             f"{self.batch_size} x {self.world_size} rank(s) = {self.batch_size * self.world_size}")
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, batch: int) -> None:
        if not 0 <= batch <= self.batches_per_epoch:
            raise ValueError(f"batch {batch} outside an epoch of {self.batches_per_epoch} batches")
        self.epoch, self.start = int(epoch), int(batch)

    def rank_indices(self, epoch: int) -> np.ndarray:
        perm = epoch_permutation(self.n, self.seed, epoch, self.shuffle)
        used = perm[: self.batches_per_epoch * self.batch_size * self.world_size]
        return used[self.rank:: self.world_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        mine = self.rank_indices(self.epoch)
        b = self.batch_size
        for j in range(self.start, self.batches_per_epoch):
            yield [(self.epoch, int(i)) for i in mine[j * b:(j + 1) * b]]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start


# --------------------------------------------------------------------------------------------
# Model wrapping
# --------------------------------------------------------------------------------------------


def choose_strategy(requested: str, world_size: int, trainable_params: int) -> str:
    """``single`` | ``ddp`` | ``fsdp`` for this run."""
    if requested not in ("auto", "ddp", "fsdp"):
        raise ValueError(f"train.distributed={requested!r} must be auto | ddp | fsdp")
    if world_size <= 1:
        return "single"
    if requested == "auto":
        return "fsdp" if trainable_params > FSDP_AUTO_PARAMS else "ddp"
    return requested


class Wrapped:
    """What the trainer calls: ``module(batch, generator)`` runs the loss with the strategy's hooks."""

    def __init__(self, module: nn.Module, strategy: str, fsdp_roots: Sequence[nn.Module] = ()):
        self.module = module
        self.strategy = strategy
        self.fsdp_roots = list(fsdp_roots)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def sync(self, enabled: bool) -> Iterator[None]:
        """Gradient synchronisation on (the last micro-batch of a step) or off (accumulation)."""
        if enabled or self.strategy == "single":
            yield
        elif self.strategy == "ddp":
            with self.module.no_sync():
                yield
        else:
            for m in self.fsdp_roots:
                m.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                for m in self.fsdp_roots:
                    m.set_requires_gradient_sync(True)


def wrap(loss_module: nn.Module, model: nn.Module, strategy: str, info: DistInfo, *,
         find_unused_parameters: bool = False, bf16: bool = False) -> Wrapped:
    """Wrap ``loss_module`` (whose ``forward`` runs ``model``'s loss) for ``strategy``."""
    if strategy == "single":
        return Wrapped(loss_module, "single")
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        import inspect

        ids = [info.device.index] if info.device.type == "cuda" else None
        kwargs: dict[str, Any] = {"device_ids": ids, "find_unused_parameters": find_unused_parameters}
        # Buffers are constants here (identical on every rank): no per-forward buffer broadcast.
        if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
            kwargs["forward_sync_buffers"] = False
        else:
            kwargs["broadcast_buffers"] = False
        ddp = DDP(loss_module, **kwargs)
        return Wrapped(ddp, "ddp")
    if strategy == "fsdp":
        roots = apply_fsdp(model, info, bf16=bf16)
        return Wrapped(loss_module, "fsdp", roots)
    raise ValueError(f"unknown strategy {strategy!r}")


def apply_fsdp(model: nn.Module, info: DistInfo, bf16: bool = False) -> list[nn.Module]:
    """FSDP2: shard every video-DiT and action-DiT block, then each trainable part's root.

    The video DiT is entered through ``features`` / ``features_and_velocity`` as well as
    ``forward``; those methods are registered so its root parameters are gathered for them.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    # The parts return views (slices of hidden states); nothing in the loss modifies them in
    # place, so FSDP2's warning about in-place ops on views does not apply.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    kwargs: dict[str, Any] = {"mesh": mesh}
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    parts = model.trainable_modules()
    video = parts.get("video_dit")  # absent in the static-image baseline (its image encoder instead)
    encoder_blocks = video.transformer.transformer_blocks if video is not None else parts["image_encoder"].blocks
    for block in encoder_blocks:
        fully_shard(block, **kwargs)
    for block in parts["action_dit"].blocks:
        fully_shard(block, **kwargs)
    roots = []
    for name, part in parts.items():
        fully_shard(part, **kwargs)
        roots.append(part)
    for method in ("features", "features_and_velocity"):
        if video is not None and hasattr(video, method):
            register_fsdp_forward_method(video, method)
    return roots


# --------------------------------------------------------------------------------------------
# Tensors across ranks
# --------------------------------------------------------------------------------------------


def is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def to_full_cpu(t: torch.Tensor) -> torch.Tensor:
    """A full, detached CPU copy (gathers DTensor shards: collective under FSDP2)."""
    if is_dtensor(t):
        t = t.full_tensor()
    return t.detach().to("cpu", copy=True) if t.device.type != "cpu" else t.detach().clone()


def place_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Lay a full tensor out like ``like`` (the local shard of a DTensor, or plain on its device)."""
    if is_dtensor(like):
        from torch.distributed.tensor import distribute_tensor

        mesh = like.device_mesh
        return distribute_tensor(full.to(device=mesh.device_type, dtype=like.dtype), mesh, like.placements)
    return full.to(device=like.device, dtype=like.dtype)


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean over ranks of a small float tensor (identity in a world of one)."""
    if not info.distributed:
        return values
    t = values.to(info.device, torch.float64 if info.backend == "gloo" else torch.float32)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / info.world_size).to("cpu", torch.float64)


def all_reduce_max(value: float, info: DistInfo) -> float:
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float32, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def gather_tensors(tensors: dict[str, torch.Tensor], info: DistInfo) -> dict[str, torch.Tensor]:
    """Every rank's ``tensors`` (same names and shapes on all ranks) as ``rank{r}/{name}``, on CPU.

    Collective: every rank must call it; every rank gets the result (they are small: RNG states).
    """
    if not info.distributed:
        return {f"rank0/{k}": v.detach().cpu() for k, v in tensors.items()}
    out: dict[str, torch.Tensor] = {}
    for name in sorted(tensors):
        t = tensors[name].detach()
        dtype = t.dtype
        # Byte-level transport keeps every dtype exact and works with gloo and NCCL alike.
        raw = t.contiguous().cpu().view(-1).view(torch.uint8) if t.numel() else t.cpu().to(torch.uint8)
        raw = raw.to(info.device)
        bufs = [torch.empty_like(raw) for _ in range(info.world_size)]
        dist.all_gather(bufs, raw)
        for r, b in enumerate(bufs):
            out[f"rank{r}/{name}"] = b.cpu().view(dtype).view(t.shape).clone()
    return out


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """True on every rank when any rank's ``flag`` is True."""
    if not info.distributed:
        return flag
    return all_reduce_max(1.0 if flag else 0.0, info) > 0.5


def seed_for(seed: int, *parts: int) -> int:
    """A 63-bit seed mixed from ``seed`` and ``parts`` (stable across runs and platforms)."""
    seq = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *[int(p) & 0xFFFFFFFF for p in parts]])
    return int(seq.generate_state(1, np.uint64)[0]) & ((1 << 63) - 1)


def map_structure(fn: Callable[[torch.Tensor], torch.Tensor], obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_structure(fn, v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_structure(fn, v) for v in obj)
    return obj
