"""Training samples: item i = (episode, frame t) of a LeRobot dataset.

Frame plan for a sample at frame ``t`` of an episode of length ``L`` (stride ``s``,
``nc`` conditioning frames, ``nf`` future frames, action horizon ``H``):

- conditioning frames ``t - (nc - 1) s, ..., t - s, t`` (clamped to the episode start, 0);
- future frames ``t + s, t + 2 s, ..., t + nf s``; those past the episode end repeat the
  episode's last frame and have ``future_mask`` False;
- state at ``t``; actions ``t, ..., t + H - 1``, steps past the episode end zero-padded and
  masked. Nothing ever crosses into another episode.

Everything numeric goes through the shared :class:`~dit4dit.data.processor.Processor`.
The dataset reader is reopened lazily in each DataLoader worker (it is not pickled with open
decoders); every worker then keeps its own decoders for the life of the (persistent) worker.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import InputConfig
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


def _default_opener(root: str | Path) -> Any:
    from .lerobot import LeRobotDataset

    return LeRobotDataset(root)


class TrainingSamples(Dataset):
    """A torch ``Dataset`` of training samples (see the module docstring for the frame plan).

    ``dataset``: a ``LeRobotDataset`` (or a path to one). ``schema``/``inputs`` default to the
    processor's; if given they must agree with it. ``episodes`` restricts the samples to some
    episode indices (e.g. a train/validation split).
    """

    def __init__(self, dataset: Any, schema: EmbodimentSchema | str | None = None,
                 inputs: InputConfig | None = None, action_horizon: int | None = None,
                 processor: Processor | None = None, episodes: Iterable[int] | None = None,
                 opener: Callable[[Any], Any] = _default_opener) -> None:
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
        # The reader pickles without its decoders (and its decoder pool is fork-aware), so each
        # DataLoader worker opens its own decoders lazily on first use and keeps them.
        self._ds = dataset

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
        self.index = SampleIndex([e.length for e in self.episodes], self.inputs, self.action_horizon,
                                 [e.index for e in self.episodes])

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
        pos, t = self.index.locate(int(i))
        ep = self.episodes[pos]
        plan = self.index.plan(ep.length, t)
        uniq = sorted(set(plan.video))
        where = [uniq.index(f) for f in plan.video]
        ds = self.dataset
        cams = {}
        for key in self.camera_keys:
            frames = np.asarray(ds.frames(key, ep.index, uniq))
            if frames.shape[0] != len(uniq):
                raise ProcessorError(f"reader returned {frames.shape[0]} frames of {key!r} for {len(uniq)} "
                                     f"requested (episode {ep.index})")
            cams[key] = frames[where]
        video = self.processor.images(cams)
        state, state_mask = self.processor.state(self._state[pos][t])
        h = self.action_horizon
        n = plan.action_steps
        chunk, dim_mask = self.processor.actions(self._action[pos][t:t + n])
        actions = torch.zeros((h, self.processor.action_dim), dtype=torch.float32)
        action_mask = torch.zeros((h, self.processor.action_dim), dtype=torch.bool)
        actions[:n] = chunk
        action_mask[:n] = dim_mask
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


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of samples: tensors stacked on a new batch dimension, instructions as
    ``list[str]``, episode/frame indices as int64 tensors."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    out: dict[str, Any] = {}
    in_worker = torch.utils.data.get_worker_info() is not None
    for k, v in items[0].items():
        vals = [it[k] for it in items]
        if isinstance(v, torch.Tensor):
            if in_worker:
                numel = sum(x.numel() for x in vals)
                storage = v._typed_storage()._new_shared(numel, device=v.device)
                buf = v.new(storage).resize_(len(vals), *v.shape)
                out[k] = torch.stack(vals, out=buf)
            else:
                out[k] = torch.stack(vals)
        elif isinstance(v, str):
            out[k] = list(vals)
        elif isinstance(v, (int, np.integer)):
            out[k] = torch.tensor([int(x) for x in vals], dtype=torch.long)
        elif isinstance(v, np.ndarray):
            out[k] = torch.from_numpy(np.stack(vals))
        else:
            out[k] = list(vals)
    return out
