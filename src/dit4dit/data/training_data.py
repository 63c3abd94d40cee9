"""The data of a training run: samples, processor and collate for a config and a data source.

- :func:`build_training_data`: a labelled LeRobot dataset folder -> ``(TrainingSamples,
  Processor)``, the normalisation statistics computed unless a processor is given.
- :class:`DatasetFolder`: a data path given to training; start-up asks several questions of it
  (``schema=auto``'s cameras, whether it is labelled data of the schema, the processor of a
  video-only run, the samples) and they share one opened dataset and one resolved schema.
- :func:`resolve_auto_cameras`: with ``schema=auto``, the dataset's cameras when the config
  names none of them.
- :func:`action_free_training_data` (a video-only run on action-free video) and
  :func:`with_action_free_video` (``train.video_datasets`` beside the labelled data).
- :func:`check_samples` / :func:`check_processor`: the first sample and the processor against
  the config's input protocol, with errors naming what differs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from torch.utils.data import ConcatDataset, Dataset

from ..config import DiT4DiTConfig
from ..jsonio import read_json
from .samples import collate as default_collate
from .schema import AUTO, VISUAL_DTYPES, Camera, EmbodimentSchema, Part, SchemaError, infer_schema, resolve_schema, schema_name

# The messages below are the training run's (start-up decisions), so they go to its logger.
_log = logging.getLogger("dit4dit.train")

REQUIRED_SAMPLE_KEYS = ("video", "state", "state_mask", "actions", "action_mask", "instruction")


@dataclass
class TrainingData:
    """What a run trains on: ``samples`` (labelled, or in a video-only run every sample),
    the ``processor`` saved with the checkpoints, the ``collate`` of a micro-batch, and ``free``:
    the action-free samples of a co-training run (their own batch stream), else None."""

    samples: Dataset
    processor: Any
    collate: Callable
    free: Dataset | None = None


class DatasetFolder:
    """A data path given to training, with the LeRobot dataset at it opened at most once.

    The dataset is opened on first use without the per-video header check (answering questions
    about its features needs none); :func:`build_training_data` runs the check once the dataset
    is trained on as labelled data. An open that fails is not remembered: the next use raises the
    same error."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        self._dataset: Any = None
        self._auto_schema: EmbodimentSchema | None = None
        self._videos_checked = False

    def __repr__(self) -> str:
        return f"DatasetFolder({str(self.path)!r})"

    @property
    def is_lerobot(self) -> bool:
        """Whether the folder has a LeRobot ``meta/info.json``."""
        return (self.path / "meta" / "info.json").is_file()

    def dataset(self) -> Any:
        """The ``LeRobotDataset`` (opened on first use)."""
        if self._dataset is None:
            from .lerobot import LeRobotDataset

            self._dataset = LeRobotDataset(self.path, check_videos=False)
        return self._dataset

    def checked_dataset(self) -> Any:
        """The dataset with every video file's header checked (once)."""
        ds = self.dataset()
        if not self._videos_checked:
            ds._validate_videos()  # what LeRobotDataset(check_videos=True) runs on open
            self._videos_checked = True
        return ds

    def camera_keys(self) -> list[str]:
        """The dataset's camera keys (features of dtype video or image), sorted as `infer_schema` sorts them."""
        return sorted(k for k, f in self.dataset().features.items() if f.get("dtype") in VISUAL_DTYPES)

    def schema(self, name: str | EmbodimentSchema) -> EmbodimentSchema:
        """``resolve_schema(name, dataset)``; ``auto`` is inferred from the dataset once."""
        if isinstance(name, str) and name == AUTO:
            if self._auto_schema is None:
                self._auto_schema = infer_schema(self.dataset(), name=AUTO)
            return self._auto_schema
        return resolve_schema(name, None)


def as_folder(data: Any) -> DatasetFolder | None:
    """``data`` as a :class:`DatasetFolder` when it is a path (or already one), else None (a
    ``Dataset`` of samples)."""
    if isinstance(data, DatasetFolder):
        return data
    if isinstance(data, (str, os.PathLike)):
        return DatasetFolder(data)
    return None


# --------------------------------------------------------------------------------------------
# Checks against the config
# --------------------------------------------------------------------------------------------


def check_samples(samples: Dataset, cfg: DiT4DiTConfig) -> None:
    """Check the first sample against the config's input protocol (clear error on mismatch)."""
    try:
        n = len(samples)  # type: ignore[arg-type]
    except TypeError as e:
        raise ValueError("the training samples must be a map-style Dataset with a length") from e
    if n < 1:
        raise ValueError("the training dataset is empty")
    s = samples[0]
    if not isinstance(s, Mapping):
        raise ValueError(f"a training sample must be a dict, got {type(s).__name__}")
    missing = [k for k in REQUIRED_SAMPLE_KEYS if k not in s]
    if missing:
        raise ValueError(f"training samples lack {missing} (they hold {sorted(s)})")
    i, a = cfg.inputs, cfg.action
    want = {
        "video": (3, i.num_frames, *i.image_size),
        "state": (a.state_dim,),
        "state_mask": (a.state_dim,),
        "actions": (a.action_horizon, a.action_dim),
        "action_mask": (a.action_horizon, a.action_dim),
    }
    errs = []
    for k, shape in want.items():
        have = tuple(getattr(s[k], "shape", ()))
        if have != tuple(shape):
            errs.append(f"{k}: sample shape {have}, config {cfg.name!r} expects {tuple(shape)}")
    if "future_mask" in s and tuple(s["future_mask"].shape) != (i.num_future_frames,):
        errs.append(f"future_mask: sample shape {tuple(s['future_mask'].shape)}, expected ({i.num_future_frames},)")
    if not isinstance(s["instruction"], str):
        errs.append(f"instruction: expected a string, got {type(s['instruction']).__name__}")
    if errs:
        raise ValueError("the training samples do not fit the config (inputs.*, action.*):\n  - " + "\n  - ".join(errs))


def check_processor(processor: Any, cfg: DiT4DiTConfig) -> None:
    """Check a processor's input protocol, padded dimensions and schema against the config."""
    if processor is None:
        return
    errs = []
    if getattr(processor, "inputs", cfg.inputs) != cfg.inputs:
        errs.append(f"processor inputs {processor.inputs} differ from the config's {cfg.inputs}")
    for attr, want in (("action_dim", cfg.action.action_dim), ("state_dim", cfg.action.state_dim),
                       ("action_horizon", cfg.action.action_horizon)):
        have = getattr(processor, attr, want)
        if have is not None and have != want:
            errs.append(f"processor {attr}={have}, config expects {want}")
    schema = getattr(getattr(processor, "schema", None), "name", None)
    if schema is not None and schema != schema_name(cfg.schema):
        errs.append(f"processor schema {schema!r}, config schema {cfg.schema!r}")
    if errs:
        raise ValueError("the processor does not fit the config:\n  - " + "\n  - ".join(errs))


# --------------------------------------------------------------------------------------------
# Questions asked of the data folder at start-up
# --------------------------------------------------------------------------------------------


def resolve_auto_cameras(cfg: DiT4DiTConfig, folder: DatasetFolder | None) -> DiT4DiTConfig:
    """With ``schema=auto``: when none of ``inputs.cameras`` is a camera of the dataset, the
    dataset's camera (one with ``camera_layout=single``, all of them side by side otherwise).
    ``folder`` None (samples given as a ``Dataset``): ``cfg`` unchanged."""
    if cfg.schema != AUTO or folder is None:
        return cfg
    if not folder.is_lerobot:
        raise SchemaError(f"schema=auto reads the state, action and cameras from a LeRobot dataset's "
                          f"meta/info.json; {folder.path} has none (name a schema: --set schema=NAME or PATH.json)")
    # the cameras alone: a dataset of action-free video (cameras only) has no state or action to infer
    cams = [Camera(k) for k in folder.camera_keys()]
    if not cams:
        raise SchemaError(f"schema=auto: {folder.path} has no camera (no feature of dtype video or image)")
    if any(c.matches(n) for n in cfg.inputs.cameras for c in cams):
        return cfg
    if cfg.inputs.camera_layout == "single" and len(cams) != 1:
        raise SchemaError(f"schema=auto: {folder.path} has cameras {[c.key for c in cams]}, none of inputs.cameras "
                          f"{list(cfg.inputs.cameras)}; choose one with --set inputs.cameras=KEY")
    _log.info("schema=auto: the dataset's camera(s) %s replace inputs.cameras %s", [c.key for c in cams],
              list(cfg.inputs.cameras))
    return replace(cfg, inputs=replace(cfg.inputs, cameras=tuple(c.key for c in cams)))


def is_labelled_dataset(cfg: DiT4DiTConfig, folder: DatasetFolder) -> bool:
    """Whether ``folder`` is a LeRobot dataset with the state, action and cameras of ``cfg.schema``."""
    from .lerobot import DatasetError

    if not folder.is_lerobot:
        return False
    try:
        folder.schema(cfg.schema).check(folder.dataset(), cfg.action.state_dim, cfg.action.action_dim)
    except (SchemaError, DatasetError):
        return False
    return True


def training_rate(cfg: DiT4DiTConfig, folder: DatasetFolder) -> float:
    """Frame rate action-free video is presented at in a video-only run: the fps of a LeRobot
    ``--dataset``, else ``inputs.fps``."""
    info = folder.path / "meta" / "info.json"
    if info.is_file():
        try:
            return float(read_json(info, "dataset metadata")["fps"])
        except (KeyError, TypeError, ValueError):
            pass
    return float(cfg.inputs.fps)


def video_only_processor(cfg: DiT4DiTConfig, folder: DatasetFolder) -> Any:
    """The processor of a video-only run on action-free video: the schema's cameras and image
    path, an identity normaliser (see :func:`~dit4dit.data.action_free.placeholder_processor`)."""
    from .action_free import placeholder_processor

    if cfg.schema == AUTO and folder.is_lerobot:
        try:
            schema = folder.schema(AUTO)
        except SchemaError:  # cameras only: the placeholder's state and action are nominal (one value each)
            cams = folder.camera_keys()
            schema = EmbodimentSchema(name=AUTO, state=(Part("state", 0, 1),), action=(Part("action", 0, 1),),
                                      cameras=tuple(Camera(c) for c in cams),
                                      layout="single" if len(cams) == 1 else "side_by_side",
                                      description="the cameras of an action-free dataset (no state, no action)")
    else:
        schema = resolve_schema(cfg.schema, None)
    _log.info("video-only run on action-free video (%s): no state or action statistics; the processor's "
              "normaliser is the identity", folder.path)
    return placeholder_processor(schema, cfg.inputs, action_dim=cfg.action.action_dim,
                                 state_dim=cfg.action.state_dim, action_horizon=cfg.action.action_horizon)


# --------------------------------------------------------------------------------------------
# Building the samples
# --------------------------------------------------------------------------------------------


def build_training_data(cfg: DiT4DiTConfig, dataset_path: str | os.PathLike | DatasetFolder, processor: Any = None,
                        progress: bool = True, frame_cache: str | os.PathLike | bool | None = None
                        ) -> tuple[Dataset, Any]:
    """``(TrainingSamples, Processor)`` for a LeRobot dataset folder (statistics computed unless a
    processor is given, e.g. the one saved in the checkpoint being resumed). ``dataset_path``: a
    path, or a :class:`DatasetFolder` whose opened dataset is reused. ``frame_cache``: see
    ``TrainingSamples`` (None = decode the videos, True = build or reuse the default cache, a
    path = that cache). ``train.episodes_per_task``: the samples (and the statistics) come from
    the first N episodes of each task only, ``train.task_episodes`` per task
    (:func:`~dit4dit.data.samples.episodes_per_task`);
    ``train.task_repeats`` then repeats some tasks' episodes (:func:`~dit4dit.data.samples.repeat_tasks`)."""
    from .normalize import compute_dataset_stats
    from .processor import Processor
    from .samples import TrainingSamples, episodes_per_task, repeat_tasks

    folder = dataset_path if isinstance(dataset_path, DatasetFolder) else DatasetFolder(dataset_path)
    ds = folder.checked_dataset()
    try:
        episodes = None
        if cfg.train.episodes_per_task is not None or cfg.train.task_episodes:
            episodes = episodes_per_task(ds, cfg.train.episodes_per_task, cfg.train.task_episodes)
        if processor is None:
            schema = folder.schema(cfg.schema)
            stats = None if episodes is None else compute_dataset_stats(ds, schema, keys=(), episodes=episodes,
                                                                       progress=progress)
            processor = Processor.for_dataset(ds, schema, cfg.inputs, stats=stats, mode=cfg.normalization,
                                              action_dim=cfg.action.action_dim, state_dim=cfg.action.state_dim,
                                              action_horizon=cfg.action.action_horizon, progress=progress)
        kwargs = {"frame_cache": frame_cache} if frame_cache not in (None, False) else {}
        samples = TrainingSamples(ds, processor=processor, episodes=repeat_tasks(ds, episodes, cfg.train.task_repeats),
                                  **kwargs)
    except SchemaError as e:
        raise SchemaError(f"dataset {folder.path} does not fit schema {cfg.schema!r} of config {cfg.name!r}: {e}\n"
                          f"To train on it anyway: --set schema=auto (state, action and cameras read from its "
                          f"meta/info.json) or --set schema=PATH.json (a schema file; docs/adding-a-robot.md)") from e
    return samples, processor


def action_free_training_data(cfg: DiT4DiTConfig, folder: DatasetFolder, processor: Any = None,
                              collate: Callable | None = None) -> TrainingData:
    """A video-only run (``mode=video_only`` or ``image_only``) on action-free video: ``folder``
    (not labelled data of the schema) and ``train.video_datasets`` as one sample set, presented
    at :func:`training_rate`; ``processor`` defaults to :func:`video_only_processor`."""
    from .action_free import action_free_samples

    tc = cfg.train
    processor = processor or video_only_processor(cfg, folder)
    # a LeRobot folder is the one start-up opened (its schema and processor came from it), not a second open
    first = folder.checked_dataset() if folder.is_lerobot else folder.path
    samples = action_free_samples([first, *tc.video_datasets], processor, cfg.action.action_horizon,
                                  training_rate(cfg, folder), default_instruction=tc.default_instruction,
                                  skip_bad=tc.skip_bad_videos)
    check_processor(processor, cfg)
    check_samples(samples, cfg)
    return TrainingData(samples, processor, collate or default_collate)


def with_action_free_video(cfg: DiT4DiTConfig, data: TrainingData) -> TrainingData:
    """``data`` (labelled) with the action-free video of ``train.video_datasets``, if any: one
    sample set in a video-only run (every row feeds the video or image loss), else the
    co-training ``free`` samples. Normalisation statistics come from the labelled data alone; the
    action-free video is presented at the labelled dataset's frame rate."""
    tc = cfg.train
    if not tc.video_datasets:
        return data
    from .action_free import action_free_samples

    rate = getattr(getattr(data.samples, "dataset", None), "fps", None) or cfg.inputs.fps
    free = action_free_samples(tc.video_datasets, data.processor, cfg.action.action_horizon, float(rate),
                               default_instruction=tc.default_instruction, skip_bad=tc.skip_bad_videos)
    check_samples(free, cfg)
    if not cfg.losses().action:  # every row feeds the encoder's own loss alone: the video is more rows
        return replace(data, samples=ConcatDataset([data.samples, free]))
    return replace(data, free=free)
