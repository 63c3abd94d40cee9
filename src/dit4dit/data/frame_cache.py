"""Pre-extracted frame cache: every frame decoded once, stored at the training resolution.

Decoding H.264 costs milliseconds per frame; a training sample reads ``num_cond_frames +
num_future_frames`` frames, so on a few CPU cores decoding limits training. The cache decodes
every frame of every episode ONCE (sequentially, which is the cheap way to decode), sends it
through the processor's own image path (:meth:`Processor.images`: per-camera flip, antialiased
resize to the camera's cell, cameras combined side by side or in a grid) and stores the result
as uint8 at the training resolution in a memory-mappable ``.npy``; training then reads frames
with a memory copy.

The frames are stored planar, ``(N_frames, 3, H, W)`` (each frame's R, G and B planes one after
the other), not ``(N_frames, H, W, 3)``: a sample is ``(3, T, H, W)`` channel-first, and
converting channel-last uint8 to channel-first float32 costs a strided gather per sample (about
2.9 ms of CPU for 9 frames at 224 x 224 on the 2-core reference machine, against 1.1 ms from
planar frames), which alone would use most of the budget of 500 samples/s on 2 cores.
:meth:`FrameCache.images` gives channel-last frames for viewing.

Layout of a cache directory (default ``<dataset>/.dit4dit_cache/frames-<fingerprint>/``)::

    frames.npy   uint8 (N, 3, H, W), episodes in dataset order (np.lib.format.open_memmap)
    index.json   format, version, per-episode offsets/lengths, the image settings, fingerprints

Exactness: the cache stores the uint8 canvas that :meth:`Processor.images` converts to float;
the builder recovers it from the processor's output and checks, frame by frame, that converting
it back (:func:`to_unit_float`, the same operations as the processor) gives bit-identical floats,
so a sample read from the cache equals the sample decoded from the videos exactly.

Staleness: ``index.json`` records a fingerprint of the dataset (the content of ``meta/info.json``,
of the episode metadata and of every data, video and image file: a file rewritten in place at the
same size changes it; hashing reads the dataset once per open, about 1 s per GB) and of the image settings
(cameras, flips, layout, resolution, resize method, torch version). A cache whose fingerprints
differ from the dataset/processor in use is never used: :func:`build_frame_cache` rebuilds it,
:func:`open_frame_cache` (what :class:`~dit4dit.data.samples.TrainingSamples` calls) raises
:class:`FrameCacheError` saying what changed.

Atomicity: the frames are written to a temporary file that is renamed (``os.replace``) into place
when complete, and ``index.json`` (written last, also through a temporary name) is what marks a
cache complete; a build that fails or is interrupted leaves no index, hence no usable cache.
"""

from __future__ import annotations

import contextlib

import hashlib
import json
import os
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..jsonio import write_json

__all__ = [
    "FrameCache",
    "FrameCacheError",
    "build_frame_cache",
    "open_frame_cache",
    "default_cache_dir",
    "dataset_fingerprint",
    "image_settings",
    "to_unit_float",
]

FORMAT = "dit4dit.frame_cache"
VERSION = 1
LAYOUT = "NCHW"
FRAMES_FILE = "frames.npy"
INDEX_FILE = "index.json"
CACHE_DIRNAME = ".dit4dit_cache"
RESIZE_METHOD = "processor.images: flip, torch bilinear antialias (uint8), grid canvas"
BUILD_CHUNK = 32  # frames decoded and resized at a time


class FrameCacheError(ValueError):
    """A missing, incomplete, stale or mismatched frame cache (the message says which and how to fix)."""


# --------------------------------------------------------------------------------------------
# the float conversion (the last step of Processor.images)
# --------------------------------------------------------------------------------------------


def to_unit_float(canvas: np.ndarray | torch.Tensor, out: torch.Tensor | None = None,
                  planar: bool = False) -> torch.Tensor:
    """uint8 frames -> float32 ``(3, T, H, W)`` in [-1, 1], written into ``out`` if given.

    ``canvas`` is ``(T, H, W, 3)`` (what :meth:`Processor.images` builds), or ``(T, 3, H, W)``
    with ``planar=True`` (what the cache stores). The operations are those that end
    :meth:`Processor.images`, in the same order, so the result is bit-identical to the
    processor's output for the same pixels.
    """
    x = torch.from_numpy(canvas) if isinstance(canvas, np.ndarray) else canvas
    c_dim = 1 if planar else 3
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[c_dim] != 3:
        want = "(T, 3, H, W)" if planar else "(T, H, W, 3)"
        raise ValueError(f"expected a uint8 {want} canvas, got {tuple(x.shape)} {x.dtype}")
    src = x.permute(1, 0, 2, 3) if planar else x.permute(3, 0, 1, 2)
    if out is None:
        out = torch.empty(tuple(src.shape), dtype=torch.float32)
    out.copy_(src)
    return out.mul_(1.0 / 127.5).sub_(1.0)


def _to_planar(video: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_unit_float`: float (3, T, H, W) -> uint8 planar (T, 3, H, W).
    (f + 1) * 127.5 is within 1e-4 of an integer c in [0, 255]; + 0.5 and truncation round it.
    The builder checks the round trip exactly."""
    return video.mul(127.5).add_(128.0).to(torch.uint8).permute(1, 0, 2, 3).contiguous()


# --------------------------------------------------------------------------------------------
# fingerprints
# --------------------------------------------------------------------------------------------


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def dataset_fingerprint(root: str | Path) -> str:
    """sha256 over the content of ``meta/info.json``, the episode metadata (v3.0
    ``meta/episodes/**``, v2.x ``meta/episodes.jsonl``) and every data, video and image file
    (with its relative path). Changes whenever episodes, their lengths, their placement in files or
    the bytes of any file change, even a file corrupted in place at the same size and time."""
    root = Path(root)
    h = hashlib.sha256()
    meta = root / "meta"
    content = [meta / "info.json", meta / "episodes.jsonl"]
    ep_dir = meta / "episodes"
    if ep_dir.is_dir():
        content += sorted(p for p in ep_dir.rglob("*") if p.is_file())
    for p in content:
        if not p.is_file():
            continue
        h.update(f"file:{p.relative_to(root).as_posix()}\n".encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    for sub in ("data", "videos", "images"):
        d = root / sub
        if d.is_dir():
            for p in sorted(q for q in d.rglob("*") if q.is_file()):
                fh = hashlib.sha256()
                with open(p, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        fh.update(block)
                h.update(f"content:{p.relative_to(root).as_posix()}:{p.stat().st_size}:{fh.hexdigest()}\n".encode())
    return h.hexdigest()


def _dataset_cameras(dataset: Any, processor: Any) -> list[str]:
    """The dataset keys of the processor's cameras, in the processor's order (aliases resolved
    the way TrainingSamples resolves them)."""
    checked = processor.schema.check(dataset, processor.state_dim, processor.action_dim)
    keys = [c.key for c in processor.schema.cameras]
    return [checked.cameras[keys.index(k)].key for k in processor.camera_keys]


def image_settings(processor: Any, dataset_cameras: Sequence[str] | None = None) -> dict[str, Any]:
    """Everything that determines a cached frame: cameras (and their dataset keys), flips, layout
    grid, cell and image size, the resize method and the torch version (its resize kernels)."""
    out = {
        "cameras": list(processor.camera_keys),
        "flip": [bool(c.flip) for c in processor.cameras],
        "grid": [int(v) for v in processor.grid],
        "cell_size": [int(v) for v in processor.cell_size],
        "image_size": [int(v) for v in processor.image_size],
        "resize": RESIZE_METHOD,
        "torch": torch.__version__.split("+")[0],
    }
    if dataset_cameras is not None:
        out["dataset_cameras"] = list(dataset_cameras)
    return out


def _cache_fingerprint(dataset_fp: str, settings: Mapping[str, Any]) -> str:
    return _digest({"format": FORMAT, "version": VERSION, "dataset": dataset_fp, "image": dict(settings)})


def default_cache_dir(dataset_root: str | Path, fingerprint: str) -> Path:
    return Path(dataset_root) / CACHE_DIRNAME / f"frames-{fingerprint[:16]}"


# --------------------------------------------------------------------------------------------
# processor / dataset arguments
# --------------------------------------------------------------------------------------------


def _open_dataset(dataset: Any) -> Any:
    if isinstance(dataset, (str, os.PathLike)):
        from .lerobot import LeRobotDataset

        return LeRobotDataset(dataset)
    if getattr(dataset, "root", None) is None:
        raise FrameCacheError("a frame cache needs a dataset read from a folder (a path or a LeRobotDataset)")
    return dataset


def _as_processor(processor_or_pair: Any, dataset: Any) -> Any:
    """A Processor, or ``(schema, inputs)``: the image path needs no statistics, so placeholder
    ones are used."""
    from .processor import Processor

    if isinstance(processor_or_pair, Processor):
        return processor_or_pair
    if isinstance(processor_or_pair, (tuple, list)) and len(processor_or_pair) == 2:
        from .schema import get_schema

        schema, inputs = processor_or_pair
        schema = get_schema(schema).check(dataset)
        stats = {w: {"min": [0.0] * d, "max": [1.0] * d}
                 for w, d in (("state", schema.state_dim), ("action", schema.action_dim))}
        return Processor.for_dataset(dataset, schema, inputs, stats=stats, progress=False)
    raise TypeError(f"expected a Processor or a (schema, inputs) pair, got {type(processor_or_pair).__name__}")


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def read_cache_index(directory: Path, index_file: str, fmt: str, error: type[Exception],
                     kind: str) -> dict[str, Any] | None:
    """The JSON index of a cache folder; None when absent, `error` when unreadable or foreign."""
    p = directory / index_file
    try:
        index = json.loads(p.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise error(f"{p}: unreadable {kind} index ({e}); delete {directory} and rebuild") from e
    if not isinstance(index, dict) or index.get("format") != fmt:
        raise error(f"{p}: not a dit4dit {kind} index")
    return index


def _read_index(directory: Path) -> dict[str, Any] | None:
    return read_cache_index(directory, INDEX_FILE, FORMAT, FrameCacheError, "frame-cache")


class FrameCache:
    """A complete frame cache (see the module docstring). The memmap is opened lazily in each
    process (it is not pickled), so DataLoader workers each map the file themselves."""

    def __init__(self, directory: str | Path, index: Mapping[str, Any], identity: tuple[int, ...] | None = None):
        self.directory = Path(directory)
        self.index = dict(index)
        self.path = self.directory / self.index.get("frames_file", FRAMES_FILE)
        # the frames file this index was checked against: a process that maps it later (a
        # DataLoader worker) refuses a file rebuilt in between
        self.identity = identity if identity is not None else _file_identity(self.path)
        self.shape = tuple(int(v) for v in self.index["shape"])
        self._where = {int(e): (int(o), int(n)) for e, o, n in self.index["episodes"]}
        self._mm: np.ndarray | None = None
        self._tensor: torch.Tensor | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    @property
    def fingerprint(self) -> str:
        return str(self.index["fingerprint"])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.shape[2]), int(self.shape[3])

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def array(self) -> np.ndarray:
        """The memmap ``(N, 3, H, W)`` of this process (copy-on-write: never written back, and
        torch can wrap its slices without a read-only warning)."""
        if self._mm is None or self._pid != os.getpid():
            with self._lock:
                if self._mm is None or self._pid != os.getpid():
                    if _file_identity(self.path) != self.identity:
                        raise FrameCacheError(f"{self.path}: the frame cache was rebuilt or removed after it was "
                                              "opened; reopen it")
                    mm = np.load(self.path, mmap_mode="c")
                    if mm.shape != self.shape or mm.dtype != np.uint8:
                        raise FrameCacheError(f"{self.path}: holds {mm.shape} {mm.dtype}, the index says "
                                              f"{self.shape} uint8; rebuild the cache")
                    self._mm, self._tensor, self._pid = mm, torch.from_numpy(mm), os.getpid()
        return self._mm  # type: ignore[return-value]

    def tensor(self) -> torch.Tensor:
        """The memmap as a uint8 tensor ``(N, 3, H, W)`` (no copy)."""
        self.array()
        return self._tensor  # type: ignore[return-value]

    def episode_range(self, episode: int) -> tuple[int, int]:
        """(offset, length) of an episode's frames in the cache."""
        try:
            return self._where[int(episode)]
        except KeyError:
            raise FrameCacheError(f"episode {episode} is not in the frame cache {self.directory}") from None

    def _rows(self, episode: int, frame_indices: Sequence[int]) -> list[int]:
        off, n = self.episode_range(episode)
        rows = [int(f) for f in frame_indices]
        if rows and (min(rows) < 0 or max(rows) >= n):
            raise IndexError(f"episode {episode} has frames 0..{n - 1}; asked for {rows}")
        return [off + f for f in rows]

    def frames(self, episode: int, frame_indices: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """uint8 planar ``(n, 3, H, W)`` frames of an episode (episode-relative indices)."""
        return np.take(self.array(), self._rows(episode, frame_indices), axis=0, out=out)

    def images(self, episode: int, frame_indices: Sequence[int]) -> np.ndarray:
        """uint8 ``(n, H, W, 3)`` RGB frames (for viewing)."""
        return np.ascontiguousarray(self.frames(episode, frame_indices).transpose(0, 2, 3, 1))

    def video(self, episode: int, frame_indices: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 ``(3, T, H, W)`` in [-1, 1] (into ``out`` if given): exactly what
        :meth:`Processor.images` makes of these frames. Converted straight from the mapped file
        (no intermediate uint8 copy), with the operations of :func:`to_unit_float`."""
        rows = self._rows(episode, frame_indices)
        src = self.tensor()
        h, w = self.image_size
        if out is None:
            out = torch.empty((3, len(rows), h, w), dtype=torch.float32)
        elif tuple(out.shape) != (3, len(rows), h, w) or out.dtype != torch.float32:
            raise ValueError(f"out must be float32 (3, {len(rows)}, {h}, {w}), got {tuple(out.shape)} {out.dtype}")
        for t, r in enumerate(rows):
            out[:, t].copy_(src[r])
        return out.mul_(1.0 / 127.5).sub_(1.0)

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": str(self.directory), "index": self.index, "identity": self.identity}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"], state["index"], tuple(state["identity"]))

    def __repr__(self) -> str:
        return f"FrameCache({str(self.directory)!r}, frames={self.shape[0]}, size={self.image_size})"


def _file_identity(path: Path) -> tuple[int, ...]:
    try:
        st = path.stat()
    except OSError:
        return ()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _mismatch(want: Mapping[str, Any], have: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(want) | set(have))
    return [f"{k}: cache {have.get(k)!r}, now {want.get(k)!r}" for k in keys if want.get(k) != have.get(k)]


def open_frame_cache(path: str | Path, dataset: Any = None, processor: Any = None, *,
                     dataset_fp: str | None = None) -> FrameCache:
    """Open a complete cache directory (or its ``index.json``) and, when ``dataset`` /
    ``processor`` are given, check that it was built from this dataset with these image
    settings; anything else raises :class:`FrameCacheError`."""
    directory = Path(path).expanduser()
    if directory.name == INDEX_FILE:
        directory = directory.parent
    index = _read_index(directory)
    rebuild = "rebuild it (`dit4dit cache-frames DATASET --schema NAME ...` or build_frame_cache())"
    if index is None:
        raise FrameCacheError(f"{directory}: no complete frame cache ({INDEX_FILE} missing: never built, or the "
                              f"build did not finish); {rebuild}")
    if index.get("version") != VERSION or index.get("layout") != LAYOUT:
        raise FrameCacheError(f"{directory}: frame-cache version {index.get('version')!r} "
                              f"({index.get('layout')}), this dit4dit reads version {VERSION} ({LAYOUT}); {rebuild}")
    frames = directory / index.get("frames_file", FRAMES_FILE)
    want_bytes = int(index.get("frames_bytes", -1))
    if not frames.is_file() or frames.stat().st_size != want_bytes:
        raise FrameCacheError(f"{frames}: missing or of the wrong size (expected {want_bytes} bytes); {rebuild}")
    cache = FrameCache(directory, index)
    if dataset is not None:
        ds = _open_dataset(dataset)
        fp = dataset_fp or dataset_fingerprint(ds.root)
        if fp != index.get("dataset_fingerprint"):
            raise FrameCacheError(f"{directory}: stale frame cache: the dataset {ds.root} changed since the cache "
                                  f"was built (from {index.get('dataset')}); {rebuild}")
        for ep in ds.episodes:
            off_n = cache._where.get(int(ep.index))
            if off_n is None or off_n[1] != ep.length:
                raise FrameCacheError(f"{directory}: episode {ep.index} ({ep.length} frames) is not in the cache "
                                      f"as such; {rebuild}")
        if processor is not None:
            want = image_settings(processor, _dataset_cameras(ds, processor))
            have = index.get("image_settings", {})
            diff = _mismatch(want, have)
            if diff:
                raise FrameCacheError(f"{directory}: the frame cache was built with other image settings "
                                      f"({'; '.join(diff)}); {rebuild} with these settings")
    elif processor is not None:
        diff = _mismatch(image_settings(processor), {k: v for k, v in index.get("image_settings", {}).items()
                                                     if k != "dataset_cameras"})
        if diff:
            raise FrameCacheError(f"{directory}: the frame cache was built with other image settings "
                                  f"({'; '.join(diff)}); {rebuild} with these settings")
    return cache


# --------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_memmap(path: Path, shape: tuple[int, ...], dtype: Any, *, what: str, error: type[Exception],
                  progress: bool, total: int, unit: str):
    """Write a ``.npy`` array at ``path`` atomically: check free disk space, fill a memory-mapped
    temporary file in the same folder (with a tqdm bar when ``progress``), then ``os.replace`` it
    into place. On any exception the temporary file is removed and ``path`` is left as it was.

    Yields ``(array, bar)``; ``bar`` is None without ``progress``.
    """
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    free = shutil.disk_usage(path.parent).free
    if free < nbytes + (64 << 20):
        raise error(f"{path.parent}: the cache needs {nbytes / 2**30:.2f} GiB ({what}) "
                    f"but only {free / 2**30:.2f} GiB are free")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"cache {unit}s", unit=unit, file=sys.stderr, dynamic_ncols=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        yield mm, bar
        mm.flush()
        del mm
        os.replace(tmp, path)
    finally:
        if bar is not None:
            bar.close()
        if tmp.exists():
            tmp.unlink()


def _looks_like_cache_dir(directory: Path) -> bool:
    """True when ``directory`` is empty or holds only frame-cache files (ours to overwrite)."""
    for p in directory.iterdir():
        n = p.name
        if n in (FRAMES_FILE, INDEX_FILE) or (n.startswith(".") and ".tmp-" in n):
            continue
        return False
    return True


def build_frame_cache(dataset_path: Any, processor: Any, out_dir: str | Path | None = None,
                      progress: bool = True, force: bool = False) -> Path:
    """Decode every frame once, apply ``processor``'s image path and store the result (see the
    module docstring). Returns the cache directory.

    ``dataset_path``: a dataset folder (or a ``LeRobotDataset``). ``processor``: the training
    :class:`~dit4dit.data.processor.Processor`, or a ``(schema, inputs)`` pair. ``out_dir``: the
    cache directory (default ``<dataset>/.dit4dit_cache/frames-<fingerprint>``). A complete cache
    with matching fingerprints is reused as is (unless ``force``); a stale or mismatched one is
    rebuilt in place.
    """
    ds = _open_dataset(dataset_path)
    proc = _as_processor(processor, ds)
    cams = _dataset_cameras(ds, proc)
    settings = image_settings(proc, cams)
    dataset_fp = dataset_fingerprint(ds.root)
    fp = _cache_fingerprint(dataset_fp, settings)
    out = Path(out_dir).expanduser() if out_dir is not None else default_cache_dir(ds.root, fp)

    if not force:
        try:
            cache = open_frame_cache(out, ds, proc, dataset_fp=dataset_fp)
            if cache.fingerprint == fp:
                return out
        except FrameCacheError:
            pass  # missing, incomplete or stale: (re)build below
    if out.exists() and not out.is_dir():
        raise FrameCacheError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if not _looks_like_cache_dir(out):
        raise FrameCacheError(f"{out}: not empty and not a frame cache; give an empty or new directory")
    (out / INDEX_FILE).unlink(missing_ok=True)  # whatever was there is no longer complete

    h, w = proc.image_size
    episodes = list(ds.episodes)
    total = sum(int(e.length) for e in episodes)
    t0 = time.perf_counter()
    table = []
    with atomic_memmap(out / FRAMES_FILE, (total, 3, h, w), np.uint8, what=f"{total} frames of 3x{h}x{w}",
                       error=FrameCacheError, progress=progress, total=total, unit="frame") as (mm, bar):
        pos = 0
        for ep in episodes:
            n = int(ep.length)
            table.append([int(ep.index), pos, n])
            for start in range(0, n, BUILD_CHUNK):
                idx = list(range(start, min(n, start + BUILD_CHUNK)))
                raw = {}
                for key in cams:
                    frames = np.asarray(ds.frames(key, ep.index, idx))
                    if frames.shape[0] != len(idx):
                        raise FrameCacheError(f"reader returned {frames.shape[0]} frames of {key!r} for "
                                              f"{len(idx)} requested (episode {ep.index})")
                    raw[key] = frames
                video = proc.images(raw)  # the training image path, float (3, T, H, W)
                planes = _to_planar(video)
                if not torch.equal(to_unit_float(planes, planar=True), video):  # pragma: no cover
                    raise FrameCacheError("the processor's images are not a uint8 canvas mapped to [-1, 1]; "
                                          "the frame cache cannot reproduce them exactly")
                mm[pos + start:pos + start + len(idx)] = planes.numpy()
                if bar is not None:
                    bar.update(len(idx))
            pos += n
    index = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": fp,
        "dataset": str(Path(ds.root).resolve()),
        "dataset_fingerprint": dataset_fp,
        "image_settings": settings,
        "frames_file": FRAMES_FILE,
        "shape": [total, 3, h, w],
        "layout": "NCHW",
        "dtype": "uint8",
        "frames_bytes": (out / FRAMES_FILE).stat().st_size,
        "episodes": table,
        "build_seconds": round(time.perf_counter() - t0, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(out / INDEX_FILE, index, indent=1)
    return out
