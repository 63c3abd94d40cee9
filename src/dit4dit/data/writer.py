"""Write LeRobot v3.0 datasets, atomically.

Layout produced (``chunk-XXX/file-XXX`` roll over by size, ``chunks_size`` files per chunk)::

    meta/info.json                              (written last)
    meta/tasks.parquet                          (task_index + task; pandas index "task")
    meta/episodes/chunk-000/file-000.parquet    (one row per episode, with per-episode stats)
    meta/stats.json                             (mean/std/min/max/count/q01/q10/q50/q90/q99)
    data/chunk-XXX/file-XXX.parquet             (many episodes per file)
    videos/<key>/chunk-XXX/file-XXX.mp4         (many episodes per file, concatenated)

Everything goes to a hidden temporary sibling of ``root`` and is renamed into place by
:meth:`LeRobotWriter.finalize`; an exception (or a killed process) never leaves a
complete-looking dataset at ``root``. Frame ``i`` of an episode is encoded at
``from_timestamp + i / fps`` in its video file.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..jsonio import to_jsonable, write_json
from .lerobot import V3_DATA_PATH, V3_VIDEO_PATH, arrow_to_numpy
from .video import _ENCODER_CANDIDATES, VideoEncoder

__all__ = ["LeRobotWriter", "compute_feature_stats", "aggregate_stats", "QUANTILES"]

QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
STANDARD_FEATURES = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
FINITE_KEYS = ("action", "observation.state")
_BUFFER_BYTES = 32 * 1024 * 1024  # flush buffered episodes to the parquet file past this


# ----------------------------------------------------------------------------------------------
# statistics


def compute_feature_stats(values: np.ndarray, feature_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Stats of a numeric feature over rows: values (N, *feature_shape) -> each stat of feature_shape."""
    v = np.asarray(values)
    n = v.shape[0]
    flat = v.reshape(n, -1).astype(np.float64)
    shape = tuple(feature_shape) if len(feature_shape) else (1,)
    out = {
        "min": flat.min(axis=0),
        "max": flat.max(axis=0),
        "mean": flat.mean(axis=0),
        "std": flat.std(axis=0),
    }
    qs = np.quantile(flat, list(QUANTILES.values()), axis=0)
    for name, q in zip(QUANTILES, qs):
        out[name] = q
    out = {k: x.reshape(shape) for k, x in out.items()}
    out["count"] = np.array([n], dtype=np.int64)
    return out


def _sample_indices(n: int) -> np.ndarray:
    """Evenly spaced frame subsample for image stats (between 100 and 10000 frames, ~n^0.75)."""
    if n <= 100:
        return np.arange(n)
    k = int(min(max(100, round(n**0.75)), 10000, n))
    return np.round(np.linspace(0, n - 1, k)).astype(np.int64)


def _hist_quantiles(hist: np.ndarray, qs: list[float]) -> np.ndarray:
    """np.quantile (linear interpolation) of integer data 0..len(hist)-1 given as a histogram."""
    cum = np.cumsum(hist)
    n = int(cum[-1])
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, n - 1)
        v_lo = int(np.searchsorted(cum, lo, side="right"))
        v_hi = int(np.searchsorted(cum, hi, side="right"))
        out.append(v_lo + (pos - lo) * (v_hi - v_lo))
    return np.asarray(out, dtype=np.float64)


def compute_image_stats(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel stats of uint8 (T, H, W, C) frames, normalised to [0, 1], as (C, 1, 1) arrays.

    Uses an evenly spaced frame subsample and frames strided down to about 150 px; the stats
    (quantiles included) are exact for that subsample, computed from 256-bin histograms.
    """
    idx = _sample_indices(frames.shape[0])
    sub = frames[idx]
    h, w = sub.shape[1:3]
    stride = max(1, int(max(h, w) // 150))  # downsample large frames to about 150 px
    sub = sub[:, ::stride, ::stride, :]
    c = sub.shape[-1]
    x = np.ascontiguousarray(sub).reshape(-1, c)
    hists = [np.bincount(x[:, i], minlength=256).astype(np.float64) for i in range(c)]
    levels = np.arange(256, dtype=np.float64)
    stats: dict[str, list] = {k: [] for k in ["min", "max", "mean", "std", *QUANTILES]}
    for hist in hists:
        n = hist.sum()
        nz = np.flatnonzero(hist)
        mean = float((hist * levels).sum() / n)
        var = float((hist * (levels - mean) ** 2).sum() / n)
        stats["min"].append(nz[0])
        stats["max"].append(nz[-1])
        stats["mean"].append(mean)
        stats["std"].append(np.sqrt(var))
        for name, q in zip(QUANTILES, _hist_quantiles(hist, list(QUANTILES.values()))):
            stats[name].append(q)
    out = {k: (np.asarray(v, dtype=np.float64) / 255.0).reshape(c, 1, 1) for k, v in stats.items()}
    out["count"] = np.array([len(idx)], dtype=np.int64)
    return out


def aggregate_stats(per_episode: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Pool per-episode stats: exact mean/std/min/max/count, count-weighted mean of quantiles."""
    counts = np.array([float(s["count"][0]) for s in per_episode])
    total = counts.sum()
    w = counts / total
    mean = sum(wi * s["mean"] for wi, s in zip(w, per_episode))
    var = sum(wi * (s["std"] ** 2 + (s["mean"] - mean) ** 2) for wi, s in zip(w, per_episode))
    out = {
        "min": np.min(np.stack([s["min"] for s in per_episode]), axis=0),
        "max": np.max(np.stack([s["max"] for s in per_episode]), axis=0),
        "mean": mean,
        "std": np.sqrt(np.maximum(var, 0.0)),
        "count": np.array([int(total)], dtype=np.int64),
    }
    for q in QUANTILES:
        if all(q in s for s in per_episode):
            out[q] = sum(wi * s[q] for wi, s in zip(w, per_episode))
    return out


# ----------------------------------------------------------------------------------------------


def _arrow_type(ft: dict) -> pa.DataType:
    dtype = ft["dtype"]
    if dtype == "image":
        return IMAGE_STRUCT
    if dtype == "string":
        return pa.string()
    t = pa.from_numpy_dtype(np.dtype(dtype))
    shape = tuple(ft.get("shape") or ())
    if shape in ((), (1,)):
        return t
    for d in reversed(shape):
        t = pa.list_(t, int(d))
    return t


def _arrow_array(arr: np.ndarray, t: pa.DataType) -> pa.Array:
    if pa.types.is_fixed_size_list(t):
        inner = _arrow_array(arr.reshape((-1,) + arr.shape[2:]), t.value_type)
        return pa.FixedSizeListArray.from_arrays(inner, t.list_size)
    return pa.array(arr, type=t)


def _tasks_table(tasks: list[str]) -> pa.Table:
    """tasks.parquet as LeRobot writes it via pandas: column task_index, index named "task"."""
    table = pa.table(
        {"task_index": pa.array(range(len(tasks)), pa.int64()), "task": pa.array(tasks, pa.string())}
    )
    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [
            {"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
             "metadata": {"encoding": "UTF-8"}}
        ],
        "columns": [
            {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64",
             "metadata": None},
            {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object",
             "metadata": None},
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.3",
    }
    return table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})


class _Rolling:
    """chunk/file index bookkeeping."""

    def __init__(self, chunks_size: int):
        self.chunks_size = chunks_size
        self.chunk = 0
        self.file = 0

    def advance(self) -> None:
        self.file += 1
        if self.file >= self.chunks_size:
            self.file = 0
            self.chunk += 1


class LeRobotWriter:
    """Write a LeRobot v3.0 dataset episode by episode; see the module docstring.

    ``features`` follows info.json (``{"observation.state": {"dtype": "float32", "shape": [4],
    "names": [...]}, "observation.images.image": {"dtype": "video", "shape": [H, W, 3], ...}}``);
    the standard columns timestamp, frame_index, episode_index, index and task_index are added.
    Keyword-only extras: ``overwrite`` replaces an existing non-empty ``root`` on finalize,
    ``gop`` is the keyframe interval of the videos (random-access speed vs size),
    ``video_options`` are extra FFmpeg encoder options.
    """

    def __init__(
        self,
        root: str | Path,
        fps: int,
        features: dict[str, dict],
        robot_type: str | None = None,
        video_codec: str = "h264",
        crf: int = 20,
        chunks_size: int = 1000,
        data_files_size_mb: float = 100,
        video_files_size_mb: float = 500,
        *,
        overwrite: bool = False,
        gop: int = 2,
        video_options: dict[str, str] | None = None,
    ):
        self.root = Path(root).expanduser().absolute()
        if not (fps > 0 and math.isfinite(fps)):
            raise ValueError(f"fps must be positive, got {fps!r}")
        self.fps = fps
        self.robot_type = robot_type
        self.video_codec = video_codec
        self.crf = int(crf)
        self.gop = int(gop)
        self.video_options = dict(video_options or {})
        self.chunks_size = int(chunks_size)
        self.data_files_size_mb = float(data_files_size_mb)
        self.video_files_size_mb = float(video_files_size_mb)
        self.overwrite = overwrite
        if self.chunks_size < 1:
            raise ValueError("chunks_size must be >= 1")

        self.features: dict[str, dict] = {}
        for key, ft in features.items():
            if key in STANDARD_FEATURES:
                continue  # always written by the writer itself
            if "/" in key:
                raise ValueError(f"feature name {key!r} must not contain '/'")
            if not isinstance(ft, dict) or "dtype" not in ft:
                raise ValueError(f"feature {key!r} needs a dtype")
            ft = {k: (list(v) if k == "shape" and v is not None else v) for k, v in ft.items()}
            ft.setdefault("shape", [1])
            ft.setdefault("names", None)
            if ft["dtype"] in ("video", "image"):
                shp = ft["shape"]
                if len(shp) != 3 or shp[2] != 3:
                    raise ValueError(f"feature {key!r}: visual features need shape [H, W, 3], got {shp}")
            elif ft["dtype"] != "string":
                try:
                    np.dtype(ft["dtype"])
                except TypeError as e:
                    raise ValueError(f"feature {key!r}: unknown dtype {ft['dtype']!r}") from e
            self.features[key] = ft
        self.video_keys = [k for k, ft in self.features.items() if ft["dtype"] == "video"]
        self.image_keys = [k for k, ft in self.features.items() if ft["dtype"] == "image"]
        fields = [pa.field(k, _arrow_type(ft)) for k, ft in self.features.items() if ft["dtype"] != "video"]
        fields += [pa.field(k, _arrow_type(ft)) for k, ft in STANDARD_FEATURES.items()]
        self._schema = pa.schema(fields)

        self._check_root()
        self.root.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.root.parent / f".{self.root.name}.writing-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        self._state = "open"  # open | finalized | aborted

        self._tasks: dict[str, int] = {}
        self._episodes: list[dict] = []
        self._ep_stats: list[dict[str, dict[str, np.ndarray]]] = []
        self._num_frames = 0
        # data file state
        self._data_pos = _Rolling(self.chunks_size)
        self._data_writer: pq.ParquetWriter | None = None
        self._data_bytes = 0  # in-memory bytes of episodes in the current data file
        self._buffer: list[pa.Table] = []
        self._buffer_bytes = 0
        # video state, per key
        self._video_pos = {k: _Rolling(self.chunks_size) for k in self.video_keys}
        self._encoders: dict[str, VideoEncoder | None] = {k: None for k in self.video_keys}
        self._video_meta: dict[str, dict] = {}

    # -- root handling ---------------------------------------------------------------------
    def _check_root(self) -> None:
        if self.root.exists():
            if not self.root.is_dir():
                raise FileExistsError(f"{self.root} exists and is not a folder")
            if any(self.root.iterdir()) and not self.overwrite:
                raise FileExistsError(
                    f"{self.root} exists and is not empty; pass overwrite=True to replace it"
                )

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> "LeRobotWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.finalize()

    def __del__(self):
        try:
            if getattr(self, "_state", None) == "open":
                self.abort()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass

    @property
    def num_episodes(self) -> int:
        return len(self._episodes)

    # -- episodes --------------------------------------------------------------------------
    def _prepare(self, data: dict[str, np.ndarray]) -> tuple[int, dict[str, np.ndarray]]:
        ep = len(self._episodes)
        std = [k for k in data if k in STANDARD_FEATURES]
        if std:
            raise ValueError(f"episode {ep}: {std} are written by the writer; do not pass them")
        missing = [k for k in self.features if k not in data]
        extra = [k for k in data if k not in self.features]
        if missing or extra:
            raise ValueError(f"episode {ep}: missing keys {missing}, undeclared keys {extra}")
        lengths = {k: len(v) for k, v in data.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"episode {ep}: arrays differ in length: {lengths}")
        T = next(iter(lengths.values()))
        if T == 0:
            raise ValueError(f"episode {ep}: no frames")
        out = {}
        for key, ft in self.features.items():
            v = data[key]
            if ft["dtype"] in ("video", "image"):
                a = np.asarray(v)
                want = (T, *ft["shape"])
                if a.dtype != np.uint8 or a.shape != want:
                    raise ValueError(f"episode {ep}, key {key!r}: expected uint8 {want}, got {a.dtype} {a.shape}")
            elif ft["dtype"] == "string":
                a = np.asarray([str(x) for x in v], dtype=object)
            else:
                shape = tuple(ft["shape"])
                a = np.asarray(v)
                if shape in ((), (1,)):
                    if a.shape == (T, 1):
                        a = a[:, 0]
                    want = (T,)
                else:
                    want = (T, *shape)
                if a.shape != want:
                    raise ValueError(f"episode {ep}, key {key!r}: expected shape {want}, got {a.shape}")
                if np.issubdtype(a.dtype, np.floating) and any(key == f or key.startswith(f + ".") for f in FINITE_KEYS):
                    bad = ~np.isfinite(a.reshape(T, -1)).all(axis=1)
                    if bad.any():
                        raise ValueError(
                            f"episode {ep}, key {key!r}: non-finite values (NaN/inf) at frame {int(np.flatnonzero(bad)[0])}"
                        )
                a = a.astype(np.dtype(ft["dtype"]), copy=False)
            out[key] = a
        return T, out

    def add_episode(self, data: dict[str, np.ndarray], task: str) -> int:
        """Append one episode (arrays of equal length T; video keys uint8 (T, H, W, 3)); returns its index."""
        if self._state != "open":
            raise RuntimeError(f"writer is {self._state}")
        if not isinstance(task, str) or not task:
            raise ValueError("task must be a non-empty string")
        T, arrays = self._prepare(data)
        ep = len(self._episodes)
        task_index = self._tasks.setdefault(task, len(self._tasks))
        start = self._num_frames

        columns = {}
        for key, ft in self.features.items():
            if ft["dtype"] == "video":
                continue
            t = self._schema.field(key).type
            if ft["dtype"] == "image":
                columns[key] = pa.array(
                    [{"bytes": _png_bytes(img), "path": f"frame_{i:06d}.png"} for i, img in enumerate(arrays[key])],
                    type=IMAGE_STRUCT,
                )
            else:
                columns[key] = _arrow_array(arrays[key], t)
        frame_index = np.arange(T, dtype=np.int64)
        columns["timestamp"] = pa.array((frame_index / self.fps).astype(np.float32))
        columns["frame_index"] = pa.array(frame_index)
        columns["episode_index"] = pa.array(np.full(T, ep, dtype=np.int64))
        columns["index"] = pa.array(start + frame_index)
        columns["task_index"] = pa.array(np.full(T, task_index, dtype=np.int64))
        table = pa.Table.from_arrays([columns[f.name] for f in self._schema], schema=self._schema)

        try:
            # data file
            if self._data_bytes > 0 and self._data_bytes >= self.data_files_size_mb * 1024 * 1024:
                self._close_data_file()
                self._data_pos.advance()
            row = {
                "episode_index": ep,
                "tasks": [task],
                "length": T,
                "data/chunk_index": self._data_pos.chunk,
                "data/file_index": self._data_pos.file,
                "dataset_from_index": start,
                "dataset_to_index": start + T,
            }
            self._buffer.append(table)
            self._buffer_bytes += table.nbytes
            self._data_bytes += table.nbytes
            if self._buffer_bytes >= _BUFFER_BYTES:
                self._flush_buffer()

            # videos
            for key in self.video_keys:
                enc = self._encoders[key]
                if enc is not None and enc.size_bytes >= self.video_files_size_mb * 1024 * 1024:
                    self._close_video(key)
                    self._video_pos[key].advance()
                    enc = None
                if enc is None:
                    enc = self._open_video(key)
                from_ts = enc.num_frames / self.fps
                enc.write(arrays[key])
                row[f"videos/{key}/chunk_index"] = self._video_pos[key].chunk
                row[f"videos/{key}/file_index"] = self._video_pos[key].file
                row[f"videos/{key}/from_timestamp"] = from_ts
                row[f"videos/{key}/to_timestamp"] = enc.num_frames / self.fps
        except BaseException:
            self.abort()
            raise

        # per-episode stats
        stats: dict[str, dict[str, np.ndarray]] = {}
        for key, ft in self.features.items():
            if ft["dtype"] in ("video", "image"):
                stats[key] = compute_image_stats(arrays[key])
            elif ft["dtype"] != "string":
                stats[key] = compute_feature_stats(arrays[key], tuple(ft["shape"]))
        std_vals = {
            "timestamp": frame_index / self.fps,
            "frame_index": frame_index,
            "episode_index": np.full(T, ep),
            "index": start + frame_index,
            "task_index": np.full(T, task_index),
        }
        for key, vals in std_vals.items():
            stats[key] = compute_feature_stats(vals, (1,))
        row["meta/episodes/chunk_index"] = 0
        row["meta/episodes/file_index"] = 0
        self._episodes.append(row)
        self._ep_stats.append(stats)
        self._num_frames += T
        return ep

    # -- files -----------------------------------------------------------------------------
    def _data_path(self) -> Path:
        return self.tmp / V3_DATA_PATH.format(chunk_index=self._data_pos.chunk, file_index=self._data_pos.file)

    def _flush_buffer(self) -> None:
        if not self._buffer:
            return
        if self._data_writer is None:
            path = self._data_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            self._data_writer = pq.ParquetWriter(path, self._schema, compression="snappy")
        self._data_writer.write_table(pa.concat_tables(self._buffer), row_group_size=1 << 20)
        self._buffer, self._buffer_bytes = [], 0

    def _close_data_file(self) -> None:
        self._flush_buffer()
        if self._data_writer is not None:
            self._data_writer.close()
            self._data_writer = None
        self._data_bytes = 0

    def _open_video(self, key: str) -> VideoEncoder:
        pos = self._video_pos[key]
        path = self.tmp / V3_VIDEO_PATH.format(video_key=key, chunk_index=pos.chunk, file_index=pos.file)
        h, w, _ = self.features[key]["shape"]
        enc = VideoEncoder(
            path, self.fps, w, h, codec=self.video_codec, crf=self.crf, gop=self.gop, options=self.video_options
        )
        if key not in self._video_meta:
            if enc.encoder not in _ENCODER_CANDIDATES.get(self.video_codec, [self.video_codec]):
                warnings.warn(
                    f"video codec {self.video_codec!r} is unavailable here; {key!r} is encoded with {enc.encoder} ({enc.codec})",
                    RuntimeWarning,
                    stacklevel=3,
                )
            self._video_meta[key] = {
                "video.height": h,
                "video.width": w,
                "video.codec": enc.codec,
                "video.pix_fmt": enc.pix_fmt,
                "video.is_depth_map": False,
                "video.fps": self.fps,
                "video.channels": 3,
                "has_audio": False,
                "video.encoder": enc.encoder,
                "video.crf": self.crf,
                "video.g": self.gop,
            }
        self._encoders[key] = enc
        return enc

    def _close_video(self, key: str) -> None:
        enc = self._encoders.get(key)
        if enc is not None:
            enc.close()
        self._encoders[key] = None

    # -- finish ----------------------------------------------------------------------------
    def finalize(self) -> Path:
        """Write the metadata and move the dataset into place at ``root``; returns ``root``."""
        if self._state != "open":
            raise RuntimeError(f"writer is {self._state}")
        if not self._episodes:
            self.abort()
            raise ValueError(f"{self.root}: no episodes were added; nothing written")
        try:
            self._close_data_file()
            for key in self.video_keys:
                self._close_video(key)
            self._write_meta()
        except BaseException:
            self.abort()
            raise
        try:
            self._check_root()
        except FileExistsError as e:
            # something appeared at root while writing: keep the finished (hidden) dataset
            self._state = "failed"
            raise FileExistsError(f"{e}; the complete dataset was left at {self.tmp}") from None
        try:
            self._move_into_place()
        except BaseException:
            self.abort()
            raise
        self._state = "finalized"
        return self.root

    def _write_meta(self) -> None:
        meta = self.tmp / "meta"
        (meta / "episodes" / "chunk-000").mkdir(parents=True, exist_ok=True)
        tasks = sorted(self._tasks, key=self._tasks.get)
        pq.write_table(_tasks_table(tasks), meta / "tasks.parquet")

        rows = []
        for row, st in zip(self._episodes, self._ep_stats):
            r = dict(row)
            for key, s in st.items():
                for name, v in s.items():
                    r[f"stats/{key}/{name}"] = np.asarray(v).tolist()
            rows.append(r)
        cols = list(rows[0].keys())
        table = pa.table({c: [r[c] for r in rows] for c in cols})
        pq.write_table(table, meta / "episodes" / "chunk-000" / "file-000.parquet")

        stats: dict[str, dict] = {}
        numeric = [k for k, ft in self.features.items() if ft["dtype"] not in ("video", "image", "string")]
        numeric += list(STANDARD_FEATURES)
        data_files = sorted((self.tmp / "data").glob("chunk-*/file-*.parquet"))
        for key in numeric:
            ft = self.features.get(key) or STANDARD_FEATURES[key]
            vals = np.concatenate(
                [arrow_to_numpy(pq.read_table(f, columns=[key]).column(key), f"{f}: {key}") for f in data_files]
            )
            stats[key] = to_jsonable(compute_feature_stats(vals, tuple(ft["shape"])))
        for key in self.video_keys + self.image_keys:
            stats[key] = to_jsonable(aggregate_stats([s[key] for s in self._ep_stats]))
        write_json(meta / "stats.json", stats, indent=4, ensure_ascii=False)

        features = {}
        for key, ft in self.features.items():
            ft = dict(ft)
            if key in self._video_meta:
                ft["info"] = self._video_meta[key]
            features[key] = ft
        features.update({k: dict(v) for k, v in STANDARD_FEATURES.items()})
        n = len(self._episodes)
        info = {
            "codebase_version": "v3.0",
            "robot_type": self.robot_type,
            "total_episodes": n,
            "total_frames": self._num_frames,
            "total_tasks": len(tasks),
            "chunks_size": self.chunks_size,
            "data_files_size_in_mb": self.data_files_size_mb,
            "video_files_size_in_mb": self.video_files_size_mb,
            "fps": self.fps,
            "splits": {"train": f"0:{n}"},
            "data_path": V3_DATA_PATH,
            "video_path": V3_VIDEO_PATH if self.video_keys else None,
            "features": features,
        }
        write_json(meta / "info.json", info, indent=4, ensure_ascii=False)  # last: its presence marks a complete dataset

    def _move_into_place(self) -> None:
        old = None
        if self.root.exists():
            if any(self.root.iterdir()):
                old = self.root.parent / f".{self.root.name}.replaced-{uuid.uuid4().hex[:8]}"
                self.root.rename(old)
            else:
                self.root.rmdir()
        try:
            self.tmp.rename(self.root)
        except BaseException:
            if old is not None and not self.root.exists():
                old.rename(self.root)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Drop everything written so far; ``root`` is left as it was."""
        if getattr(self, "_state", None) != "open":
            return
        self._state = "aborted"
        for key, enc in list(getattr(self, "_encoders", {}).items()):
            if enc is not None:
                enc.abort()
            self._encoders[key] = None
        if getattr(self, "_data_writer", None) is not None:
            try:
                self._data_writer.close()
            except Exception:  # noqa: BLE001
                pass
            self._data_writer = None
        self._buffer = []
        shutil.rmtree(self.tmp, ignore_errors=True)


def _png_bytes(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
