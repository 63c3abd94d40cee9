"""Read LeRobot datasets (layouts v2.1 and v3.0) from a local folder.

Layouts (docs/design.md, section 6):

* v2.0 / v2.1 -- ``meta/info.json``, ``meta/episodes.jsonl``, ``meta/tasks.jsonl``
  (``meta/episodes_stats.jsonl`` is not needed for reading), one parquet file per episode at
  ``data_path`` (``data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet``) and one
  video per episode and camera at ``video_path``
  (``videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4``).
  Image features live in the parquet (struct ``{bytes, path}``) or as files
  ``images/<key>/episode_XXXXXX/frame_XXXXXX.png``.
* v3.0 -- ``meta/info.json``, ``meta/tasks.parquet``, ``meta/episodes/chunk-XXX/file-XXX.parquet``
  (one row per episode: ``episode_index``, ``tasks``, ``length``, ``data/chunk_index``,
  ``data/file_index``, ``dataset_from_index``, ``dataset_to_index`` and per camera
  ``videos/<key>/chunk_index``, ``videos/<key>/file_index``, ``videos/<key>/from_timestamp``,
  ``videos/<key>/to_timestamp``), many episodes per data file and per video file. A frame of an
  episode is shown in its video file at ``from_timestamp + timestamp``.

Everything cheap is validated on open (meta files, declared keys in every parquet schema,
episode row counts and frame order, task indices, NaN/inf in ``action`` / ``observation.state``,
video durations from the container headers); video frames are additionally checked exactly when
decoded. Every problem raises :class:`DatasetError` naming file, episode and key.

Episode numbers passed to the methods are ``episode_index`` values (for every standard dataset
the same as the position in :attr:`LeRobotDataset.episodes`). Arrays returned by
:meth:`LeRobotDataset.episode_data` come from a cache and are read-only.
"""

from __future__ import annotations

import io
import json
import math
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .video import DatasetError, VideoReaderPool, probe_video
from ..jsonio import read_json

__all__ = ["DatasetError", "Episode", "LeRobotDataset", "STANDARD_COLUMNS"]

STANDARD_COLUMNS = ("timestamp", "frame_index", "episode_index", "index", "task_index")
V2_DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
V2_VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
V3_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
V3_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
# image files, v2.x naming first, then the v3.0 naming
IMAGE_DIR_PATTERNS = ("images/{key}/episode_{ep:06d}", "images/{key}/episode-{ep:06d}")
IMAGE_FILE_PATTERNS = ("frame_{i:06d}", "frame-{i:06d}")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# columns whose values must be finite: exact names and their dotted sub-keys
FINITE_KEYS = ("action", "observation.state")


@dataclass(frozen=True)
class Episode:
    index: int  # episode_index
    length: int  # number of frames
    tasks: tuple[str, ...]
    data_start: int  # row of frame 0 in the arrays returned by LeRobotDataset.column()


@dataclass
class _Record:
    """Where an episode lives (internal)."""

    data_file: Path
    rows: np.ndarray  # positions in data_file, in frame order
    timestamps: np.ndarray  # float64 (T,), the episode's timestamp column
    task_index: np.ndarray | None  # int64 (T,) or None when the column is absent
    videos: dict[str, tuple[Path, float]]  # key -> (file, from_timestamp)


class _LRU:
    def __init__(self, maxsize: int):
        self.maxsize = max(0, int(maxsize))
        self._d: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
            return None

    def put(self, key, value) -> None:
        if self.maxsize == 0:
            return
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.maxsize:
                self._d.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()


# ----------------------------------------------------------------------------------------------
# small helpers


def _rel(root: Path, p: Path) -> str:
    try:
        return str(p.relative_to(root))
    except ValueError:
        return str(p)


def _is_float_type(t: pa.DataType) -> bool:
    while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        t = t.value_type
    return pa.types.is_floating(t)


def _is_image_struct(t: pa.DataType) -> bool:
    return pa.types.is_struct(t) and {t.field(i).name for i in range(t.num_fields)} >= {"bytes"}


def arrow_to_numpy(col: pa.ChunkedArray | pa.Array, where: str = "") -> np.ndarray:
    """Arrow column -> numpy. (Nested) lists of equal length become (N, d1, ...) arrays."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    t = arr.type
    if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
        if arr.null_count:
            raise DatasetError(f"{where}: {arr.null_count} null rows in a vector column")
        shape = [n]
        cur = arr
        while pa.types.is_fixed_size_list(cur.type) or pa.types.is_list(cur.type) or pa.types.is_large_list(cur.type):
            if pa.types.is_fixed_size_list(cur.type):
                d = cur.type.list_size
            else:
                lens = pc.list_value_length(cur)
                if len(lens) == 0:
                    d = 0
                else:
                    mm = pc.min_max(lens)
                    lo, hi = mm["min"].as_py(), mm["max"].as_py()
                    if lo != hi:
                        raise DatasetError(f"{where}: rows hold lists of different lengths ({lo}..{hi})")
                    d = lo
            shape.append(d)
            cur = cur.flatten()
        values = cur.to_numpy(zero_copy_only=False)
        if values.dtype == object:
            return np.array(values.tolist(), dtype=object).reshape(shape) if values.size else values
        return values.reshape(shape)
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        if arr.null_count:
            if pa.types.is_floating(t):
                return arr.to_numpy(zero_copy_only=False)  # nulls -> NaN
            raise DatasetError(f"{where}: {arr.null_count} null values")
        return arr.to_numpy(zero_copy_only=False)
    return np.array(arr.to_pylist(), dtype=object)


def _map(fn, items: list) -> list:
    """``[fn(x) for x in items]``, on a few threads when there are many (I/O bound; in order)."""
    if len(items) < 16:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as ex:
        return list(ex.map(fn, items))


def _declared_hw(ft: dict) -> tuple[int, int] | None:
    """(height, width) from a visual feature's shape/names, or None when unclear."""
    shape = list(ft.get("shape") or [])
    names = [str(n).lower() for n in (ft.get("names") or [])] if isinstance(ft.get("names"), list) else []
    if len(shape) != 3:
        return None
    if "height" in names and "width" in names and len(names) == 3:
        return int(shape[names.index("height")]), int(shape[names.index("width")])
    if shape[2] in (1, 3, 4):
        return int(shape[0]), int(shape[1])
    if shape[0] in (1, 3, 4):
        return int(shape[1]), int(shape[2])
    return None


def _fill(template: str, **values) -> str:
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as e:
        raise DatasetError(f"meta/info.json: cannot fill path template {template!r}: {e!r}") from e


def _read_json(path: Path) -> Any:
    return read_json(path, "metadata file", error=DatasetError)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise DatasetError(f"{path}: missing metadata file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}: line {lineno}: invalid JSON: {e}") from e
    return rows


def _read_parquet(path: Path, columns: list[str] | None = None, what: str = "") -> pa.Table:
    if not path.is_file():
        raise DatasetError(f"{path}: missing {what or 'parquet'} file")
    try:
        return pq.read_table(path, columns=columns, memory_map=True)
    except (pa.ArrowException, OSError) as e:
        raise DatasetError(f"{path}: cannot read parquet: {e}") from e


# ----------------------------------------------------------------------------------------------


CAPTURE_FILE = "capture.json"


def _read_capture(path: Path) -> dict[str, Any]:
    """``meta/capture.json``, written by our collectors: how the frames were captured, e.g.
    ``{"env": "metaworld", "cameras": {"observation.images.image": "corner4_zoom"}}``. Not part of
    the LeRobot format; {} when absent. Checkpoints keep it so evaluation renders the same views."""
    if not path.is_file():
        return {}
    d = _read_json(path)
    cams = d.get("cameras", {}) if isinstance(d, dict) else None
    if not isinstance(cams, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in cams.items()):
        raise DatasetError(f"{path}: expected a JSON object whose 'cameras' maps camera keys to view names")
    return d


class LeRobotDataset:
    """A LeRobot dataset (v2.0/v2.1 or v3.0) in a local folder.

    Parameters beyond ``root`` are optional tuning knobs: ``check_videos`` probes every video
    header on open (cheap; turn off for huge v2.1 datasets if opening is slow),
    ``max_open_videos`` bounds the cache of open decoders, ``episode_cache`` the number of
    cached :meth:`episode_data` results.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        check_videos: bool = True,
        max_open_videos: int = 32,
        episode_cache: int = 256,
    ):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: dataset folder not found")
        info_path = self.root / "meta" / "info.json"
        if not info_path.is_file():
            raise DatasetError(f"{info_path}: missing metadata file (is this a LeRobot dataset?)")
        info = _read_json(info_path)
        if not isinstance(info, dict):
            raise DatasetError(f"{info_path}: expected a JSON object")
        self.info: dict = info
        version = str(info.get("codebase_version", ""))
        if version not in ("v2.0", "v2.1", "v3.0"):
            raise DatasetError(
                f"{info_path}: unsupported codebase_version {version!r} (supported: v2.0, v2.1, v3.0)"
            )
        self.version = version
        try:
            self.fps = float(info["fps"])
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{info_path}: missing or invalid 'fps'") from e
        if not (self.fps > 0 and math.isfinite(self.fps)):
            raise DatasetError(f"{info_path}: invalid fps {info.get('fps')!r}")
        self.robot_type = info.get("robot_type")
        self.capture = _read_capture(self.root / "meta" / CAPTURE_FILE)
        feats = info.get("features")
        if not isinstance(feats, dict) or not feats:
            raise DatasetError(f"{info_path}: missing 'features'")
        for k, ft in feats.items():
            if not isinstance(ft, dict) or "dtype" not in ft:
                raise DatasetError(f"{info_path}: feature {k!r} has no dtype")
        self.features: dict[str, dict] = feats
        self.video_keys = [k for k, ft in feats.items() if ft["dtype"] == "video"]
        self.image_keys = [k for k, ft in feats.items() if ft["dtype"] == "image"]
        self._visual = set(self.video_keys) | set(self.image_keys)
        self._check_videos = check_videos
        self._episode_cache_size = episode_cache
        self._max_open_videos = max_open_videos
        self._init_runtime()

        self.tasks: list[str] = []
        self.episodes: list[Episode] = []
        self._records: dict[int, _Record] = {}
        self._pos: dict[int, int] = {}
        self._image_files: set[tuple[str, Path]] = set()  # (key, data file) whose images are files
        if version.startswith("v2"):
            metas = self._load_meta_v2()
        else:
            metas = self._load_meta_v3()
        self._load_data(metas)
        if self._check_videos:
            self._validate_videos()
        self.num_episodes = len(self.episodes)
        self.num_frames = sum(e.length for e in self.episodes)
        self._check_totals(info_path)

    def _check_totals(self, info_path: Path) -> None:
        """``info.json``'s ``total_frames`` / ``total_episodes`` against the episodes actually found."""
        for key, have in (("total_frames", self.num_frames), ("total_episodes", self.num_episodes)):
            want = self.info.get(key)
            if want is None:
                continue
            try:
                want_i = int(want)
            except (TypeError, ValueError):
                raise DatasetError(f"{info_path}: {key} must be an integer, got {str(want)[:40]!r}") from None
            if want_i != have:
                raise DatasetError(f"{info_path}: {key} is {want_i} but the episode metadata and data files hold "
                                   f"{have}")

    # -- runtime state (not pickled) -------------------------------------------------------
    def _init_runtime(self) -> None:
        self._videos = VideoReaderPool(self._max_open_videos)
        self._ep_cache = _LRU(self._episode_cache_size)
        self._table_cache = _LRU(4)
        self._image_dirs: dict[tuple[str, int], tuple[Path, str, str]] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        for k in ("_videos", "_ep_cache", "_table_cache", "_image_dirs"):
            state.pop(k, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_runtime()

    def close(self) -> None:
        self._videos.close()
        self._ep_cache.clear()
        self._table_cache.clear()

    def __enter__(self) -> "LeRobotDataset":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"LeRobotDataset({str(self.root)!r}, version={self.version}, episodes={len(self.episodes)}, "
            f"frames={sum(e.length for e in self.episodes)}, fps={self.fps:g}, videos={self.video_keys}, "
            f"images={self.image_keys})"
        )

    # -- metadata --------------------------------------------------------------------------
    def _load_meta_v2(self) -> list[dict]:
        meta = self.root / "meta"
        task_rows = _read_jsonl(meta / "tasks.jsonl")
        tasks: dict[int, str] = {}
        for r in task_rows:
            if "task_index" not in r or "task" not in r:
                raise DatasetError(f"{meta / 'tasks.jsonl'}: row without task_index/task: {r}")
            tasks[int(r["task_index"])] = str(r["task"])
        self.tasks = self._task_list(tasks, meta / "tasks.jsonl")
        rows = _read_jsonl(meta / "episodes.jsonl")
        if not rows:
            raise DatasetError(f"{meta / 'episodes.jsonl'}: no episodes")
        data_tpl = self.info.get("data_path") or V2_DATA_PATH
        video_tpl = self.info.get("video_path") or V2_VIDEO_PATH
        chunks_size = int(self.info.get("chunks_size") or 1000)
        metas = []
        for r in rows:
            if "episode_index" not in r or "length" not in r:
                raise DatasetError(f"{meta / 'episodes.jsonl'}: row without episode_index/length: {r}")
            ep = int(r["episode_index"])
            chunk = ep // chunks_size
            fmt = dict(episode_chunk=chunk, chunk_index=chunk, episode_index=ep)
            videos = {}
            for key in self.video_keys:
                videos[key] = (self.root / _fill(video_tpl, video_key=key, **fmt), 0.0, None)
            metas.append(
                dict(
                    index=ep,
                    length=int(r["length"]),
                    tasks=tuple(str(t) for t in (r.get("tasks") or [])),
                    data_file=self.root / _fill(data_tpl, **fmt),
                    videos=videos,
                    meta_file=meta / "episodes.jsonl",
                )
            )
        return metas

    def _task_list(self, tasks: dict[int, str], where: Path) -> list[str]:
        if not tasks:
            return []
        n = max(tasks) + 1
        missing = [i for i in range(n) if i not in tasks]
        if missing or min(tasks) < 0:
            raise DatasetError(f"{where}: task indices are not 0..{n - 1} (missing {missing[:5]})")
        return [tasks[i] for i in range(n)]

    def _load_meta_v3(self) -> list[dict]:
        meta = self.root / "meta"
        tpath = meta / "tasks.parquet"
        tt = _read_parquet(tpath, what="metadata")
        names = tt.column_names
        if "task_index" not in names:
            raise DatasetError(f"{tpath}: no 'task_index' column (columns: {names})")
        task_col = None
        if "task" in names:
            task_col = "task"
        else:
            pmeta = (tt.schema.metadata or {}).get(b"pandas")
            if pmeta:
                idx_cols = [c for c in json.loads(pmeta).get("index_columns", []) if isinstance(c, str)]
                task_col = next((c for c in idx_cols if c in names), None)
            if task_col is None:
                strs = [f.name for f in tt.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
                task_col = strs[0] if len(strs) == 1 else None
        if task_col is None:
            raise DatasetError(f"{tpath}: cannot find the task text column (columns: {names})")
        tasks = dict(
            zip((int(i) for i in tt.column("task_index").to_pylist()), (str(s) for s in tt.column(task_col).to_pylist()))
        )
        self.tasks = self._task_list(tasks, tpath)

        ep_dir = meta / "episodes"
        files = sorted(ep_dir.glob("chunk-*/file-*.parquet")) if ep_dir.is_dir() else []
        if not files:
            raise DatasetError(f"{ep_dir}: missing episode metadata (no chunk-*/file-*.parquet)")
        data_tpl = self.info.get("data_path") or V3_DATA_PATH
        video_tpl = self.info.get("video_path") or V3_VIDEO_PATH
        metas = []
        for f in files:
            try:
                schema_names = set(pq.read_schema(f).names)
            except (pa.ArrowException, OSError) as e:
                raise DatasetError(f"{f}: cannot read parquet: {e}") from e
            need = ["episode_index", "length", "data/chunk_index", "data/file_index"]
            for key in self.video_keys:
                need += [f"videos/{key}/chunk_index", f"videos/{key}/file_index", f"videos/{key}/from_timestamp"]
            missing = [c for c in need if c not in schema_names]
            if missing:
                raise DatasetError(f"{f}: episode metadata lacks column(s) {missing}")
            opt = [c for c in ["tasks", "dataset_from_index", "dataset_to_index"] if c in schema_names]
            opt += [f"videos/{k}/to_timestamp" for k in self.video_keys if f"videos/{k}/to_timestamp" in schema_names]
            t = _read_parquet(f, columns=need + opt, what="metadata").to_pydict()
            for i in range(len(t["episode_index"])):
                ep = int(t["episode_index"][i])
                length = int(t["length"][i])
                if "dataset_from_index" in t and "dataset_to_index" in t:
                    span = int(t["dataset_to_index"][i]) - int(t["dataset_from_index"][i])
                    if span != length:
                        raise DatasetError(
                            f"{f}: episode {ep}: dataset_to_index - dataset_from_index = {span} "
                            f"but length = {length}"
                        )
                dfile = self.root / _fill(
                    data_tpl, chunk_index=int(t["data/chunk_index"][i]), file_index=int(t["data/file_index"][i])
                )
                videos = {}
                for key in self.video_keys:
                    vfile = self.root / _fill(
                        video_tpl,
                        video_key=key,
                        chunk_index=int(t[f"videos/{key}/chunk_index"][i]),
                        file_index=int(t[f"videos/{key}/file_index"][i]),
                    )
                    to_ts = t.get(f"videos/{key}/to_timestamp")
                    videos[key] = (
                        vfile,
                        float(t[f"videos/{key}/from_timestamp"][i]),
                        None if to_ts is None or to_ts[i] is None else float(to_ts[i]),
                    )
                tasks_i = t["tasks"][i] if "tasks" in t else None
                if isinstance(tasks_i, str):
                    tasks_i = [tasks_i]
                metas.append(
                    dict(
                        index=ep,
                        length=length,
                        tasks=tuple(str(x) for x in (tasks_i or [])),
                        data_file=dfile,
                        videos=videos,
                        meta_file=f,
                    )
                )
        if not metas:
            raise DatasetError(f"{ep_dir}: no episodes")
        return metas

    # -- data files ------------------------------------------------------------------------
    def _load_data(self, metas: list[dict]) -> None:
        seen: dict[int, Path] = {}
        for m in metas:
            if m["index"] in seen:
                raise DatasetError(f"{m['meta_file']}: episode {m['index']} is listed twice")
            if m["length"] <= 0:
                raise DatasetError(f"{m['meta_file']}: episode {m['index']}: length {m['length']} <= 0")
            seen[m["index"]] = m["meta_file"]
        metas = sorted(metas, key=lambda m: m["index"])
        by_file: dict[Path, list[dict]] = OrderedDict()
        for m in metas:
            by_file.setdefault(m["data_file"], []).append(m)

        per_ep: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
        for res in _map(lambda item: self._scan_data_file(*item), list(by_file.items())):
            per_ep.update(res)

        start = 0
        for m in metas:
            ep = m["index"]
            rows, ts, ti = per_ep[ep]
            tasks = m["tasks"]
            if not tasks and ti is not None:
                tasks = tuple(self.tasks[i] for i in dict.fromkeys(ti.tolist()))
            self.episodes.append(Episode(index=ep, length=m["length"], tasks=tasks, data_start=start))
            self._records[ep] = _Record(
                data_file=m["data_file"],
                rows=rows,
                timestamps=ts,
                task_index=ti,
                videos={k: (v[0], v[1]) for k, v in m["videos"].items()},
            )
            self._pos[ep] = len(self.episodes) - 1
            start += m["length"]
        self._metas = {m["index"]: m for m in metas}

    def _scan_data_file(self, dfile: Path, ms: list[dict]) -> dict:
        eps = [m["index"] for m in ms]
        ep_desc = f"episode {eps[0]}" if len(eps) == 1 else f"episodes {eps[0]}..{eps[-1]}"
        if not dfile.is_file():
            raise DatasetError(f"{dfile}: missing data file ({ep_desc})")
        try:
            schema = pq.read_schema(dfile)
        except (pa.ArrowException, OSError) as e:
            raise DatasetError(f"{dfile}: cannot read parquet ({ep_desc}): {e}") from e
        names = set(schema.names)
        for key, ft in self.features.items():
            if ft["dtype"] == "video" or key in names:
                continue
            if ft["dtype"] == "image" and all(self._image_dir(key, m["index"]) is not None for m in ms):
                self._image_files.add((key, dfile))
                continue
            if ft["dtype"] == "image":
                raise DatasetError(
                    f"{dfile}: {ep_desc}: declared image key {key!r} is neither a parquet column nor stored "
                    f"as files under {self.root / 'images' / key}"
                )
            raise DatasetError(f"{dfile}: {ep_desc}: declared key {key!r} is missing from the parquet file")
        for key in ("episode_index", "frame_index"):
            if key not in names:
                raise DatasetError(f"{dfile}: {ep_desc}: standard column {key!r} is missing")
        finite = [
            k
            for k in names
            if any(k == f or k.startswith(f + ".") for f in FINITE_KEYS) and _is_float_type(schema.field(k).type)
        ]
        cols = ["episode_index", "frame_index"] + [c for c in ("timestamp", "task_index") if c in names] + finite
        t = _read_parquet(dfile, columns=cols)
        ep_col = arrow_to_numpy(t.column("episode_index"), f"{dfile}: key 'episode_index'").astype(np.int64)
        fr_col = arrow_to_numpy(t.column("frame_index"), f"{dfile}: key 'frame_index'").astype(np.int64)
        ts_col = (
            arrow_to_numpy(t.column("timestamp"), f"{dfile}: key 'timestamp'").astype(np.float64)
            if "timestamp" in names
            else None
        )
        ti_col = (
            arrow_to_numpy(t.column("task_index"), f"{dfile}: key 'task_index'").astype(np.int64)
            if "task_index" in names
            else None
        )
        fin_cols = {k: arrow_to_numpy(t.column(k), f"{dfile}: key {k!r}") for k in finite}
        for k, v in fin_cols.items():
            self._check_width(dfile, ep_desc, k, tuple(v.shape[1:]))
        for k in names:  # fixed-size vector columns: their width is in the parquet schema itself
            ft = self.features.get(k)
            typ = schema.field(k).type
            if ft is None or k in fin_cols or ft["dtype"] in ("video", "image") or not pa.types.is_fixed_size_list(typ):
                continue
            self._check_width(dfile, ep_desc, k, (typ.list_size,))

        wanted = set(eps)
        present = np.unique(ep_col)
        stray = [int(e) for e in present if int(e) not in wanted]
        if stray:
            raise DatasetError(
                f"{dfile}: holds rows of episode(s) {stray[:5]} that the episode metadata does not place "
                f"in this file"
            )
        order = np.argsort(ep_col, kind="stable")
        sorted_eps = ep_col[order]
        out = {}
        for m in ms:
            ep, length = m["index"], m["length"]
            lo, hi = np.searchsorted(sorted_eps, [ep, ep + 1])
            rows = order[lo:hi]
            if rows.size != length:
                raise DatasetError(
                    f"{dfile}: episode {ep}: {rows.size} rows in the data file but length {length} in "
                    f"{_rel(self.root, m['meta_file'])}"
                )
            frames = fr_col[rows]
            fo = np.argsort(frames, kind="stable")
            rows, frames = rows[fo], frames[fo]
            if not np.array_equal(frames, np.arange(length)):
                bad = int(np.flatnonzero(frames != np.arange(length))[0])
                raise DatasetError(
                    f"{dfile}: episode {ep}, key 'frame_index': frame indices are not 0..{length - 1} "
                    f"(position {bad} holds {int(frames[bad])})"
                )
            for k, v in fin_cols.items():
                vals = v[rows]
                ok = np.isfinite(vals.reshape(length, -1)) if vals.size else np.ones((length, 1), bool)
                if not ok.all():
                    bad_frames = np.flatnonzero(~ok.all(axis=1))
                    raise DatasetError(
                        f"{dfile}: episode {ep}, key {k!r}: {int((~ok).sum())} non-finite value(s) (NaN/inf), "
                        f"first at frame {int(bad_frames[0])}"
                    )
            ts = ts_col[rows] if ts_col is not None else np.arange(length, dtype=np.float64) / self.fps
            if ts_col is not None and not np.all(np.isfinite(ts)):
                raise DatasetError(f"{dfile}: episode {ep}, key 'timestamp': non-finite timestamps")
            ti = ti_col[rows] if ti_col is not None else None
            if ti is not None and ti.size and (ti.min() < 0 or ti.max() >= len(self.tasks)):
                raise DatasetError(
                    f"{dfile}: episode {ep}, key 'task_index': value {int(ti.max() if ti.max() >= len(self.tasks) else ti.min())} "
                    f"is not a task of meta/tasks ({len(self.tasks)} tasks)"
                )
            out[ep] = (rows, ts, ti)
        return out

    def _check_width(self, dfile: Path, ep_desc: str, key: str, have: tuple[int, ...]) -> None:
        """A column's per-row shape against the shape ``info.json`` declares for it."""
        ft = self.features.get(key)
        if ft is None or ft.get("shape") is None:
            return
        try:
            want = tuple(int(x) for x in ft["shape"])
        except (TypeError, ValueError):
            raise DatasetError(f"{self.root / 'meta' / 'info.json'}: feature {key!r} has shape "
                               f"{str(ft['shape'])[:60]}, not a list of integers") from None
        squeeze = lambda s: tuple(x for x in s if x != 1)  # noqa: E731 - (2,) == (2, 1); () == (1,)
        if squeeze(have) != squeeze(want):
            raise DatasetError(f"{dfile}: {ep_desc}, key {key!r}: the column holds rows of shape {list(have)} but "
                               f"meta/info.json declares shape {list(want)}")

    def _validate_videos(self) -> None:
        """Header-level check that every video file exists and covers its episodes' timestamps."""
        need: dict[tuple[str, Path], list[tuple[int, float, float | None]]] = OrderedDict()
        for ep in self._records:
            rec = self._records[ep]
            for key, (vfile, from_ts) in rec.videos.items():
                to_ts = self._metas[ep]["videos"][key][2]
                need.setdefault((key, vfile), []).append((ep, from_ts + float(rec.timestamps[-1]), to_ts))
                if to_ts is not None and to_ts + 0.5 / self.fps < from_ts + float(rec.timestamps[-1]):
                    raise DatasetError(
                        f"{vfile}: episode {ep}, key {key!r}: to_timestamp {to_ts:.4f}s ends before the episode's "
                        f"last frame at {from_ts + float(rec.timestamps[-1]):.4f}s (from_timestamp {from_ts:.4f}s)")
        half = 0.5 / self.fps

        def probe(item):
            (key, vfile), items = item
            if not vfile.is_file():
                raise DatasetError(f"{vfile}: missing video file (episode {items[0][0]}, key {key!r})")
            return probe_video(vfile)

        for ((key, vfile), items), info in zip(need.items(), _map(probe, list(need.items()))):
            hw = _declared_hw(self.features[key])
            if hw is not None and hw != (info.height, info.width):
                raise DatasetError(
                    f"{vfile}: episode {items[0][0]}, key {key!r}: video is {info.height}x{info.width} "
                    f"but info.json declares {hw[0]}x{hw[1]}"
                )
            if info.end is None:
                continue
            ep_to = max((x for x in items if x[2] is not None), key=lambda x: x[2], default=None)
            if ep_to is not None and ep_to[2] > info.end + half + 1e-6:
                # header says the range runs past the file: confirm with the exact frame times
                frame_times = self._videos.get(vfile).frame_times
                end = float(frame_times[-1]) + 1.0 / self.fps if frame_times.size else 0.0
                if ep_to[2] > end + half + 1e-6:
                    raise DatasetError(
                        f"{vfile}: episode {ep_to[0]}, key {key!r}: to_timestamp {ep_to[2]:.4f}s is past the end of "
                        f"the video ({frame_times.size} frames, last at t={end - 1.0 / self.fps:.4f}s)")
            ep, last, _ = max(items, key=lambda x: x[1])
            if last > info.end - half + 1e-6:
                # header says too short: confirm with the exact frame index before failing
                frame_times = self._videos.get(vfile).frame_times
                if last >= frame_times[-1] + half:
                    raise DatasetError(
                        f"{vfile}: episode {ep}, key {key!r}: video is too short: its last frame is at "
                        f"t={frame_times[-1]:.4f}s ({frame_times.size} frames) but the episode needs a "
                        f"frame at t={last:.4f}s"
                    )

    # -- public API ------------------------------------------------------------------------
    def _record(self, ep: int) -> _Record:
        try:
            return self._records[int(ep)]
        except KeyError:
            raise IndexError(f"episode {ep} is not in {self.root} ({len(self.episodes)} episodes)") from None

    def episode(self, ep: int) -> Episode:
        """The :class:`Episode` with episode_index ``ep``."""
        self._record(ep)
        return self.episodes[self._pos[int(ep)]]

    def _file_table(self, dfile: Path, columns: tuple[str, ...]) -> pa.Table:
        key = (dfile, columns)
        t = self._table_cache.get(key)
        if t is None:
            t = _read_parquet(dfile, columns=list(columns))
            self._table_cache.put(key, t)
        return t

    def _nonvisual_columns(self, dfile: Path) -> tuple[str, ...]:
        schema = pq.read_schema(dfile)
        return tuple(n for n in schema.names if n not in self._visual and n != "__index_level_0__")

    def episode_data(self, ep: int) -> dict[str, np.ndarray]:
        """Every non-visual column of episode ``ep``, rows in frame order (read-only arrays)."""
        ep = int(ep)
        hit = self._ep_cache.get(ep)
        if hit is not None:
            return dict(hit)
        rec = self._record(ep)
        cols = self._nonvisual_columns(rec.data_file)
        table = self._file_table(rec.data_file, cols)
        sub = table.take(pa.array(rec.rows))
        out = {}
        for name in cols:
            a = arrow_to_numpy(sub.column(name), f"{rec.data_file}: episode {ep}, key {name!r}")
            a = np.ascontiguousarray(a)
            a.flags.writeable = False
            out[name] = a
        self._ep_cache.put(ep, out)
        return dict(out)

    def column(self, key: str) -> np.ndarray:
        """Non-visual column ``key`` over the whole dataset, episodes in order: shape (num_frames, ...)."""
        if key in self._visual:
            raise KeyError(f"{key!r} is a visual feature; use frames()")
        files: dict[Path, list[int]] = OrderedDict()
        for e in self.episodes:
            files.setdefault(self._records[e.index].data_file, []).append(e.index)

        def load(item):
            dfile, eps = item
            if key not in pq.read_schema(dfile).names:
                if key in self.features:
                    raise DatasetError(f"{dfile}: episode {eps[0]}: declared key {key!r} is missing")
                raise KeyError(f"{key!r} is not a column of {dfile}")
            col = arrow_to_numpy(_read_parquet(dfile, columns=[key]).column(key), f"{dfile}: key {key!r}")
            return {ep: col[self._records[ep].rows] for ep in eps}

        parts: dict[int, np.ndarray] = {}
        for res in _map(load, list(files.items())):
            parts.update(res)
        if not parts:
            return np.zeros((0,))
        return np.concatenate([parts[e.index] for e in self.episodes], axis=0)

    def _check_frames(self, rec: _Record, ep: int, frame_indices: Sequence[int]) -> np.ndarray:
        idx = np.asarray(frame_indices, dtype=np.int64).reshape(-1)
        length = rec.rows.size
        if idx.size and (idx.min() < 0 or idx.max() >= length):
            raise IndexError(f"episode {ep} has frames 0..{length - 1}; asked for {idx.tolist()}")
        return idx

    def frames(self, key: str, ep: int, frame_indices: Sequence[int]) -> np.ndarray:
        """uint8 (n, H, W, 3) frames of camera ``key``, decoded exactly at those frames' timestamps."""
        ep = int(ep)
        rec = self._record(ep)
        idx = self._check_frames(rec, ep, frame_indices)
        if idx.size == 0 and key in self._visual:
            h, w = _declared_hw(self.features[key]) or (0, 0)
            return np.zeros((0, h, w, 3), dtype=np.uint8)
        if key in self.video_keys:
            vfile, from_ts = rec.videos[key]
            times = from_ts + rec.timestamps[idx]
            try:
                return self._videos.read(vfile, times, tolerance=0.5 / self.fps)
            except DatasetError as e:
                raise DatasetError(f"{e} [episode {ep}, key {key!r}]") from e
        if key in self.image_keys:
            return self._image_frames(key, ep, rec, idx)
        raise KeyError(f"{key!r} is not a video or image feature (video: {self.video_keys}, image: {self.image_keys})")

    def task(self, ep: int, frame: int | None = None) -> str:
        """Instruction of episode ``ep`` at ``frame`` (via its task_index); the episode's first task if None."""
        ep = int(ep)
        rec = self._record(ep)
        e = self.episodes[self._pos[ep]]
        if frame is None:
            if e.tasks:
                return e.tasks[0]
            frame = 0
        if rec.task_index is None:
            if not e.tasks:
                raise DatasetError(f"{rec.data_file}: episode {ep}: no task_index column and no tasks listed")
            return e.tasks[0]
        if not 0 <= int(frame) < rec.task_index.size:
            raise IndexError(f"episode {ep} has frames 0..{rec.task_index.size - 1}; asked for {frame}")
        return self.tasks[int(rec.task_index[int(frame)])]

    # -- images ----------------------------------------------------------------------------
    def _image_dir(self, key: str, ep: int) -> tuple[Path, str, str] | None:
        hit = self._image_dirs.get((key, ep))
        if hit is not None:
            return hit
        for dpat, fpat in zip(IMAGE_DIR_PATTERNS, IMAGE_FILE_PATTERNS):
            d = self.root / dpat.format(key=key, ep=ep)
            if d.is_dir():
                for suf in IMAGE_SUFFIXES:
                    if (d / (fpat.format(i=0) + suf)).is_file():
                        self._image_dirs[(key, ep)] = (d, fpat, suf)
                        return self._image_dirs[(key, ep)]
        return None

    def _decode_image(self, data: bytes | Path, where: str) -> np.ndarray:
        from PIL import Image

        try:
            src = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
            with Image.open(src) as im:
                return np.asarray(im.convert("RGB"), dtype=np.uint8)
        except FileNotFoundError as e:
            raise DatasetError(f"{where}: image file not found") from e
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds
            raise DatasetError(f"{where}: cannot decode image: {e}") from e

    def _image_frames(self, key: str, ep: int, rec: _Record, idx: np.ndarray) -> np.ndarray:
        imgs = []
        if (key, rec.data_file) not in self._image_files:
            table = self._file_table(rec.data_file, (key,))
            sub = table.column(key).take(pa.array(rec.rows[idx])).to_pylist()
            for i, cell in zip(idx.tolist(), sub):
                where = f"{rec.data_file}: episode {ep}, key {key!r}, frame {i}"
                if isinstance(cell, dict):
                    if cell.get("bytes"):
                        imgs.append(self._decode_image(cell["bytes"], where))
                        continue
                    p = cell.get("path")
                    if p:
                        imgs.append(self._decode_image(self._resolve_image_path(key, ep, i, p), where))
                        continue
                elif isinstance(cell, (bytes, bytearray)):
                    imgs.append(self._decode_image(cell, where))
                    continue
                raise DatasetError(f"{where}: image cell holds neither bytes nor a path")
        else:
            d = self._image_dir(key, ep)
            if d is None:
                raise DatasetError(f"{self.root / 'images' / key}: episode {ep}, key {key!r}: no image folder")
            folder, fpat, suf = d
            for i in idx.tolist():
                p = folder / (fpat.format(i=i) + suf)
                imgs.append(self._decode_image(p, f"{p}: episode {ep}, key {key!r}, frame {i}"))
        if not imgs:
            return np.zeros((0, 0, 0, 3), dtype=np.uint8)
        shapes = {im.shape for im in imgs}
        if len(shapes) != 1:
            raise DatasetError(f"{rec.data_file}: episode {ep}, key {key!r}: images of different sizes {shapes}")
        return np.stack(imgs)

    def _resolve_image_path(self, key: str, ep: int, i: int, p: str) -> Path:
        cand = [Path(p), self.root / p]
        d = self._image_dir(key, ep)
        if d is not None:
            cand.append(d[0] / Path(p).name)
        for c in cand:
            if c.is_file():
                return c
        return cand[1]
