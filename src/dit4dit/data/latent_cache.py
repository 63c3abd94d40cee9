"""Precomputed VAE latents of every training clip (`dit4dit cache-latents`): training skips the VAE.

Why per sample, not per frame: the Wan VAE is causal in time. The first frame of a clip is
encoded on its own, but every later latent frame depends on the frames before it in the clip
(the encoder carries a temporal cache from chunk to chunk), so the latents of a clip are not a
function of its frames one by one. The cache therefore stores, for each training sample of
:class:`~dit4dit.data.samples.TrainingSamples` (sample ``i`` = episode ``e``, frame ``t``; its clip
is the frame plan of ``t``: conditioning frames then future frames, padded at the episode end),
exactly what the model computes from that sample's video: ``codec.encode(video)``, the normalised
latents ``(C, T', h, w)``. ``DiT4DiT.loss`` takes them as ``batch["latents"]`` and does not run
the VAE.

Layout of a cache directory (default ``<dataset>/.dit4dit_cache/latents-<fingerprint>/``)::

    latents.npy   (N_samples, C, T', h, w), float32 (or bfloat16 stored as uint16 bits)
    index.json    format, version, fingerprint and what it covers, shape, dtype, build time

Fingerprint: the dataset (:func:`~dit4dit.data.frame_cache.dataset_fingerprint`: metadata
content and the names and sizes of the data and video files), the processor's image settings
(cameras, flips, layout, resolution, resize method), the frame plan (conditioning / future frames,
stride), the episodes and their lengths, the codec (``codec_identity``: the VAE folder's content
hash) and the storage dtype. A cache that differs in any of them is refused with a message naming
what changed (:class:`LatentCacheError`); it is never used silently.

Exactness: float32 storage holds exactly what ``codec.encode`` returned, so a float32 training
step (CPU) gives the same loss with or without the cache. On the GPU, training encodes inside
bf16 autocast; the cache holds the float32 encode (slightly more precise). ``bfloat16`` storage
halves the size (the 2B presets: 16 x 3 x 28 x 28 latents, 147 KiB a sample in float32).

Atomicity as for the frame cache: the latents are written to a temporary file renamed into place,
and ``index.json`` (written last, through a temporary name) marks the cache complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import ConfigError
from ..jsonio import write_json
from .frame_cache import (CACHE_DIRNAME, _dataset_cameras, _file_identity, atomic_memmap, dataset_fingerprint,
                          image_settings, read_cache_index)

__all__ = ["LatentCache", "LatentCacheError", "LatentSamples", "build_latent_cache", "open_latent_cache",
           "latent_cache_key"]

FORMAT = "dit4dit.latent_cache"
VERSION = 1
LATENTS_FILE = "latents.npy"
INDEX_FILE = "index.json"
DTYPES = ("float32", "bfloat16")


class LatentCacheError(ConfigError):
    """A missing, incomplete, stale or mismatched latent cache (the message says which and how to fix)."""


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def latent_cache_key(samples: Any, codec_id: str, dtype: str = "float32") -> dict[str, Any]:
    """Everything that determines the cached latents of ``samples`` (a TrainingSamples)."""
    if dtype not in DTYPES:
        raise LatentCacheError(f"latent cache dtype {dtype!r} must be one of {DTYPES}")
    ds, proc = samples.dataset, samples.processor
    inputs = asdict(proc.inputs)
    return {
        "dataset": dataset_fingerprint(ds.root),
        "image": image_settings(proc, _dataset_cameras(ds, proc)),
        "frames": {k: inputs[k] for k in ("num_cond_frames", "num_future_frames", "frame_stride")},
        "episodes": [[int(e.index), int(e.length)] for e in samples.episodes],
        "codec": str(codec_id),
        "dtype": dtype,
    }


def _fingerprint(key: Mapping[str, Any]) -> str:
    return _digest({"format": FORMAT, "version": VERSION, **dict(key)})


def default_latent_cache_dir(dataset_root: str | Path, fingerprint: str) -> Path:
    return Path(dataset_root) / CACHE_DIRNAME / f"latents-{fingerprint[:16]}"


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


class LatentCache:
    """A complete latent cache. The memmap is opened lazily in each process (not pickled)."""

    def __init__(self, directory: str | Path, index: Mapping[str, Any], identity: tuple[int, ...] | None = None):
        self.directory = Path(directory)
        self.index = dict(index)
        self.path = self.directory / LATENTS_FILE
        self.identity = identity if identity is not None else _file_identity(self.path)
        self.shape = tuple(int(v) for v in self.index["shape"])
        self.dtype = str(self.index["dtype"])
        self._mm: np.ndarray | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def fingerprint(self) -> str:
        return str(self.index["fingerprint"])

    def array(self) -> np.ndarray:
        if self._mm is None or self._pid != os.getpid():
            with self._lock:
                if self._mm is None or self._pid != os.getpid():
                    if _file_identity(self.path) != self.identity:
                        raise LatentCacheError(f"{self.path}: the latent cache was rebuilt or removed after it was "
                                               "opened; reopen it")
                    self._mm, self._pid = np.load(self.path, mmap_mode="r"), os.getpid()
        return self._mm  # type: ignore[return-value]

    def latents(self, i: int) -> torch.Tensor:
        """float32 (C, T', h, w) latents of sample ``i`` (a copy)."""
        if not 0 <= int(i) < len(self):
            raise IndexError(f"sample {i} outside the latent cache ({len(self)} samples)")
        row = np.array(self.array()[int(i)])
        if self.dtype == "bfloat16":  # stored as the raw 16 bits
            return torch.from_numpy(row.view(np.int16)).view(torch.bfloat16).float()
        return torch.from_numpy(row)

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": str(self.directory), "index": self.index, "identity": self.identity}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"], state["index"], tuple(state["identity"]))

    def __repr__(self) -> str:
        return f"LatentCache({str(self.directory)!r}, samples={len(self)}, latent={self.shape[1:]}, {self.dtype})"


def _read_index(directory: Path) -> dict[str, Any] | None:
    return read_cache_index(directory, INDEX_FILE, FORMAT, LatentCacheError, "latent-cache")


_WHAT = {"dataset": "the dataset changed", "image": "other image settings", "frames": "another frame plan",
         "episodes": "other episodes", "codec": "another VAE (content hash)", "dtype": "another storage dtype"}


def open_latent_cache(path: str | Path, samples: Any = None, codec_id: str | None = None) -> LatentCache:
    """Open a complete cache directory and, with ``samples`` (and ``codec_id``), check that it was
    built for exactly these samples with this codec; anything else raises :class:`LatentCacheError`."""
    directory = Path(path).expanduser()
    if directory.name == INDEX_FILE:
        directory = directory.parent
    rebuild = "rebuild it with `dit4dit cache-latents --backbone PATH --dataset DIR --schema NAME ...`"
    index = _read_index(directory)
    if index is None:
        raise LatentCacheError(f"{directory}: no complete latent cache ({INDEX_FILE} missing: never built, or the "
                               f"build did not finish); {rebuild}")
    if index.get("version") != VERSION:
        raise LatentCacheError(f"{directory}: latent-cache version {index.get('version')!r}, this dit4dit reads "
                               f"{VERSION}; {rebuild}")
    file = directory / LATENTS_FILE
    if not file.is_file() or file.stat().st_size != int(index.get("latents_bytes", -1)):
        raise LatentCacheError(f"{file}: missing or of the wrong size (expected {index.get('latents_bytes')} bytes); "
                               f"{rebuild}")
    cache = LatentCache(directory, index)
    if samples is not None:
        have = index.get("key", {})
        want = latent_cache_key(samples, codec_id if codec_id is not None else have.get("codec", ""),
                                have.get("dtype", "float32"))
        diff = [k for k in want if want[k] != have.get(k)]
        if diff:
            raise LatentCacheError(f"{directory}: the latent cache does not fit these training samples ("
                                   + "; ".join(f"{k}: {_WHAT[k]}" for k in diff) + f"); {rebuild}")
        if len(cache) != len(samples):
            raise LatentCacheError(f"{directory}: holds {len(cache)} samples, the dataset gives {len(samples)}; "
                                   f"{rebuild}")
    return cache


class LatentSamples(Dataset):
    """``samples`` (a TrainingSamples) with ``latents`` added to every item from ``cache``."""

    def __init__(self, samples: Any, cache: LatentCache):
        if len(cache) != len(samples):
            raise LatentCacheError(f"latent cache {cache.directory} holds {len(cache)} samples, the samples are "
                                   f"{len(samples)}")
        self.samples = samples
        self.cache = cache

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.samples[int(i)]
        item["latents"] = self.cache.latents(int(i))
        return item

    @property
    def processor(self) -> Any:
        return self.samples.processor

    @property
    def dataset(self) -> Any:
        return self.samples.dataset

    def __getattr__(self, name: str) -> Any:  # episodes, index, locate, ... of the wrapped samples
        if name in ("samples", "cache"):
            raise AttributeError(name)
        return getattr(self.samples, name)


# --------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------


def cache_samples(dataset: Any, cfg: Any, frame_cache: Any = None) -> Any:
    """TrainingSamples of ``dataset`` with ``cfg``'s frame plan and image settings. Only the
    videos matter for the latents, so placeholder normalisation statistics are used."""
    from .lerobot import LeRobotDataset
    from .processor import Processor
    from .samples import TrainingSamples
    from .schema import get_schema

    ds = LeRobotDataset(dataset) if isinstance(dataset, (str, os.PathLike)) else dataset
    schema = get_schema(cfg.schema).check(ds, cfg.action.state_dim, cfg.action.action_dim)
    stats = {w: {"min": [0.0] * n, "max": [1.0] * n}
             for w, n in (("state", schema.state_dim), ("action", schema.action_dim))}
    proc = Processor.for_dataset(ds, schema, cfg.inputs, stats=stats, mode=cfg.normalization,
                                 action_dim=cfg.action.action_dim, state_dim=cfg.action.state_dim,
                                 action_horizon=cfg.action.action_horizon, progress=False)
    kwargs = {"frame_cache": frame_cache} if frame_cache not in (None, False) else {}
    return TrainingSamples(ds, processor=proc, **kwargs)


def build_latent_cache(samples: Any, codec: Any, codec_id: str, out_dir: str | Path | None = None, *,
                       batch_size: int = 8, dtype: str = "float32", progress: bool = True,
                       force: bool = False) -> Path:
    """Encode the clip of every sample of ``samples`` with ``codec`` (on the codec's device) and
    store the normalised latents (see the module docstring). A complete cache with the same
    fingerprint is reused (unless ``force``). Returns the cache directory."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    key = latent_cache_key(samples, codec_id, dtype)
    fp = _fingerprint(key)
    out = Path(out_dir).expanduser() if out_dir is not None else default_latent_cache_dir(samples.dataset.root, fp)
    if not force:
        try:
            cache = open_latent_cache(out, samples, codec_id)
            if cache.fingerprint == fp:
                return out
        except LatentCacheError:
            pass
    if out.exists() and not out.is_dir():
        raise LatentCacheError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    foreign = [p.name for p in out.iterdir()
               if p.name not in (LATENTS_FILE, INDEX_FILE) and not (p.name.startswith(".") and ".tmp-" in p.name)]
    if foreign:
        raise LatentCacheError(f"{out}: not empty and not a latent cache (holds {foreign[:4]}); give an empty or "
                               f"new directory")
    (out / INDEX_FILE).unlink(missing_ok=True)

    n = len(samples)
    nf = samples.inputs.num_frames
    h, w = samples.processor.image_size
    shape = (n, *codec.latent_shape(nf, h, w))
    np_dtype = np.float32 if dtype == "float32" else np.uint16
    t0 = time.perf_counter()
    device = getattr(codec, "device", torch.device("cpu"))
    with atomic_memmap(out / LATENTS_FILE, shape, np_dtype, what=f"{n} samples of {shape[1:]}",
                       error=LatentCacheError, progress=progress, total=n, unit="sample") as (mm, bar):
        for start in range(0, n, batch_size):
            idx = list(range(start, min(n, start + batch_size)))
            items = samples.__getitems__(idx) if hasattr(samples, "__getitems__") else [samples[i] for i in idx]
            video = torch.stack([it["video"] for it in items]).to(device)
            with torch.no_grad():
                z = codec.encode(video).float().cpu()
            if tuple(z.shape[1:]) != shape[1:]:
                raise LatentCacheError(f"the codec returned latents {tuple(z.shape[1:])}, expected {shape[1:]}")
            mm[start:start + len(idx)] = (z.numpy() if dtype == "float32"
                                          else z.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
            if bar is not None:
                bar.update(len(idx))
    index = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": fp,
        "key": key,
        "dataset_root": str(Path(samples.dataset.root).resolve()),
        "shape": list(shape),
        "dtype": dtype,
        "latents_bytes": (out / LATENTS_FILE).stat().st_size,
        "build_seconds": round(time.perf_counter() - t0, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

    write_json(out / INDEX_FILE, index, indent=1)
    return out
