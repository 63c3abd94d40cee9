"""Training samples: item i = (episode, frame t) of a LeRobot dataset.

Frame plan for a sample at frame ``t`` of an episode of length ``L`` (stride ``s``,
``nc`` conditioning frames, ``nf`` future frames, action horizon ``H``):

- conditioning frames ``t - (nc - 1) s, ..., t - s, t`` (clamped to the episode start, 0);
- future frames ``t + s, t + 2 s, ..., t + nf s``; those past the episode end repeat the
  episode's last frame and have ``future_mask`` False;
- state at ``t``; actions ``t, ..., t + H - 1``, steps past the episode end zero-padded and
  masked. Nothing ever crosses into another episode.

Everything numeric and visual goes through the shared :class:`~dit4dit.data.processor.Processor`.
The state/action vectors of the selected episodes are read and normalised once (small; the
normaliser works row by row, so the values are those ``Processor.state``/``actions`` give per
item) and kept in memory; frames are decoded per item. The reader pickles without its decoders and its decoder pool is
fork-aware, so each DataLoader worker opens its own decoders lazily on first use and keeps them
for the life of the (persistent) worker.

With ``frame_cache`` (see :mod:`dit4dit.data.frame_cache`) the frames come instead from a
pre-extracted uint8 memmap at the training resolution (opened lazily in each worker); the sample
is identical, only the decode + resize is replaced by a memory copy.

Batches: :meth:`TrainingSamples.__getitems__` (what a DataLoader calls for a batch) writes the
videos of the whole batch straight into one batch buffer and :func:`collate` hands that buffer
on without stacking. Large batch tensors live in a few reusable buffers per process (a
:class:`_BatchRing`; shared memory in DataLoader workers) instead of fresh memory per batch: fresh
memory costs a page fault per 4 KiB (on some VMs ~10 us each, more than the sample itself), and a
ring slot is handed back automatically when the last tensor using it is freed, in whichever
process holds it.
"""

from __future__ import annotations

import bisect
import os
import threading
import weakref
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import InputConfig
from .frame_cache import FrameCache, FrameCacheError, build_frame_cache, open_frame_cache
from .normalize import NormalizationError
from .processor import Processor, ProcessorError
from .schema import EmbodimentSchema, get_schema


@dataclass(frozen=True)
class FramePlan:
    """Which dataset frames one sample reads (episode-relative indices)."""

    video: tuple[int, ...]  # nc conditioning + nf future frame indices (clamped into the episode)
    future_mask: tuple[bool, ...]  # nf entries
    action_steps: int  # number of real action steps (<= H); the rest are padding


class SampleIndex:
    """Maps a flat sample index to (episode, frame) and plans the frames of a sample."""

    def __init__(self, lengths: Sequence[int], inputs: InputConfig, action_horizon: int,
                 episode_ids: Sequence[int] | None = None) -> None:
        if inputs.num_cond_frames < 1 or inputs.num_future_frames < 0:
            raise ValueError("need at least one conditioning frame and a non-negative number of future frames")
        if inputs.frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {inputs.frame_stride}")
        if action_horizon < 1:
            raise ValueError(f"action_horizon must be >= 1, got {action_horizon}")
        self.lengths = [int(n) for n in lengths]
        if any(n < 1 for n in self.lengths):
            raise ValueError("every episode must hold at least one frame")
        self.episode_ids = list(episode_ids) if episode_ids is not None else list(range(len(self.lengths)))
        self.inputs = inputs
        self.action_horizon = int(action_horizon)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """Flat index -> (position in ``episode_ids``, frame index within that episode)."""
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample {i} out of range ({n} samples)")
        pos = bisect.bisect_right(self.offsets, i) - 1
        return pos, int(i - self.offsets[pos])

    def plan(self, length: int, t: int) -> FramePlan:
        nc, nf, s = self.inputs.num_cond_frames, self.inputs.num_future_frames, self.inputs.frame_stride
        if not 0 <= t < length:
            raise IndexError(f"frame {t} outside an episode of {length} frames")
        cond = [max(0, t - (nc - 1 - k) * s) for k in range(nc)]
        fut = [t + (k + 1) * s for k in range(nf)]
        mask = tuple(f < length for f in fut)
        fut = [min(f, length - 1) for f in fut]
        return FramePlan(tuple(cond + fut), mask, min(self.action_horizon, length - t))


def _task_rules(entries: Sequence[str], field: str, tasks: Iterable[str]) -> list[tuple[str, int]]:
    """Parse ``"TEXT=K"`` entries of ``field``; each TEXT must match (case-insensitively, as a
    substring) one of ``tasks``."""
    from ..config import parse_task_repeat

    rules = [parse_task_repeat(r, field) for r in entries]
    names = sorted(set(tasks))
    for text, _ in rules:
        if not any(text.lower() in t.lower() for t in names):
            raise ProcessorError(f"{field}: {text!r} matches none of the tasks {names}")
    return rules


def _rule_value(task: str, rules: Sequence[tuple[str, int]], default: int | None) -> int | None:
    """K of the first rule whose TEXT the task contains (case-insensitive), else ``default``."""
    return next((k for text, k in rules if text.lower() in task.lower()), default)


def episodes_per_task(dataset: Any, n: int | None, per_task: Sequence[str] = ()) -> list[int]:
    """Indices of the first ``n`` episodes (in episode-index order) of each task of ``dataset``
    (an episode counts for the first task it lists): the demonstrations ablation's training subsets.
    ``per_task`` entries ``"TEXT=N"`` (``train.task_episodes``) give the tasks whose instruction
    contains TEXT (case-insensitive, the first matching entry counts) N episodes instead; ``n``
    None keeps every episode of the other tasks. A task with fewer episodes keeps all of them; a
    TEXT that matches no task is an error. Sorted by episode index."""
    if n is not None and n < 1:
        raise ProcessorError(f"episodes per task must be >= 1, got {n}")
    ordered = sorted(dataset.episodes, key=lambda e: e.index)
    rules = _task_rules(per_task, "train.task_episodes", [(ep.tasks or ("",))[0] for ep in ordered])

    kept: dict[str, list[int]] = {}
    for ep in ordered:
        task = (ep.tasks or ("",))[0]
        chosen = kept.setdefault(task, [])
        cap = _rule_value(task, rules, n)
        if cap is None or len(chosen) < cap:
            chosen.append(ep.index)
    return sorted(i for chosen in kept.values() for i in chosen)


def repeat_tasks(dataset: Any, episodes: Sequence[int] | None, repeats: Sequence[str]) -> list[int] | None:
    """The episode list with the episodes of some tasks repeated (``train.task_repeats``: entries
    ``"TEXT=K"``; an episode's first task is matched, case-insensitively, against each TEXT in
    turn and the first match repeats it K times). ``episodes`` None means every episode; returns
    it unchanged when there is nothing to repeat. A TEXT that matches no task is an error."""
    if not repeats:
        return None if episodes is None else list(episodes)
    by_index = {e.index: e for e in dataset.episodes}
    wanted = list(episodes) if episodes is not None else sorted(by_index)
    rules = _task_rules(repeats, "train.task_repeats", [(by_index[i].tasks or ("",))[0] for i in wanted])
    out: list[int] = []
    for i in wanted:
        k = _rule_value((by_index[i].tasks or ("",))[0], rules, 1)
        out += [i] * k
    return out


def _default_opener(root: str | Path) -> Any:
    from .lerobot import LeRobotDataset

    return LeRobotDataset(root)


class TrainingSamples(Dataset):
    """A torch ``Dataset`` of training samples (see the module docstring for the frame plan).

    ``dataset``: a ``LeRobotDataset`` (or a path to one). ``schema``/``inputs`` default to the
    processor's; if given they must agree with it. ``episodes`` restricts the samples to some
    episode indices (e.g. a train/validation split).

    ``frame_cache``: a frame-cache directory (:func:`~dit4dit.data.frame_cache.build_frame_cache`)
    to read the frames from instead of decoding them, ``True`` to build (or reuse) the cache at
    its default location, or None (decode). A cache built from another dataset or with other
    image settings raises :class:`~dit4dit.data.frame_cache.FrameCacheError`.
    """

    def __init__(self, dataset: Any, schema: EmbodimentSchema | str | None = None,
                 inputs: InputConfig | None = None, action_horizon: int | None = None,
                 processor: Processor | None = None, episodes: Iterable[int] | None = None,
                 opener: Callable[[Any], Any] = _default_opener,
                 frame_cache: str | Path | bool | FrameCache | None = None) -> None:
        if processor is None:
            raise ProcessorError("TrainingSamples needs the shared Processor (see Processor.for_dataset)")
        if isinstance(dataset, (str, Path)):
            dataset = opener(dataset)
        self.processor = processor
        if schema is not None and get_schema(schema).name != processor.schema.name:
            raise ProcessorError(f"schema {get_schema(schema).name!r} differs from the processor's "
                                 f"{processor.schema.name!r}")
        if inputs is not None and inputs != processor.inputs:
            raise ProcessorError(f"inputs {inputs} differ from the processor's {processor.inputs}")
        self.inputs = processor.inputs
        if action_horizon is None:
            action_horizon = processor.action_horizon
        if action_horizon is None:
            raise ProcessorError("action_horizon is needed (argument or processor.action_horizon)")
        if processor.action_horizon is not None and processor.action_horizon != action_horizon:
            raise ProcessorError(f"action_horizon {action_horizon} differs from the processor's "
                                 f"{processor.action_horizon}")
        self.action_horizon = int(action_horizon)
        self.schema = processor.schema.check(dataset, processor.state_dim, processor.action_dim)
        self.camera_keys = [self.schema.cameras[[c.key for c in processor.schema.cameras].index(k)].key
                            for k in processor.camera_keys]
        self._ds = dataset  # see the module docstring for what happens in workers

        by_index = {e.index: e for e in dataset.episodes}
        wanted = list(episodes) if episodes is not None else [e.index for e in dataset.episodes]
        missing = [e for e in wanted if e not in by_index]
        if missing:
            raise ProcessorError(f"episodes {missing[:10]} are not in the dataset")
        self.episodes = [by_index[e] for e in wanted]
        self._state: list[np.ndarray] = []
        self._action: list[np.ndarray] = []
        self._tasks: list[str | None] = []
        self._load_vectors(dataset)
        self._normalize_vectors()
        self.index = SampleIndex([e.length for e in self.episodes], self.inputs, self.action_horizon,
                                 [e.index for e in self.episodes])
        self.frame_cache: FrameCache | None = None
        if frame_cache is True:
            frame_cache = build_frame_cache(dataset, processor, progress=True)
        if isinstance(frame_cache, FrameCache):
            frame_cache = frame_cache.directory
        if frame_cache not in (None, False):
            self.frame_cache = open_frame_cache(frame_cache, dataset, processor)
            if self.frame_cache.image_size != tuple(processor.image_size):  # pragma: no cover - checked above
                raise FrameCacheError(f"frame cache {frame_cache} holds {self.frame_cache.image_size} images, "
                                      f"the processor makes {processor.image_size}")

    # ---- preload of the small numeric data -------------------------------------------------
    def _load_vectors(self, ds: Any) -> None:
        keys = self.schema.data_keys
        columns: dict[str, np.ndarray] | None = None
        if hasattr(ds, "column") and len(self.episodes) > 0.25 * max(1, len(ds.episodes)):
            try:
                columns = {k: np.asarray(ds.column(k)) for k in keys}
                if any(len(v) != ds.num_frames for v in columns.values()):
                    columns = None
            except Exception:  # noqa: BLE001 - fall back to per-episode reads
                columns = None
        for ep in self.episodes:
            if columns is not None:
                data = {k: v[ep.data_start:ep.data_start + ep.length] for k, v in columns.items()}
            else:
                data = ds.episode_data(ep.index)
            for k in keys:
                arr = np.asarray(data[k])
                if arr.dtype == object:
                    arr = np.stack([np.asarray(v) for v in arr])
                if len(arr) != ep.length:
                    raise ProcessorError(f"episode {ep.index}, key {k!r}: {len(arr)} rows for an episode of "
                                         f"{ep.length} frames")
                bad = ~np.isfinite(arr.astype(np.float64))
                if bad.any():
                    r = int(np.argwhere(bad)[0][0])
                    raise NormalizationError(f"non-finite value in episode {ep.index}, key {k!r} (frame {r})")
                data[k] = arr
            self._state.append(self.schema.extract(data, "state"))
            self._action.append(self.schema.extract(data, "action"))
            tasks = tuple(getattr(ep, "tasks", ()) or ())
            self._tasks.append(tasks[0] if len(tasks) == 1 else None)

    def _normalize_vectors(self) -> None:
        """Normalise every episode's state/action rows once (the processor's normaliser works row
        by row, so this gives the very values ``processor.state`` / ``processor.actions`` give
        per sample). Checked against those methods on a few rows; if they ever disagree (a
        processor that does more than normalise), samples call them per item instead."""
        norm = self.processor.normalizer
        self._state_n: list[np.ndarray] | None = []
        self._action_n: list[np.ndarray] | None = []
        for st, ac in zip(self._state, self._action):
            self._state_n.append(np.asarray(norm.normalize("state", np.asarray(st, np.float64)), np.float32))
            self._action_n.append(np.asarray(norm.normalize("action", np.asarray(ac, np.float64)), np.float32))
        self._state_mask = torch.zeros(self.processor.state_dim, dtype=torch.bool)
        self._state_mask[:self.schema.state_dim] = True
        for pos in sorted({0, len(self.episodes) - 1}) if self.episodes else []:
            for t in sorted({0, self.episodes[pos].length - 1}):
                want_s, want_m = self.processor.state(self._state[pos][t])
                got_s, got_m = self._vectors(pos, t, 1)[:2]
                want_a, want_am = self.processor.actions(self._action[pos][t:t + 1])
                got_a, got_am = self._vectors(pos, t, 1)[2:]
                if not (torch.equal(want_s, got_s) and torch.equal(want_m, got_m)
                        and torch.equal(want_a, got_a[:1]) and torch.equal(want_am, got_am[:1])):
                    self._state_n = self._action_n = None
                    return

    def _vectors(self, pos: int, t: int, n: int) -> tuple[torch.Tensor, ...]:
        """state, state_mask, actions (H, 32), action_mask of frame t (n real action steps)."""
        h, a_pad = self.action_horizon, self.processor.action_dim
        if self._state_n is None or self._action_n is None:
            state, state_mask = self.processor.state(self._state[pos][t])
            chunk, dim_mask = self.processor.actions(self._action[pos][t:t + n])
            actions = torch.zeros((h, a_pad), dtype=torch.float32)
            action_mask = torch.zeros((h, a_pad), dtype=torch.bool)
            actions[:n] = chunk
            action_mask[:n] = dim_mask
            return state, state_mask, actions, action_mask
        ds_, da = self.schema.state_dim, self.schema.action_dim
        state = torch.zeros(self.processor.state_dim, dtype=torch.float32)
        state[:ds_] = torch.from_numpy(self._state_n[pos][t])
        actions = torch.zeros((h, a_pad), dtype=torch.float32)
        actions[:n, :da] = torch.from_numpy(self._action_n[pos][t:t + n])
        action_mask = torch.zeros((h, a_pad), dtype=torch.bool)
        action_mask[:n, :da] = True
        return state, self._state_mask.clone(), actions, action_mask

    @property
    def dataset(self) -> Any:
        return self._ds

    # ---- items -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    def locate(self, i: int) -> tuple[int, int]:
        """Flat index -> (episode index, frame index)."""
        pos, t = self.index.locate(i)
        return self.episodes[pos].index, t

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._item(int(i))

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """The samples of a batch (what a DataLoader calls). Each is what ``self[i]`` gives; their
        videos are views of one batch buffer that :func:`collate` then takes as is (no stack)."""
        indices = [int(i) for i in indices]
        if not indices:
            return []
        nf = self.inputs.num_frames
        h, w = self.processor.image_size
        buf = _batch_buffer((len(indices), 3, nf, h, w), torch.float32)
        items = [self._item(i, video_out=buf[b]) for b, i in enumerate(indices)]
        _PACKED.batch = buf
        return items

    def _item(self, i: int, video_out: torch.Tensor | None = None) -> dict[str, Any]:
        pos, t = self.index.locate(i)
        ep = self.episodes[pos]
        plan = self.index.plan(ep.length, t)
        ds = self.dataset
        if video_out is None:
            h, w = self.processor.image_size
            video_out = _arena_row((3, self.inputs.num_frames, h, w), torch.float32)
        if self.frame_cache is not None:
            # the stored uint8 canvas of Processor.images; the float conversion is its last step
            video = self.frame_cache.video(ep.index, plan.video, out=video_out)
        else:
            uniq = sorted(set(plan.video))
            where = [uniq.index(f) for f in plan.video]
            cams = {}
            for key in self.camera_keys:
                frames = np.asarray(ds.frames(key, ep.index, uniq))
                if frames.shape[0] != len(uniq):
                    raise ProcessorError(f"reader returned {frames.shape[0]} frames of {key!r} for {len(uniq)} "
                                         f"requested (episode {ep.index})")
                cams[key] = frames[where]
            video = self.processor.images(cams)
            if video_out is not None:
                video = video_out.copy_(video)
        state, state_mask, actions, action_mask = self._vectors(pos, t, plan.action_steps)
        task = self._tasks[pos]
        if task is None:
            task = ds.task(ep.index, t)
        return {
            "video": video,
            "future_mask": torch.tensor(plan.future_mask, dtype=torch.bool),
            "state": state,
            "state_mask": state_mask,
            "actions": actions,
            "action_mask": action_mask,
            "instruction": task,
            "episode_index": int(ep.index),
            "frame_index": int(t),
        }


# --------------------------------------------------------------------------------------------
# batch buffers: reusable (shared-memory) slots instead of fresh memory per batch
# --------------------------------------------------------------------------------------------

_RING_MIN_BYTES = 1 << 20  # smaller batch tensors are not worth a slot
_RING_SLOTS = 4  # per worker ring: batches queued (prefetch_factor 2) + those the consumer holds
_LOCAL_RING_SLOTS = 3  # per main-process ring (num_workers=0): the consumer's batch + the next
_RING_MAX_BYTES = 2 << 30  # per process, all rings together
_RING_MAX_RINGS = 4  # per process (one per batch-tensor size class)
_PAGE = 4096
_ATTACHED = _PAGE - 1  # header byte: the main process holds a mapping of this ring
_SHM_DIR = "/dev/shm"


def _ring_enabled() -> bool:
    return os.environ.get("DIT4DIT_BATCH_RING", "1").strip().lower() not in ("0", "false", "no", "off")


class _Lease:
    __slots__ = ("ring", "slot", "token", "offset", "nbytes")

    def __init__(self, ring: "_BatchRing", slot: int, token: int, offset: int, nbytes: int) -> None:
        self.ring, self.slot, self.token, self.offset, self.nbytes = ring, slot, token, offset, nbytes


class _BatchRing:
    """``slots`` reusable batch buffers of ``slot_bytes`` in one storage (shared memory when
    ``shared``, i.e. in a DataLoader worker).

    The first page holds one state byte per slot (0 free, 1 leased) and, in its last byte, whether
    the main process has mapped the ring. :meth:`acquire` leases a
    slot and returns a tensor on it; the slot comes back when the last tensor using that memory
    is freed: a weakref finalizer sits on the numpy array the tensor wraps (torch keeps that
    array alive exactly as long as the tensor's storage). A slot sent to the main process is
    released there instead, by the same mechanism (:func:`_rebuild_ring_tensor`).
    """

    def __init__(self, slot_bytes: int, slots: int, shared: bool) -> None:
        self.slot_bytes = -(-int(slot_bytes) // _PAGE) * _PAGE
        self.slots = int(slots)
        self.total = _PAGE + self.slots * self.slot_bytes
        self.shared = bool(shared)
        self.storage = torch.UntypedStorage._new_shared(self.total) if shared else torch.UntypedStorage(self.total)
        self.key = (os.getpid(), os.urandom(8).hex())
        self.bytes = torch.empty(0, dtype=torch.uint8).set_(self.storage).numpy()
        self.state = self.bytes[:self.slots]
        self.bytes[:_PAGE] = 0
        self._token = [0] * self.slots
        self._sent = [0] * self.slots
        self._lock = threading.Lock()

    def acquire(self, shape: tuple[int, ...], dtype: torch.dtype, nbytes: int) -> tuple[torch.Tensor, _Lease] | None:
        if nbytes > self.slot_bytes:
            return None
        with self._lock:
            free = np.flatnonzero(self.state == 0)
            if free.size == 0:
                return None
            s = int(free[0])
            self.state[s] = 1
            self._token[s] += 1
            token = self._token[s]
        off = _PAGE + s * self.slot_bytes
        arr = self.bytes[off:off + nbytes]
        weakref.finalize(arr, self._release_local, s, token)
        t = torch.from_numpy(arr).view(dtype).view(shape)
        return t, _Lease(self, s, token, off, nbytes)

    def _release_local(self, slot: int, token: int) -> None:
        # a slot sent to the main process is released there, not here
        if self._token[slot] == token and self._sent[slot] != token:
            self.state[slot] = 0

    def mark_sent(self, lease: _Lease) -> None:
        self._sent[lease.slot] = lease.token


_RINGS: list[_BatchRing] = []
_RINGS_PID = [os.getpid()]
_RINGS_FAILED: set[tuple[bool, int]] = set()


def _ring_acquire(shape: tuple[int, ...], dtype: torch.dtype, nbytes: int,
                  shared: bool) -> tuple[torch.Tensor, _Lease] | None:
    if _RINGS_PID[0] != os.getpid():  # inherited through fork: the parent's rings are not ours
        _RINGS.clear()
        _RINGS_FAILED.clear()
        _RINGS_PID[0] = os.getpid()
    ring = next((r for r in _RINGS if r.shared == shared and nbytes <= r.slot_bytes <= 2 * nbytes + _PAGE), None)
    if ring is None:
        size_class = (shared, nbytes)
        slots = _RING_SLOTS if shared else _LOCAL_RING_SLOTS
        total = _PAGE + slots * (-(-nbytes // _PAGE) * _PAGE)
        if (size_class in _RINGS_FAILED or len(_RINGS) >= _RING_MAX_RINGS
                or sum(r.total for r in _RINGS) + total > _RING_MAX_BYTES):
            return None
        if shared and os.path.isdir(_SHM_DIR):
            st = os.statvfs(_SHM_DIR)
            if st.f_bavail * st.f_frsize < 2 * total:  # leave room for everything else
                _RINGS_FAILED.add(size_class)
                return None
        try:
            ring = _BatchRing(nbytes, slots, shared)
        except (RuntimeError, OSError, MemoryError):
            _RINGS_FAILED.add(size_class)
            return None
        _RINGS.append(ring)
    return ring.acquire(shape, dtype, nbytes)


def _batch_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU batch tensor: a ring slot when large, else shared memory in a
    DataLoader worker (so it crosses to the main process without a copy) or plain memory."""
    buf, _ = _batch_buffer_leased(tuple(int(v) for v in shape), dtype)
    return buf


def _batch_buffer_leased(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, _Lease | None]:
    in_worker = torch.utils.data.get_worker_info() is not None
    nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
    if nbytes >= _RING_MIN_BYTES and _ring_enabled():
        got = _ring_acquire(shape, dtype, nbytes, shared=in_worker)
        if got is not None:
            key = id(got[0])
            # the callback runs while the tensor is being freed, before its id can be reused
            _LEASES[key] = (weakref.ref(got[0], lambda _ref, key=key: _LEASES.pop(key, None)), got[1])
            return got
    if in_worker and nbytes > 0:
        storage = torch.UntypedStorage._new_shared(nbytes)
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape), None
    return torch.empty(shape, dtype=dtype), None


# lease of each live ring tensor handed out by _batch_buffer (id -> (weakref, lease))
_LEASES: dict[int, tuple[Any, _Lease]] = {}


def _lease_of(t: torch.Tensor) -> _Lease | None:
    entry = _LEASES.get(id(t))
    if entry is None or entry[0]() is not t:
        return None
    return entry[1]


class _RingTensor(torch.Tensor):
    """A worker's batch tensor that lives in a shared ring slot: it pickles (to the main process)
    as a reference to the slot instead of a copy. Exists only between collate and the queue."""

    __torch_function__ = torch._C._disabled_torch_function_impl


def _export(buf: torch.Tensor, in_worker: bool) -> torch.Tensor:
    """Mark a worker's batch tensor for transport: ring slots by reference, small ones by value."""
    if not in_worker:
        return buf
    lease = _lease_of(buf)
    if lease is not None and lease.ring.shared:
        out = buf.as_subclass(_RingTensor)
        out._d4d_lease = lease  # type: ignore[attr-defined]
        return out
    if buf.numel() * buf.element_size() <= _BY_VALUE_MAX:
        return buf.as_subclass(_ByValueTensor)
    return buf


def _reduce_ring_tensor(t: torch.Tensor):
    from torch.multiprocessing.reductions import reduce_tensor

    lease = t.__dict__.get("_d4d_lease")
    plain = t.as_subclass(torch.Tensor)
    ring = None if lease is None else lease.ring
    if (ring is None or not plain.is_contiguous()
            or plain.data_ptr() != ring.storage.data_ptr() + lease.offset
            or plain.numel() * plain.element_size() != lease.nbytes):
        return reduce_tensor(plain)
    ring.mark_sent(lease)
    # once the receiver has mapped the ring (it says so in the ring's header) the slot is named
    # by key alone: no file descriptor to pass (a socket round trip with this busy worker)
    storage = None if ring.bytes[_ATTACHED] == 1 else ring.storage
    return (_rebuild_ring_tensor, (storage, ring.key, lease.slot, lease.offset, lease.nbytes, plain.dtype,
                                   tuple(plain.shape)))


class _ByValueTensor(torch.Tensor):
    """A small batch tensor of a worker: pickled by value through the pipe (cheaper than a shared
    memory segment whose file descriptor the receiver must fetch from this busy worker)."""

    __torch_function__ = torch._C._disabled_torch_function_impl


_BY_VALUE_MAX = 256 << 10


def _reduce_by_value(t: torch.Tensor):
    plain = t.as_subclass(torch.Tensor).contiguous()
    raw = plain.reshape(-1).view(torch.uint8).numpy() if plain.numel() else np.zeros(0, np.uint8)
    return (_rebuild_by_value, (raw, plain.dtype, tuple(plain.shape)))


def _rebuild_by_value(raw: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if raw.size == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(raw).view(dtype).view(shape)


ForkingPickler.register(_RingTensor, _reduce_ring_tensor)
ForkingPickler.register(_ByValueTensor, _reduce_by_value)


class _RemoteRing:
    """The main process's mapping of a worker's ring (kept while the worker lives)."""

    def __init__(self, storage: Any) -> None:
        self.storage = storage
        self.bytes = torch.empty(0, dtype=torch.uint8).set_(storage).numpy()

    def release(self, slot: int) -> None:
        self.bytes[slot] = 0


_REMOTE_RINGS: dict[tuple[int, str], _RemoteRing] = {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _rebuild_ring_tensor(storage: Any, key: tuple[int, str], slot: int, offset: int, nbytes: int,
                         dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    ring = _REMOTE_RINGS.get(key)
    if ring is None:
        if storage is None:  # pragma: no cover - the header flag is only set after the mapping is kept
            raise RuntimeError(f"batch buffer ring {key} of a DataLoader worker is unknown in this process")
        for k in [k for k in _REMOTE_RINGS if not _pid_alive(k[0])]:
            _REMOTE_RINGS.pop(k, None)
        ring = _REMOTE_RINGS[key] = _RemoteRing(storage)
        ring.bytes[_ATTACHED] = 1  # the worker may now name slots by key alone
    arr = ring.bytes[offset:offset + nbytes]
    weakref.finalize(arr, ring.release, slot)
    return torch.from_numpy(arr).view(dtype).view(shape)


# the batch buffer of the last __getitems__ call of this thread (collate takes it)
_PACKED = threading.local()

# Per-item path (``samples[i]`` for each index of a batch, then collate: what a wrapping dataset
# such as the trainer's does): in a DataLoader worker the videos of consecutive items are rows of
# one batch buffer (the batch size is learnt from the previous collate), so collate again takes
# the buffer as is instead of stacking; items stay independent tensors (distinct rows).
_ARENA = threading.local()


def _arena_row(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    rows = getattr(_ARENA, "rows", None)
    if rows is None or torch.utils.data.get_worker_info() is None:
        return None
    buf = getattr(_ARENA, "buf", None)
    nxt = getattr(_ARENA, "next", 0)
    if buf is None or nxt >= buf.shape[0] or tuple(buf.shape[1:]) != shape or buf.dtype != dtype:
        buf = _ARENA.buf = _batch_buffer((rows, *shape), dtype)
        nxt = 0
    _ARENA.next = nxt + 1
    return buf[nxt]


def _is_packed(vals: Sequence[torch.Tensor], buf: torch.Tensor) -> bool:
    """Whether ``vals`` are, in order, exactly the rows of ``buf``."""
    if len(vals) != buf.shape[0] or buf.ndim == 0:
        return False
    base, step = buf.data_ptr(), buf.stride(0) * buf.element_size()
    row = buf.shape[1:]
    for j, x in enumerate(vals):
        if x.dtype != buf.dtype or x.shape != row or x.data_ptr() != base + j * step or not x.is_contiguous():
            return False
    return buf.is_contiguous()


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of samples: tensors stacked on a new batch dimension, instructions as
    ``list[str]``, episode/frame indices as int64 tensors.

    Samples from :meth:`TrainingSamples.__getitems__` (or, in a worker, consecutive
    ``samples[i]``) already sit in one batch buffer, which is taken as is. Large batch tensors go to reusable ring slots (see the module docstring); in a
    DataLoader worker the others are stacked straight into shared memory, so the batch crosses to
    the main process without another copy (what torch's default collate does too).
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    packed = getattr(_PACKED, "batch", None)
    _PACKED.batch = None
    arena = getattr(_ARENA, "buf", None)
    _ARENA.buf = None  # the next batch's items start a new buffer
    in_worker = torch.utils.data.get_worker_info() is not None
    if in_worker:
        _ARENA.rows = len(items)
    out: dict[str, Any] = {}
    for k, v in items[0].items():
        vals = [it[k] for it in items]
        if isinstance(v, torch.Tensor):
            if packed is not None and _is_packed(vals, packed):
                buf, packed = packed, None
            elif arena is not None and _is_packed(vals, arena):
                buf, arena = arena, None
            elif v.device.type != "cpu" or v.requires_grad:
                out[k] = torch.stack(vals)
                continue
            else:
                shape = (len(vals), *v.shape)
                nbytes = int(np.prod(shape, dtype=np.int64)) * v.element_size()
                buf = torch.empty(shape, dtype=v.dtype) if nbytes <= _BY_VALUE_MAX else _batch_buffer(shape, v.dtype)
                torch.stack(vals, out=buf)
            out[k] = _export(buf, in_worker)
        elif isinstance(v, str):
            out[k] = list(vals)
        elif isinstance(v, (int, np.integer)):
            out[k] = _export(torch.tensor([int(x) for x in vals], dtype=torch.long), in_worker)
        elif isinstance(v, np.ndarray):
            out[k] = _export(torch.from_numpy(np.stack(vals)), in_worker)
        else:
            out[k] = list(vals)
    return out
