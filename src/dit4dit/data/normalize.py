"""Streaming per-dimension statistics and the state/action normaliser.

Statistics (`StreamingStats`): count, mean, std (population), min, max and the 1st/99th
percentiles, accumulated batch by batch in float64. Quantiles are exact (numpy's linear
interpolation on the stored values) until ``exact_limit`` rows have been seen; past that the
values move into a per-dimension histogram of ``bins`` bins whose range grows by doubling (two
bins merge into one) when new data fall outside it, so the quantile error stays below two bin
widths of the data's span (span / 8192 with the default 16384 bins).

Normaliser (`Normalizer`): per vector (``state``, ``action``) and per dimension,

- ``min_max``: ``[min, max] -> [-1, 1]``;
- ``quantile``: ``[q01, q99] -> [-1, 1]``, clipped to [-1, 1];
- identity for binary gripper dimensions (the schema says which);
- near-constant dimensions (``high - low < eps``) map to 0 and back to their constant.

`unnormalize` clips to [-1, 1] first (model outputs outside the training range are not
meaningful). Everything serialises to plain JSON (no pickle).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np

try:  # torch is a hard dependency of the package, but keep this module importable without it
    import torch
except ImportError:  # pragma: no cover
    torch = None  # type: ignore

Mode = Literal["min_max", "quantile"]
MODES = ("min_max", "quantile")
# Columns every LeRobot dataset carries that are bookkeeping, not signals.
BOOKKEEPING_KEYS = ("timestamp", "frame_index", "episode_index", "index", "task_index")


class NormalizationError(ValueError):
    """Bad data (NaN/inf, named by episode and key) or inconsistent statistics."""


# --------------------------------------------------------------------------------------------
# Streaming statistics
# --------------------------------------------------------------------------------------------


class StreamingStats:
    """Per-dimension running statistics of a stream of (N, D) batches."""

    def __init__(self, dim: int, exact_limit: int = 100_000, bins: int = 16384) -> None:
        if bins < 16 or bins % 2:
            raise ValueError("bins must be an even number >= 16")
        self.dim = int(dim)
        self.exact_limit = int(exact_limit)
        self.bins = int(bins)
        self.count = 0
        self.mean = np.zeros(self.dim, np.float64)
        self.m2 = np.zeros(self.dim, np.float64)
        self.min = np.full(self.dim, np.inf)
        self.max = np.full(self.dim, -np.inf)
        self._buffer: list[np.ndarray] | None = []
        self._buffered = 0
        self._lo: np.ndarray | None = None  # histogram origin per dim
        self._width: np.ndarray | None = None  # bin width per dim
        self._hist: np.ndarray | None = None  # (D, bins) int64

    @property
    def exact(self) -> bool:
        """True while quantiles are still computed from every stored value."""
        return self._buffer is not None

    def update(self, x: Any, where: str = "data", row_offset: int = 0) -> None:
        """Add a batch (N, D) (or (N,) when D == 1). Non-finite values raise, naming ``where``."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 1 and self.dim == 1:
            x = x[:, None]
        if x.ndim == 1 and x.shape[0] == self.dim:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise NormalizationError(f"{where}: expected (N, {self.dim}) values, got shape {x.shape}")
        if x.shape[0] == 0:
            return
        bad = ~np.isfinite(x)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise NormalizationError(
                f"non-finite value {x[r, c]} in {where} (row {row_offset + int(r)}, dimension {int(c)}; "
                f"{int(bad.sum())} bad values in this batch)"
            )
        n = x.shape[0]
        bmean = x.mean(axis=0)
        bm2 = ((x - bmean) ** 2).sum(axis=0)
        tot = self.count + n
        delta = bmean - self.mean
        self.mean = self.mean + delta * (n / tot)
        self.m2 = self.m2 + bm2 + delta**2 * (self.count * n / tot)
        self.count = tot
        self.min = np.minimum(self.min, x.min(axis=0))
        self.max = np.maximum(self.max, x.max(axis=0))
        if self._buffer is not None:
            self._buffer.append(x.copy())
            self._buffered += n
            if self._buffered > self.exact_limit:
                data = np.concatenate(self._buffer)
                self._buffer = None
                self._init_hist(data.min(axis=0), data.max(axis=0))
                self._add_hist(data)
        else:
            self._add_hist(x)

    # ---- histogram ---------------------------------------------------------------------------
    def _init_hist(self, lo: np.ndarray, hi: np.ndarray) -> None:
        span = hi - lo
        tiny = np.maximum(np.abs(lo), 1.0) * 1e-9
        span = np.where(span > tiny, span, tiny)
        # a little headroom on both sides so the next batches rarely force a doubling
        self._lo = lo - span * 0.05
        self._width = span * 1.1 / self.bins
        self._hist = np.zeros((self.dim, self.bins), np.int64)

    def _grow(self, d: int, lo_needed: float, hi_needed: float) -> None:
        assert self._lo is not None and self._width is not None and self._hist is not None
        half = self.bins // 2
        while True:
            lo, w = self._lo[d], self._width[d]
            hi = lo + w * self.bins
            if lo_needed >= lo and hi_needed < hi:
                return
            merged = self._hist[d].reshape(half, 2).sum(axis=1)
            self._hist[d] = 0
            if lo_needed < lo:  # extend to the left: old range becomes the upper half
                self._hist[d, half:] = merged
                self._lo[d] = lo - w * self.bins
            else:  # extend to the right
                self._hist[d, :half] = merged
            self._width[d] = 2 * w

    def _add_hist(self, x: np.ndarray) -> None:
        assert self._lo is not None and self._width is not None and self._hist is not None
        xmin, xmax = x.min(axis=0), x.max(axis=0)
        hi = self._lo + self._width * self.bins
        for d in np.nonzero((xmin < self._lo) | (xmax >= hi))[0]:
            self._grow(int(d), float(xmin[d]), float(xmax[d]))
        idx = np.floor((x - self._lo) / self._width).astype(np.int64)
        np.clip(idx, 0, self.bins - 1, out=idx)
        idx += np.arange(self.dim, dtype=np.int64) * self.bins
        self._hist += np.bincount(idx.ravel(), minlength=self.dim * self.bins).reshape(self.dim, self.bins)

    # ---- results -----------------------------------------------------------------------------
    def quantile(self, q: float) -> np.ndarray:
        if self.count == 0:
            return np.full(self.dim, np.nan)
        if self._buffer is not None:
            return np.quantile(np.concatenate(self._buffer), q, axis=0)
        assert self._lo is not None and self._width is not None and self._hist is not None
        out = np.empty(self.dim)
        rank = q * (self.count - 1)  # numpy's "linear" position among the sorted values
        for d in range(self.dim):
            cum = np.cumsum(self._hist[d])
            b = int(np.searchsorted(cum, rank, side="right"))
            b = min(b, self.bins - 1)
            before = cum[b - 1] if b > 0 else 0
            inside = self._hist[d, b]
            frac = (rank - before + 0.5) / inside if inside > 0 else 0.5
            out[d] = self._lo[d] + self._width[d] * (b + min(max(frac, 0.0), 1.0))
        return np.clip(out, self.min, self.max)

    @property
    def std(self) -> np.ndarray:
        if self.count == 0:
            return np.full(self.dim, np.nan)
        return np.sqrt(np.maximum(self.m2 / self.count, 0.0))

    def result(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        if self.count == 0:
            raise NormalizationError("no values were seen: cannot compute statistics")
        out: dict[str, Any] = {
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "min": self.min.tolist(),
            "max": self.max.tolist(),
            "q01": self.quantile(0.01).tolist(),
            "q99": self.quantile(0.99).tolist(),
            "count": int(self.count),
            "exact_quantiles": self.exact,
        }
        if names is not None:
            out["names"] = list(names)
        return out


# --------------------------------------------------------------------------------------------
# Dataset statistics
# --------------------------------------------------------------------------------------------


def numeric_keys(dataset: Any) -> list[str]:
    """Non-visual, numeric, scalar/1-D features (bookkeeping columns excluded)."""
    from .schema import NUMERIC_DTYPES, feature_width

    out = []
    for k, f in dataset.features.items():
        if k in BOOKKEEPING_KEYS or f.get("dtype") not in NUMERIC_DTYPES:
            continue
        if feature_width(f) is not None:
            out.append(k)
    return out


def compute_dataset_stats(dataset: Any, schema: Any = None, keys: Iterable[str] | None = None,
                          episodes: Iterable[int] | None = None, progress: bool = True,
                          exact_limit: int = 100_000, bins: int = 16384) -> dict[str, Any]:
    """Stream over the episodes of ``dataset`` (a ``LeRobotDataset``).

    Returns ``{"keys": {key: stats}, "state": stats, "action": stats, ...}``: statistics of every
    numeric key (or of ``keys``) and, with a schema, of its state and action vectors. NaN/inf
    raise :class:`NormalizationError` naming the episode, key and frame.
    """
    from .schema import get_schema

    if schema is not None:
        schema = get_schema(schema).check(dataset, require_cameras=False)
    key_list = list(keys) if keys is not None else numeric_keys(dataset)
    eps = list(episodes) if episodes is not None else [e.index for e in dataset.episodes]
    per_key: dict[str, StreamingStats] = {}
    vec: dict[str, StreamingStats] = {}
    if schema is not None:
        vec = {"state": StreamingStats(schema.state_dim, exact_limit, bins),
               "action": StreamingStats(schema.action_dim, exact_limit, bins)}
    frames = 0
    bar = _progress(eps, "stats", progress)
    for ep in bar:
        data = dataset.episode_data(ep)
        for key in key_list:
            if key not in data:
                raise NormalizationError(f"key {key!r} missing from episode {ep}; got {sorted(data)}")
            arr = _as_2d(data[key], key, ep)
            if key not in per_key:
                per_key[key] = StreamingStats(arr.shape[1], exact_limit, bins)
            per_key[key].update(arr, where=f"episode {ep}, key {key!r}")
        if schema is not None:
            for which in ("state", "action"):
                for p in schema._parts(which):
                    if p.key not in data:
                        raise NormalizationError(f"{which} key {p.key!r} missing from episode {ep}")
                    _check_finite(_as_2d(data[p.key], p.key, ep), p.key, ep)
                vec[which].update(schema.extract(data, which), where=f"episode {ep}, {which} vector")
        frames += len(next(iter(data.values()))) if data else 0
    out: dict[str, Any] = {
        "format": "dit4dit.stats",
        "version": 1,
        "num_episodes": len(eps),
        "num_frames": frames,
        "keys": {k: s.result(_names_of(dataset, k, s.dim)) for k, s in per_key.items()},
    }
    if schema is not None:
        out["schema"] = schema.name
        out["state"] = vec["state"].result(schema.state_names)
        out["action"] = vec["action"].result(schema.action_names)
        out["state"]["identity"] = schema.identity_mask("state")
        out["action"]["identity"] = schema.identity_mask("action")
    return out


def _as_2d(value: Any, key: str, ep: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype == object:
        arr = np.stack([np.asarray(v) for v in arr])
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise NormalizationError(f"episode {ep}, key {key!r}: expected (T, D) values, got shape {arr.shape}")
    return arr.astype(np.float64, copy=False)


def _check_finite(arr: np.ndarray, key: str, ep: int) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise NormalizationError(f"non-finite value {arr[r, c]} in episode {ep}, key {key!r} "
                                 f"(frame {int(r)}, dimension {int(c)})")


def _names_of(dataset: Any, key: str, dim: int) -> list[str] | None:
    from .schema import _feature_names

    names = _feature_names(dataset.features.get(key, {}), dim)
    return list(names) if names else None


def _progress(items: Sequence[Any], desc: str, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return items
    return tqdm(items, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------
# Normaliser
# --------------------------------------------------------------------------------------------


class Normalizer:
    """Maps state/action vectors to [-1, 1] per dimension and back (numpy or torch, (..., D))."""

    FORMAT = "dit4dit.normalizer"

    def __init__(self, vectors: Mapping[str, Mapping[str, Any]], mode: Mode = "min_max", eps: float = 1e-6):
        if mode not in MODES:
            raise NormalizationError(f"normalisation mode {mode!r} must be one of {MODES}")
        self.mode: Mode = mode
        self.eps = float(eps)
        self.vectors: dict[str, dict[str, Any]] = {}
        for name, stats in vectors.items():
            self.vectors[name] = self._prepare(name, stats)

    def _prepare(self, name: str, stats: Mapping[str, Any]) -> dict[str, Any]:
        lo_key, hi_key = ("min", "max") if self.mode == "min_max" else ("q01", "q99")
        for k in (lo_key, hi_key):
            if k not in stats:
                raise NormalizationError(f"statistics of {name!r} lack {k!r} (needed by mode {self.mode!r})")
        low = np.asarray(stats[lo_key], np.float64)
        high = np.asarray(stats[hi_key], np.float64)
        if low.shape != high.shape or low.ndim != 1:
            raise NormalizationError(f"statistics of {name!r}: {lo_key}/{hi_key} must be equal-length lists")
        if not (np.isfinite(low).all() and np.isfinite(high).all()):
            raise NormalizationError(f"statistics of {name!r} contain NaN/inf")
        if (high < low).any():
            raise NormalizationError(f"statistics of {name!r}: {hi_key} < {lo_key} in dims "
                                     f"{np.nonzero(high < low)[0].tolist()}")
        dim = low.shape[0]
        identity = np.asarray(stats.get("identity", [False] * dim), bool)
        if identity.shape != (dim,):
            raise NormalizationError(f"statistics of {name!r}: identity mask has {identity.size} entries, "
                                     f"expected {dim}")
        constant = (high - low) < self.eps
        if "center" in stats:
            center = np.asarray(stats["center"], np.float64)
        elif "mean" in stats and self.mode == "min_max":
            center = np.clip(np.asarray(stats["mean"], np.float64), low, high)
        else:
            center = (low + high) / 2
        scale = np.where(constant, 1.0, high - low)
        return {
            "stats": {k: v for k, v in stats.items() if k not in ("identity", "center")},
            "low": low, "high": high, "center": center, "identity": identity, "constant": constant,
            "scale": scale, "dim": dim,
        }

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_stats(cls, stats: Mapping[str, Any], schema: Any = None, mode: Mode = "min_max",
                   eps: float = 1e-6) -> "Normalizer":
        """From :func:`compute_dataset_stats` output (its ``state``/``action`` entries). With a
        schema, the identity (gripper) masks come from the schema and the widths are checked."""
        vectors = {}
        for which in ("state", "action"):
            if which not in stats:
                raise NormalizationError(f"statistics lack {which!r}; compute them with a schema")
            s = dict(stats[which])
            if schema is not None:
                want = schema.state_dim if which == "state" else schema.action_dim
                if len(s["min"]) != want:
                    raise NormalizationError(f"{which} statistics have {len(s['min'])} dims; schema "
                                             f"{schema.name!r} has {want}")
                s["identity"] = schema.identity_mask(which)
            vectors[which] = s
        return cls(vectors, mode=mode, eps=eps)

    def dim(self, which: str) -> int:
        return self._vec(which)["dim"]

    def _vec(self, which: str) -> dict[str, Any]:
        if which not in self.vectors:
            raise NormalizationError(f"no statistics for {which!r}; have {sorted(self.vectors)}")
        return self.vectors[which]

    # ---- maps --------------------------------------------------------------------------------
    def normalize(self, which: str, x: Any) -> Any:
        v = self._vec(which)
        _check_last_dim(x, v["dim"], which)
        low, scale, ident, const = _params(x, v["low"], v["scale"], v["identity"], v["constant"])
        y = (x - low) / scale * 2.0 - 1.0
        if self.mode == "quantile":
            y = _clip(y, -1.0, 1.0)
        zero = y * 0.0
        y = _where(const, zero, y)
        return _where(ident, x, y)

    def unnormalize(self, which: str, y: Any, clip: bool = True) -> Any:
        v = self._vec(which)
        _check_last_dim(y, v["dim"], which)
        low, scale, ident, const = _params(y, v["low"], v["scale"], v["identity"], v["constant"])
        (center,) = _params(y, v["center"])
        yc = _clip(y, -1.0, 1.0) if clip else y
        x = (yc + 1.0) / 2.0 * scale + low
        x = _where(const, center + y * 0.0, x)
        return _where(ident, y, x)

    # ---- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        vectors = {}
        for name, v in self.vectors.items():
            d = dict(_plain(v["stats"]))
            d["identity"] = v["identity"].tolist()
            d["center"] = v["center"].tolist()
            vectors[name] = d
        return {"format": self.FORMAT, "version": 1, "mode": self.mode, "eps": self.eps, "vectors": vectors}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Normalizer":
        check_description(d, cls.FORMAT, "normaliser", NormalizationError)
        return cls(d["vectors"], mode=d["mode"], eps=d.get("eps", 1e-6))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Normalizer":
        return cls.from_dict(json.loads(Path(path).read_text()))


def check_description(d: Mapping[str, Any], fmt: str, what: str, error: type[Exception]) -> None:
    """Raise ``error`` unless ``d`` is a version-1 description in format ``fmt`` (``what`` names the kind
    of object in the message): the check every ``from_dict`` of a saved data component starts with."""
    if d.get("format") != fmt:
        raise error(f"not a {what} description (format {d.get('format')!r})")
    if d.get("version") != 1:
        raise error(f"unsupported {what} version {d.get('version')!r}")


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        raise NormalizationError("statistics contain NaN/inf")
    return x


def _is_torch(x: Any) -> bool:
    return torch is not None and isinstance(x, torch.Tensor)


def _check_last_dim(x: Any, dim: int, which: str) -> None:
    shape = tuple(x.shape)
    if not shape or shape[-1] != dim:
        raise NormalizationError(f"{which}: expected (..., {dim}) values, got shape {shape}")


def _params(x: Any, *arrays: np.ndarray) -> list[Any]:
    if _is_torch(x):
        out = []
        for a in arrays:
            if a.dtype == bool:
                out.append(torch.as_tensor(a, device=x.device))
            else:
                out.append(torch.as_tensor(a, dtype=x.dtype if x.is_floating_point() else torch.float32,
                                           device=x.device))
        return out
    dtype = x.dtype if np.issubdtype(np.asarray(x).dtype, np.floating) else np.float64
    return [a if a.dtype == bool else a.astype(dtype) for a in arrays]


def _where(cond: Any, a: Any, b: Any) -> Any:
    if _is_torch(b) or _is_torch(a):
        return torch.where(cond, a, b)
    return np.where(cond, a, b)


def _clip(x: Any, lo: float, hi: float) -> Any:
    if _is_torch(x):
        return x.clamp(lo, hi)
    return np.clip(x, lo, hi)
