"""Action-free video: training samples for the video loss from videos without action labels.

Two kinds of source hold such video:

- a LeRobot dataset (v2.1 / v3.0), with or without state and action columns (they are ignored):
  :class:`LeRobotVideos`;
- a plain folder of video files (``.mp4 .webm .mkv .avi``, searched recursively), one episode per
  file: :class:`VideoFolder`. The instruction of each file comes from an optional
  ``instructions.json`` in the folder (``{"relative/path.mp4": "text"}``), else from a default
  instruction given by the caller (``--default-instruction``).

Either way the episodes are presented at the *training frame rate* (the labelled dataset's fps
when co-training, else ``inputs.fps``): frame ``k`` of an episode is the source frame nearest to
``k / rate`` seconds after its first frame, so ``inputs.frame_stride`` spans the same time in
labelled and action-free clips whatever rate a file was recorded at (the rate is read from the
container's timestamps).

:class:`ActionFreeSamples` turns a source into samples with the training sample layout (the
same frame plan and the same :class:`~dit4dit.data.processor.Processor` image path as labelled
samples), with zero state and actions, all-False masks and ``has_actions`` False: the model uses
such rows for the video loss only (``DiT4DiT.loss``).

Bad input is named: an empty folder, an unreadable or truncated file, a video shorter than one
clip, an ``instructions.json`` naming files that do not exist, a file without an instruction.
With ``skip_bad=True`` unreadable, truncated and too-short files are logged and skipped instead
of stopping the run.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .processor import Processor, ProcessorError
from .samples import SampleIndex
from .video import DatasetError, VideoReader, VideoReaderPool, probe_video

_log = logging.getLogger("dit4dit.data")

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi")
INSTRUCTIONS_FILE = "instructions.json"


@dataclass(frozen=True)
class VideoEpisode:
    """One action-free episode: ``length`` frames at the training rate; ``frames[k]`` is the
    source frame (index in its file or LeRobot episode) that training frame ``k`` reads."""

    index: int
    length: int
    task: str
    where: str  # the file, or "dataset episode N", for messages
    frames: np.ndarray  # int64 (length,)


def resample(num_frames: int, times: np.ndarray | None, source_fps: float, rate: float) -> np.ndarray:
    """Source frame index of each frame at ``rate`` fps: the frame nearest to ``k / rate`` s after
    the first. ``times``: the source frames' presentation times (None = ``i / source_fps``)."""
    if num_frames < 1:
        return np.zeros(0, dtype=np.int64)
    t = np.arange(num_frames, dtype=np.float64) / source_fps if times is None else np.asarray(times, np.float64)
    t = t - t[0]
    half = 0.5 / source_fps
    n = int(math.floor((t[-1] + half) * rate + 1e-9)) + 1
    want = np.arange(n, dtype=np.float64) / rate
    j = np.clip(np.searchsorted(t, want), 1, max(t.size - 1, 1))
    if t.size == 1:
        return np.zeros(n, dtype=np.int64)
    left = np.abs(want - t[j - 1]) <= np.abs(t[j] - want)
    idx = np.where(left, j - 1, j)
    keep = np.abs(t[idx] - want) <= half + 1e-9  # beyond the last frame: not a frame of this video
    return idx[keep].astype(np.int64)


def clip_frames(inputs: Any) -> int:
    """Frames at the training rate that one clip spans (conditioning frame t to the last future frame)."""
    return 1 + inputs.num_future_frames * inputs.frame_stride


class VideoFolder:
    """A folder of video files, one action-free episode per file (see the module docstring)."""

    def __init__(self, root: str | Path, rate: float, *, min_frames: int = 1, default_instruction: str | None = None,
                 skip_bad: bool = False, max_open: int = 16) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: video folder not found")
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"training frame rate must be > 0, got {rate}")
        self.rate = float(rate)
        files = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
        if not files:
            raise DatasetError(f"{self.root}: no video files ({', '.join(VIDEO_EXTENSIONS)}) in this folder or "
                               f"below it")
        instructions = self._instructions(files)
        self.skipped: list[tuple[str, str]] = []  # (file, why)
        self.episodes: list[VideoEpisode] = []
        self.files: list[Path] = []
        for path in files:
            rel = path.relative_to(self.root).as_posix()
            task = instructions.get(rel, default_instruction)
            if not task:
                raise DatasetError(f"{path}: no instruction: add {rel!r} to {self.root / INSTRUCTIONS_FILE} or give "
                                   f"a default instruction (--default-instruction)")
            try:
                frames, fps = self._check_file(path, min_frames)
            except DatasetError as e:
                if not skip_bad:
                    raise DatasetError(f"{e} (to skip unreadable or short videos, pass --skip-bad-videos)") from None
                _log.warning("skipping %s", e)
                self.skipped.append((str(path), str(e)))
                continue
            self.episodes.append(VideoEpisode(len(self.episodes), int(frames.size), task, str(path), frames))
            self.files.append(path)
        if not self.episodes:
            raise DatasetError(f"{self.root}: every one of its {len(files)} video files was skipped as unreadable or "
                               f"too short")
        self._pool = VideoReaderPool(max_open)

    def _instructions(self, files: Sequence[Path]) -> dict[str, str]:
        path = self.root / INSTRUCTIONS_FILE
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{path}: invalid JSON: {e}") from None
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                                 for k, v in data.items()):
            raise DatasetError(f"{path}: expected an object mapping each video's path (relative to {self.root}) "
                               f"to a non-empty instruction, e.g. {{\"clips/a.mp4\": \"open the drawer\"}}")
        present = {p.relative_to(self.root).as_posix() for p in files}
        missing = sorted(k for k in data if Path(k).as_posix() not in present)
        if missing:
            raise DatasetError(f"{path}: names {len(missing)} video file(s) that are not in {self.root}: "
                               f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
        return {Path(k).as_posix(): v.strip() for k, v in data.items()}

    def _check_file(self, path: Path, min_frames: int) -> tuple[np.ndarray, float]:
        """Index the file's frames, decode its first and last frame, and map it to the training rate."""
        info = probe_video(path)  # DatasetError for a file that does not open or has no video stream
        reader = VideoReader(path)
        try:
            times = reader.frame_times  # demuxes every packet
            n = times.size
            if info.num_frames and n < info.num_frames - 1:
                raise DatasetError(f"{path}: truncated video: its header declares {info.num_frames} frames but "
                                   f"only {n} are present")
            try:
                reader.read([times[0], times[-1]])
            except Exception as e:  # noqa: BLE001 - any decoder failure names the file
                raise DatasetError(f"{path}: unreadable or truncated video ({type(e).__name__}: {e})") from None
        finally:
            reader.close()
        if n > 1:
            fps = 1.0 / float(np.median(np.diff(times)))
        else:
            fps = float(info.fps or self.rate)
        frames = resample(n, times, fps, self.rate)
        if frames.size < min_frames:
            raise DatasetError(f"{path}: video shorter than one clip: {n} frames at {fps:.3g} fps give "
                               f"{frames.size} frames at the training rate {self.rate:g} fps; a clip spans "
                               f"{min_frames}")
        return frames, fps

    def camera_frames(self, camera: str, episode: VideoEpisode, indices: Sequence[int]) -> np.ndarray:  # noqa: ARG002
        reader = self._pool.get(self.files[episode.index])
        times = reader.frame_times
        return reader.read(times[episode.frames[np.asarray(indices, dtype=np.int64)]])

    def describe(self) -> str:
        return f"video folder {self.root} ({len(self.episodes)} files)"


class LeRobotVideos:
    """The camera frames of a LeRobot dataset as action-free episodes (state and action columns,
    if any, are ignored). ``cameras``: the processor's camera keys; each is looked up among the
    dataset's visual keys by name (full key, alias, short name); when none matches and the dataset
    has exactly as many visual keys as the processor has cameras, they are taken in order."""

    def __init__(self, dataset: Any, processor: Processor, rate: float, *, min_frames: int = 1,
                 skip_bad: bool = False) -> None:
        if isinstance(dataset, (str, Path)):
            from .lerobot import LeRobotDataset

            dataset = LeRobotDataset(dataset)
        self.dataset = dataset
        self.rate = float(rate)
        visual = [k for k, f in dataset.features.items() if f.get("dtype") in ("video", "image")]
        self.keys: dict[str, str] = {}
        for cam in processor.cameras:
            found = next((k for k in cam.candidates() if k in visual), None) or \
                next((k for k in visual if cam.matches(k)), None)
            if found is not None:
                self.keys[cam.key] = found
        if len(self.keys) != len(processor.cameras):
            if len(visual) == len(processor.cameras) and not self.keys:
                self.keys = {cam.key: k for cam, k in zip(processor.cameras, visual)}
                _log.info("%s: camera keys %s stand for the model's cameras %s (in order)", dataset.root, visual,
                          processor.camera_keys)
            else:
                raise DatasetError(f"{dataset.root}: the model's cameras {processor.camera_keys} are not among the "
                                   f"dataset's visual keys {visual}; give a dataset with those views, or set "
                                   f"inputs.cameras / schema to match it")
        self.skipped: list[tuple[str, str]] = []
        self.episodes: list[VideoEpisode] = []
        self._source: list[int] = []
        for ep in sorted(dataset.episodes, key=lambda e: e.index):
            frames = resample(ep.length, None, float(dataset.fps), self.rate)
            where = f"{dataset.root} episode {ep.index}"
            if frames.size < min_frames:
                msg = (f"{where}: shorter than one clip: {ep.length} frames at {dataset.fps:g} fps give "
                       f"{frames.size} at the training rate {self.rate:g} fps; a clip spans {min_frames}")
                if not skip_bad:
                    raise DatasetError(msg + " (to skip short episodes, pass --skip-bad-videos)")
                _log.warning("skipping %s", msg)
                self.skipped.append((where, msg))
                continue
            task = dataset.task(ep.index) if (ep.tasks or getattr(dataset, "tasks", None)) else ""
            self.episodes.append(VideoEpisode(len(self.episodes), int(frames.size), task, where, frames))
            self._source.append(ep.index)
        if not self.episodes:
            raise DatasetError(f"{dataset.root}: no episode long enough for one clip")

    def camera_frames(self, camera: str, episode: VideoEpisode, indices: Sequence[int]) -> np.ndarray:
        src = episode.frames[np.asarray(indices, dtype=np.int64)]
        return self.dataset.frames(self.keys[camera], self._source[episode.index], src.tolist())

    def describe(self) -> str:
        return f"LeRobot dataset {self.dataset.root} ({len(self.episodes)} episodes, no actions read)"


def open_action_free(path: Any, processor: Processor, rate: float, *, default_instruction: str | None = None,
                     skip_bad: bool = False) -> VideoFolder | LeRobotVideos:
    """The action-free source at ``path``: a LeRobot dataset (``meta/info.json``, or one already
    opened) or a folder of video files. Episodes shorter than one clip of ``processor.inputs`` are
    refused (or skipped)."""
    n = clip_frames(processor.inputs)
    if not isinstance(path, (str, os.PathLike)):  # an opened LeRobotDataset
        return LeRobotVideos(path, processor, rate, min_frames=n, skip_bad=skip_bad)
    path = Path(path).expanduser()
    if (path / "meta" / "info.json").is_file():
        return LeRobotVideos(path, processor, rate, min_frames=n, skip_bad=skip_bad)
    if len(processor.cameras) != 1:
        raise DatasetError(f"{path}: a folder of video files holds one view per file, but the model takes "
                           f"{len(processor.cameras)} cameras {processor.camera_keys}; give a LeRobot dataset "
                           f"with those views")
    return VideoFolder(path, rate, min_frames=n, default_instruction=default_instruction, skip_bad=skip_bad)


class ActionFreeSamples(Dataset):
    """Training samples of an action-free source: the labelled samples' layout (frame plan of
    :class:`~dit4dit.data.samples.SampleIndex`, images through the shared processor), with zero
    state and actions, all-False masks and ``has_actions`` False."""

    def __init__(self, source: VideoFolder | LeRobotVideos, processor: Processor, action_horizon: int) -> None:
        self.source = source
        self.processor = processor
        self.inputs = processor.inputs
        self.action_horizon = int(action_horizon)
        self.index = SampleIndex([e.length for e in source.episodes], self.inputs, self.action_horizon)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def tasks(self) -> list[str]:
        return sorted({e.task for e in self.source.episodes})

    def describe(self) -> list[str]:
        """What was read (and skipped), for the run's log."""
        lines = [f"action-free video: {self.source.describe()}, {len(self)} samples at {self.source.rate:g} fps"]
        lines += [f"  skipped {where}: {why}" for where, why in self.source.skipped]
        return lines

    def __getitem__(self, i: int) -> dict[str, Any]:
        pos, t = self.index.locate(int(i))
        ep = self.source.episodes[pos]
        plan = self.index.plan(ep.length, t)
        uniq = sorted(set(plan.video))
        where = [uniq.index(f) for f in plan.video]
        cams = {}
        for cam in self.processor.camera_keys:
            frames = np.asarray(self.source.camera_frames(cam, ep, uniq))
            if frames.shape[0] != len(uniq):
                raise ProcessorError(f"{ep.where}: the reader returned {frames.shape[0]} frames of {cam!r} for "
                                     f"{len(uniq)} requested")
            cams[cam] = frames[where]
        try:
            video = self.processor.images(cams)
        except ProcessorError as e:
            raise ProcessorError(f"{ep.where}: {e}") from None
        p = self.processor
        return {
            "video": video,
            "future_mask": torch.tensor(plan.future_mask, dtype=torch.bool),
            "state": torch.zeros(p.state_dim),
            "state_mask": torch.zeros(p.state_dim, dtype=torch.bool),
            "actions": torch.zeros(self.action_horizon, p.action_dim),
            "action_mask": torch.zeros(self.action_horizon, p.action_dim, dtype=torch.bool),
            "has_actions": False,
            "instruction": ep.task,
            "episode_index": int(ep.index),
            "frame_index": int(t),
        }


def lenient(processor: Processor) -> Processor:
    """The processor with ``strict_image_size`` off: action-free video comes at any resolution and
    is resized to the training canvas like any frame."""
    if not processor.strict_image_size:
        return processor
    return Processor.from_dict({**processor.to_dict(), "strict_image_size": False})


def action_free_samples(paths: Sequence[Any], processor: Processor, action_horizon: int, rate: float, *,
                        default_instruction: str | None = None, skip_bad: bool = False) -> Dataset:
    """The samples of every action-free source in ``paths`` (one dataset, concatenated): folders,
    or LeRobot datasets already opened (see :func:`open_action_free`)."""
    proc = lenient(processor)
    parts = []
    for p in paths:
        source = open_action_free(p, proc, rate, default_instruction=default_instruction, skip_bad=skip_bad)
        parts.append(ActionFreeSamples(source, proc, action_horizon))
    if not parts:
        raise ValueError("no action-free video source given")
    return parts[0] if len(parts) == 1 else _Concat(parts)


class _Concat(Dataset):
    """Several action-free sample sets as one (their instructions listed in ``tasks``)."""

    def __init__(self, parts: Sequence[ActionFreeSamples]) -> None:
        from torch.utils.data import ConcatDataset

        self.parts = list(parts)
        self._cat = ConcatDataset(self.parts)

    def __len__(self) -> int:
        return len(self._cat)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._cat[i]

    @property
    def tasks(self) -> list[str]:
        return sorted({t for p in self.parts for t in p.tasks})

    def describe(self) -> list[str]:
        return [line for p in self.parts for line in p.describe()]


def placeholder_processor(schema: Any, inputs: Any, *, action_dim: int, state_dim: int,
                          action_horizon: int | None) -> Processor:
    """The processor of a video-only run on action-free video: the schema's cameras and image
    path, and an identity normaliser (there are no state or action statistics to compute; the
    action DiT of such a run is untrained and a run that fine-tunes it computes its own)."""
    from .normalize import Normalizer

    def ident(d: int) -> dict[str, list[float]]:
        return {"min": [-1.0] * d, "max": [1.0] * d, "q01": [-1.0] * d, "q99": [1.0] * d}

    norm = Normalizer({"state": ident(schema.state_dim), "action": ident(schema.action_dim)})
    return Processor(schema, norm, inputs, action_dim=action_dim, state_dim=state_dim, action_horizon=action_horizon,
                     strict_image_size=False)
