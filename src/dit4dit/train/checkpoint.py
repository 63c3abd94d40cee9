"""Checkpoints: crash-safe folders of safetensors + JSON (no pickle anywhere).

Layout of a run folder::

    RUN/
      checkpoints/
        latest                    # text: the name of the newest complete checkpoint ("step_000300")
        step_000200/
        step_000300/
          config.json             # the resolved DiT4DiTConfig (DiT4DiTConfig.to_json())
          model.safetensors       # trainable weights: video_dit.* (or image_encoder.*) action_dit.* [text_encoder.*]
                                  #   [codec.*: a codec fitted on the data, e.g. the pca codec's basis]
          ema.safetensors         # EMA of the same weights (when train.ema_decay is set)
          optimizer.safetensors   # AdamW moments and step counts, keyed "<weight name>/<state key>"
          optimizer.json          # parameter groups (names, hyper-parameters, weight names)
          rng.safetensors         # RNG states of every rank (torch CPU/CUDA, numpy, python, loss noise)
          trainer_state.json      # step, epoch, data position, scheduler, file sizes and sha256 of
                                  #   every weight file ("hashes"), format version
          processor.json          # schema + normalisation statistics + input protocol (if any)
      metrics.jsonl  train.log  [tensorboard/]  [images/]

Frozen parts (the VAE codec, a frozen text encoder) are never saved: ``config.json`` and the
backbone recorded in ``trainer_state.json`` (``"backbone": {"path", "hash", "components"}``, see
``dit4dit.models.backbone``) say where they come from; :func:`load_policy` refuses a backbone
folder whose content hash differs from the recorded one.

Crash safety: a checkpoint is written into ``checkpoints/.tmp-step_XXXXXX-*`` (every file fsynced),
the folder is renamed into place with ``os.replace`` (atomic), then ``latest`` is replaced
atomically the same way, and only then are old checkpoints beyond ``keep_last`` removed. A crash
at any point leaves the previous checkpoint and pointer intact; leftovers of an interrupted save
are removed by the next save.

Integrity: ``trainer_state.json`` records the size and the sha256 of every ``.safetensors`` file;
:func:`load_checkpoint` checks both (a flipped bit is caught, not only a truncation) unless the
caller asks to skip the hashes (``verify_hashes=False``, ``--skip-weight-hash``: sizes and headers
are still checked). :func:`load_latest_intact` (what ``--resume`` uses) falls back from a damaged
newest checkpoint to the newest intact one, with a warning. :func:`load_policy` checks the
checkpoint's ``config.json`` against its ``processor.json`` (action horizon, input protocol, padded
dimensions): a model and a processor that disagree are refused, not served.

Reading: :func:`load_checkpoint` accepts a run folder, its ``checkpoints/`` folder or one
checkpoint folder; :func:`load_policy` rebuilds the model (EMA weights when present) and the
processor from a checkpoint folder alone — that is how a stranger loads one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
import uuid
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..config import ConfigError, DiT4DiTConfig
from ..filehash import file_sha256
from ..jsonio import read_json, to_jsonable, write_json
from ..safetensors_header import read_header

log = logging.getLogger("dit4dit.train")

FORMAT = "dit4dit.checkpoint"
FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_META_FILE = "optimizer.json"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"
PROCESSOR_FILE = "processor.json"
REQUIRED_FILES = (CONFIG_FILE, MODEL_FILE, STATE_FILE)

# Config fields a resumed run may change: the run length, logging, checkpoint cadence, workers.
RESUME_MAY_DIFFER = frozenset({
    "train.steps", "train.log_every", "train.save_every", "train.keep_last", "train.image_every",
    "train.eval_every", "train.tensorboard", "train.wandb", "train.wandb_project", "train.num_workers",
    "train.time_budget_minutes",
})

# Test hook: "STEP:SECONDS" makes the save of checkpoint STEP pause for SECONDS after writing the
# weights (and drop a `_paused` marker in the temporary folder), so a test can kill the process
# in the middle of a save.
SAVE_PAUSE_ENV = "DIT4DIT_TEST_SAVE_PAUSE"

_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupted or does not match the model/config."""


# --------------------------------------------------------------------------------------------
# Names and discovery
# --------------------------------------------------------------------------------------------


def step_dir_name(step: int) -> str:
    return f"step_{int(step):06d}"


def parse_step(name: str) -> int | None:
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def checkpoints_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run (those holding ``trainer_state.json``), oldest first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        step = parse_step(p.name)
        if step is not None and p.is_dir() and (p / STATE_FILE).is_file():
            out.append((step, p))
    return sorted(out)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` names, else the newest complete one, else None."""
    root = checkpoints_root(run_dir)
    ptr = root / LATEST_FILE
    if ptr.is_file():
        name = ptr.read_text().strip()
        cand = root / name
        if parse_step(name) is not None and (cand / STATE_FILE).is_file():
            return cand
        log.warning("%s names %r, which is not a complete checkpoint; using the newest complete one", ptr, name)
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder from a run folder, a ``checkpoints/`` folder or a checkpoint folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if p.is_file():
        if p.name in (STATE_FILE, CONFIG_FILE, MODEL_FILE):
            return p.parent
        raise CheckpointError(f"{p}: expected a checkpoint folder or a run folder, got a file")
    if not (p / CHECKPOINTS_DIR).is_dir() and any((p / f).exists() for f in (MODEL_FILE, STATE_FILE)):
        return p
    run = p.parent if p.name == CHECKPOINTS_DIR else p
    if not checkpoints_root(run).is_dir():
        raise CheckpointError(f"{p}: neither a checkpoint folder (holding {', '.join(REQUIRED_FILES)}) nor a run "
                              f"folder (holding {CHECKPOINTS_DIR}/)")
    found = latest_checkpoint(run)
    if found is None:
        raise CheckpointError(f"{run}: the run folder holds no complete checkpoint under {CHECKPOINTS_DIR}/")
    return found


# --------------------------------------------------------------------------------------------
# Low-level writing (fsync) and reading (validation)
# --------------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _prepare_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, none sharing storage (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{k}: expected a tensor, got {type(t).__name__}")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        if t.numel():
            seen.add(ptr)
        out[k] = t
    return out


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> None:
    from safetensors.torch import save_file

    meta = {k: str(v) for k, v in (metadata or {}).items()}
    save_file(_prepare_tensors(tensors), str(path), metadata=meta)
    _fsync_path(path)


def _safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and check a safetensors header against the file size (catches truncation and garbage)."""
    return read_header(path, CheckpointError, 512 * 1024 * 1024)


def read_safetensors(path: str | os.PathLike, what: str | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on CPU, with clear errors for missing/corrupted files."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing {what or 'file'}")
    _safetensors_header(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path}: corrupted safetensors file ({type(e).__name__}: {e})") from e


class LazySafetensors(Mapping):
    """Read-only ``{name: tensor}`` view of a safetensors file that reads one tensor at a time
    (memory-mapped): resuming a large model on many ranks never holds the whole file per rank.
    ``shape(name)`` reads no data."""

    def __init__(self, path: str | os.PathLike, what: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: missing {what or 'file'}")
        header = _safetensors_header(self.path)
        self._shapes = {k: tuple(int(x) for x in v["shape"]) for k, v in header.items() if k != "__metadata__"}
        self._handle = None

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._shapes:
            raise KeyError(key)
        from safetensors import safe_open

        try:
            if self._handle is None:
                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            return self._handle.get_tensor(key)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{self.path}: corrupted safetensors file ({type(e).__name__}: {e})") from e

    def __contains__(self, key: object) -> bool:
        return key in self._shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    return dict(_safetensors_header(Path(path)).get("__metadata__") or {})


# --------------------------------------------------------------------------------------------
# State dicts of the trainable parts
# --------------------------------------------------------------------------------------------


def saved_parts(model: nn.Module) -> dict[str, nn.Module]:
    """The parts whose state model.safetensors holds: ``model.saved_modules()`` (trainable parts
    plus a codec fitted on the data) when the model defines it, else ``trainable_modules()``."""
    fn = getattr(model, "saved_modules", None) or model.trainable_modules
    return fn()


def trainable_state_dict(model: nn.Module, to_cpu: Callable[[torch.Tensor], torch.Tensor] | None = None
                         ) -> dict[str, torch.Tensor]:
    """``{part.key: tensor}`` over :func:`saved_parts` (the content of model.safetensors).

    ``to_cpu`` turns each tensor into a full CPU tensor (default: detach + copy to CPU; pass
    ``distributed.to_full_cpu`` under FSDP2, where it gathers the shards).
    """
    from .distributed import to_full_cpu

    conv = to_cpu or to_full_cpu
    out: dict[str, torch.Tensor] = {}
    for part, module in saved_parts(model).items():
        for k, v in module.state_dict().items():
            out[f"{part}.{k}"] = conv(v)
    return out


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _stored_shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    return state.shape(key) if isinstance(state, LazySafetensors) else _shape(state[key])


def check_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` naming missing/unexpected keys and shape mismatches."""
    expected: dict[str, tuple[int, ...]] = {}
    for part, module in saved_parts(model).items():
        for k, v in module.state_dict().items():
            expected[f"{part}.{k}"] = _shape(v)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [(k, _stored_shape(state, k), expected[k]) for k in expected
                  if k in state and _stored_shape(state, k) != expected[k]]
    if not (missing or unexpected or mismatched):
        return
    lines = []
    for k, a, b in mismatched[:10]:
        lines.append(f"{k}: checkpoint shape {a} vs model shape {b}")
    if len(mismatched) > 10:
        lines.append(f"... and {len(mismatched) - 10} more shape mismatches")
    if missing:
        lines.append(f"missing in the checkpoint ({len(missing)}): " + ", ".join(missing[:8])
                     + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        lines.append(f"not in the model ({len(unexpected)}): " + ", ".join(unexpected[:8])
                     + (" ..." if len(unexpected) > 8 else ""))
    raise CheckpointError(f"{source}: the weights do not match the model built from the config:\n  - "
                          + "\n  - ".join(lines))


@torch.no_grad()
def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy ``state`` (keys as in model.safetensors) into the trainable parts (DTensor-aware)."""
    from .distributed import place_like

    check_weights(model, state, source)
    for part, module in saved_parts(model).items():
        for k, target in module.state_dict().items():
            target.copy_(place_like(state[f"{part}.{k}"], target))


# --------------------------------------------------------------------------------------------
# Optimiser state <-> tensors + JSON
# --------------------------------------------------------------------------------------------


def optimizer_state_tensors(optimizer: torch.optim.Optimizer,
                            to_cpu: Callable[[torch.Tensor], torch.Tensor] | None = None
                            ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``({"<weight>/<key>": tensor}, json_meta)`` for an optimiser built by ``optim.build_optimizer``.

    Collective under FSDP2 (every rank calls it; gathers shards in a fixed order).
    """
    from .distributed import to_full_cpu

    conv = to_cpu or to_full_cpu
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    groups = []
    for g in optimizer.param_groups:
        names = g.get("param_names")
        if names is None or len(names) != len(g["params"]):
            raise ValueError("optimizer groups must carry 'param_names' (build it with optim.build_optimizer)")
        for name, p in zip(names, g["params"]):
            st = optimizer.state.get(p, {})
            for k in sorted(st):
                v = st[k]
                if isinstance(v, torch.Tensor):
                    tensors[f"{name}/{k}"] = conv(v)
                else:
                    scalars.setdefault(name, {})[k] = to_jsonable(v)
        groups.append({k: to_jsonable(v) for k, v in g.items() if k != "params"})
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "class": type(optimizer).__name__,
            "param_groups": groups, "scalar_state": scalars}
    return tensors, meta


@torch.no_grad()
def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: dict[str, Any],
                         source: str = "optimizer") -> None:
    """Restore moments and step counts saved by :func:`optimizer_state_tensors` (DTensor-aware).

    Hyper-parameters stay those of the current optimiser (the resumed config is checked to
    match); the groups and the weights in each group must be the same.
    """
    from .distributed import place_like

    saved = meta.get("param_groups", [])
    cur_names = [g.get("name") for g in optimizer.param_groups]
    saved_names = [g.get("name") for g in saved]
    if cur_names != saved_names:
        raise CheckpointError(f"{source}: parameter groups {saved_names} in the checkpoint, {cur_names} in the "
                              f"optimiser")
    for g, s in zip(optimizer.param_groups, saved):
        a, b = list(g["param_names"]), list(s.get("param_names", []))
        if a != b:
            only_ckpt = sorted(set(b) - set(a))[:5]
            only_model = sorted(set(a) - set(b))[:5]
            raise CheckpointError(f"{source}: group {g['name']!r} holds different weights (checkpoint only: "
                                  f"{only_ckpt}, model only: {only_model}, or a different order)")
    keys_by_param: dict[str, list[tuple[str, str]]] = {}
    for key in tensors.keys():
        name, _, k = key.rpartition("/")
        keys_by_param.setdefault(name, []).append((k, key))
    scalars = meta.get("scalar_state", {})
    for g in optimizer.param_groups:
        on_device = bool(g.get("fused") or g.get("capturable"))
        for name, p in zip(g["param_names"], g["params"]):
            saved_keys = keys_by_param.get(name)
            if not saved_keys:
                optimizer.state.pop(p, None)
                continue
            st: dict[str, Any] = {}
            for k, key in saved_keys:
                t = tensors[key]  # read one tensor at a time (lazy files)
                if k == "step":
                    dev = (p.to_local().device if hasattr(p, "to_local") else p.device) if on_device else "cpu"
                    st[k] = t.to(device=dev, dtype=torch.float32).clone()
                else:
                    if _shape(t) != _shape(p):
                        raise CheckpointError(f"{source}: state {k!r} of {name}: checkpoint shape {_shape(t)} vs "
                                              f"parameter shape {_shape(p)}")
                    st[k] = place_like(t, p).clone() if t.dtype == p.dtype else place_like(t.to(p.dtype), p).clone()
            st.update(scalars.get(name, {}))
            optimizer.state[p] = st


# --------------------------------------------------------------------------------------------
# RNG states as tensors
# --------------------------------------------------------------------------------------------


def capture_rng(generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors: torch CPU (+ CUDA), numpy, python ``random`` and
    the loss-noise generator."""
    out: dict[str, torch.Tensor] = {"torch_cpu": torch.get_rng_state().clone()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["torch_cuda"] = torch.cuda.get_rng_state().clone()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64).copy())
    out["numpy_meta"] = torch.tensor([int(pos), int(has_gauss)], dtype=torch.int64)
    out["numpy_gauss"] = torch.tensor([float(cached)], dtype=torch.float64)
    version, internal, gauss_next = random.getstate()
    out["python_state"] = torch.tensor(list(internal), dtype=torch.int64)
    out["python_meta"] = torch.tensor([int(version), int(gauss_next is not None)], dtype=torch.int64)
    out["python_gauss"] = torch.tensor([0.0 if gauss_next is None else float(gauss_next)], dtype=torch.float64)
    if generator is not None:
        out["loss_generator"] = generator.get_state().clone()
    return out


def restore_rng(state: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> None:
    """Inverse of :func:`capture_rng` (a CUDA state is skipped, with a warning, on a CPU-only host)."""
    torch.set_rng_state(state["torch_cpu"].to(torch.uint8))
    if "torch_cuda" in state:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state["torch_cuda"].to(torch.uint8))
        else:
            log.warning("the checkpoint holds a CUDA RNG state but CUDA is not available: not restored")
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    pos, has_gauss = (int(x) for x in state["numpy_meta"].tolist())
    np.random.set_state(("MT19937", keys, pos, has_gauss, float(state["numpy_gauss"][0])))
    version, has_next = (int(x) for x in state["python_meta"].tolist())
    gauss = float(state["python_gauss"][0]) if has_next else None
    random.setstate((version, tuple(int(x) for x in state["python_state"].tolist()), gauss))
    if generator is not None:
        if "loss_generator" not in state:
            raise CheckpointError("the checkpoint holds no loss-noise generator state")
        generator.set_state(state["loss_generator"].to(torch.uint8))


def rank_rng(all_states: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor] | None:
    """The ``rank{r}/...`` entries of a gathered RNG dict, without the prefix (None if absent)."""
    prefix = f"rank{rank}/"
    out = {k[len(prefix):]: v for k, v in all_states.items() if k.startswith(prefix)}
    return out or None


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def _maybe_pause(step: int, tmp: Path) -> None:
    spec = os.environ.get(SAVE_PAUSE_ENV)
    if not spec:
        return
    try:
        want, seconds = spec.split(":")
        want_step, secs = int(want), float(seconds)
    except ValueError:
        log.warning("ignoring malformed %s=%r (expected STEP:SECONDS)", SAVE_PAUSE_ENV, spec)
        return
    if want_step == step:
        (tmp / "_paused").write_text(str(os.getpid()))
        time.sleep(secs)


def _remove_stale(root: Path) -> None:
    for p in root.iterdir():
        if p.name.startswith((".tmp-", ".old-")) or p.name == LATEST_FILE + ".tmp":
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def write_latest(root: Path, name: str) -> None:
    tmp = root / (LATEST_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST_FILE)
    _fsync_path(root)


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int, protect: Iterable[Path] = ()) -> list[Path]:
    """Remove all but the newest ``keep_last`` complete checkpoints (never those in ``protect``)."""
    keep_last = max(1, int(keep_last))
    found = list_checkpoints(run_dir)
    protected = {Path(p).resolve() for p in protect}
    removed = []
    for _, p in found[:-keep_last]:
        if p.resolve() in protected:
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, config: DiT4DiTConfig,
                    model_state: dict[str, torch.Tensor], trainer_state: dict[str, Any],
                    ema_state: dict[str, torch.Tensor] | None = None,
                    optimizer_state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
                    rng_state: dict[str, torch.Tensor] | None = None, processor: Any = None,
                    keep_last: int = 3, backbone: Mapping[str, Any] | None = None) -> Path:
    """Write ``RUN/checkpoints/step_XXXXXX`` atomically, point ``latest`` at it, prune old ones.

    Tensors must already be full CPU tensors (the trainer gathers them on every rank, rank 0
    calls this). ``backbone``: the record of the backbone folder the run trains over
    (``Backbone.record()``: path and content hash), stored in ``trainer_state.json`` and, as
    ``backbone_hash``, in the metadata of the weight files. Returns the checkpoint folder.
    """
    root = checkpoints_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    name = step_dir_name(step)
    tmp = root / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "step": str(int(step))}
    if backbone is not None and backbone.get("hash"):
        meta["backbone_hash"] = str(backbone["hash"])
    try:
        write_json(tmp / CONFIG_FILE, json.loads(config.to_json()), sort_keys=True)
        _write_safetensors(tmp / MODEL_FILE, model_state, {**meta, "content": "trainable weights"})
        if ema_state is not None:
            _write_safetensors(tmp / EMA_FILE, ema_state, {**meta, "content": "EMA of the trainable weights"})
        _maybe_pause(step, tmp)
        if optimizer_state is not None:
            tensors, ometa = optimizer_state
            _write_safetensors(tmp / OPTIMIZER_FILE, tensors, meta)
            write_json(tmp / OPTIMIZER_META_FILE, ometa, sort_keys=True)
        if rng_state is not None:
            _write_safetensors(tmp / RNG_FILE, rng_state, meta)
        if processor is not None:
            processor.save(tmp)
            if (tmp / PROCESSOR_FILE).is_file():
                _fsync_path(tmp / PROCESSOR_FILE)
        state = dict(trainer_state)
        if backbone is not None:
            state["backbone"] = dict(backbone)
        state.update({"format": FORMAT, "version": FORMAT_VERSION, "step": int(step),
                      "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()},
                      "hashes": {p.name: "sha256:" + file_sha256(p) for p in sorted(tmp.iterdir())
                                 if p.is_file() and p.name.endswith(".safetensors")}})
        write_json(tmp / STATE_FILE, state, sort_keys=True)  # written last: its presence marks a complete folder
        _fsync_path(tmp)
        final = root / name
        old = None
        if final.exists():
            old = root / f".old-{name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_latest(root, name)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    prune_checkpoints(run_dir, keep_last, protect=[final])
    return final


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _open_tensors(path: Path, what: str, lazy: bool) -> Mapping[str, torch.Tensor]:
    return LazySafetensors(path, what) if lazy else read_safetensors(path, what)


@dataclass
class Checkpoint:
    """A validated checkpoint folder; tensors are read on demand."""

    path: Path
    config: DiT4DiTConfig
    config_dict: dict[str, Any]
    state: dict[str, Any]
    files: list[str] = field(default_factory=list)

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))

    @property
    def has_ema(self) -> bool:
        return (self.path / EMA_FILE).is_file()

    @property
    def has_optimizer(self) -> bool:
        return (self.path / OPTIMIZER_FILE).is_file() and (self.path / OPTIMIZER_META_FILE).is_file()

    @property
    def has_processor(self) -> bool:
        return (self.path / PROCESSOR_FILE).is_file()

    def model_state(self, lazy: bool = False) -> Mapping[str, torch.Tensor]:
        """The trainable weights (``lazy``: a :class:`LazySafetensors` view reading on demand)."""
        return _open_tensors(self.path / MODEL_FILE, "model weights", lazy)

    def ema_state(self, lazy: bool = False) -> Mapping[str, torch.Tensor] | None:
        return _open_tensors(self.path / EMA_FILE, "EMA weights", lazy) if self.has_ema else None

    def optimizer_state(self, lazy: bool = False) -> tuple[Mapping[str, torch.Tensor], dict[str, Any]]:
        if not self.has_optimizer:
            raise CheckpointError(f"{self.path}: no optimiser state ({OPTIMIZER_FILE} + {OPTIMIZER_META_FILE})")
        return (_open_tensors(self.path / OPTIMIZER_FILE, "optimiser state", lazy),
                read_json(self.path / OPTIMIZER_META_FILE, "optimiser metadata", error=CheckpointError))

    def rng_state(self) -> dict[str, torch.Tensor] | None:
        p = self.path / RNG_FILE
        return read_safetensors(p, "RNG states") if p.is_file() else None

    def processor(self) -> Any:
        """The checkpoint's processor (None without ``processor.json``), checked against its config."""
        if not self.has_processor:
            return None
        from ..data.processor import Processor

        try:
            proc = Processor.load(self.path)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{self.path / PROCESSOR_FILE}: cannot load the processor ({e})") from e
        check_processor_config(self.config, proc, self.path)
        return proc


def load_checkpoint(path: str | os.PathLike, validate: bool = True, verify_hashes: bool = True) -> Checkpoint:
    """Open a checkpoint (run folder, ``checkpoints/`` folder or checkpoint folder) and check it:
    required files present, recorded file sizes and content hashes match (``verify_hashes=False``
    skips the hashes), safetensors headers readable, config valid."""
    ck = resolve_checkpoint(path)
    present = sorted(p.name for p in ck.iterdir()) if ck.is_dir() else []
    missing = [f for f in REQUIRED_FILES if not (ck / f).is_file()]
    if missing:
        raise CheckpointError(f"{ck}: incomplete checkpoint, missing {missing} (present: {present})")
    state = read_json(ck / STATE_FILE, "trainer state", error=CheckpointError)
    if not isinstance(state, dict):
        raise CheckpointError(f"{ck / STATE_FILE}: expected a JSON object")
    if state.get("format", FORMAT) != FORMAT:
        raise CheckpointError(f"{ck / STATE_FILE}: format {state.get('format')!r}, expected {FORMAT!r}")
    if int(state.get("version", FORMAT_VERSION)) > FORMAT_VERSION:
        raise CheckpointError(f"{ck}: checkpoint format version {state.get('version')} is newer than this "
                              f"dit4dit ({FORMAT_VERSION}); upgrade dit4dit")
    if validate:
        for fname, size in (state.get("files") or {}).items():
            if not fname.endswith(".safetensors"):
                continue  # JSON files may be edited by hand (paths); they are parsed below
            p = ck / fname
            if not p.is_file():
                raise CheckpointError(f"{p}: missing (listed in {STATE_FILE})")
            if p.stat().st_size != int(size):
                raise CheckpointError(f"{p}: {p.stat().st_size} bytes, {STATE_FILE} recorded {size}: the file is "
                                      f"truncated or was modified")
        for fname in present:
            if fname.endswith(".safetensors"):
                _safetensors_header(ck / fname)
        if verify_hashes:
            verify_file_hashes(ck, state)
    cfg_dict = read_json(ck / CONFIG_FILE, "config", error=CheckpointError)
    try:
        cfg = DiT4DiTConfig.from_dict(cfg_dict).validate()
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{ck / CONFIG_FILE}: not a valid dit4dit config ({e})") from e
    return Checkpoint(ck, cfg, cfg_dict, state, present)


def verify_file_hashes(ck: Path, state: Mapping[str, Any]) -> list[str]:
    """Check every file with a recorded content hash (``trainer_state.json`` ``"hashes"``); returns
    the names checked. Checkpoints written before hashes were recorded have none (nothing to check)."""
    hashes = state.get("hashes") or {}
    if not isinstance(hashes, Mapping):
        raise CheckpointError(f"{ck / STATE_FILE}: 'hashes' must map file names to 'sha256:<hex>'")
    checked = []
    for fname, want in sorted(hashes.items()):
        p = ck / str(fname)
        if "/" in str(fname) or "\\" in str(fname) or not p.is_file():
            raise CheckpointError(f"{p}: missing (its hash is listed in {STATE_FILE})")
        algo, _, digest = str(want).partition(":")
        if algo != "sha256" or not digest:
            raise CheckpointError(f"{ck / STATE_FILE}: unsupported hash {str(want)[:80]!r} for {fname}")
        have = file_sha256(p)
        if have != digest:
            raise CheckpointError(f"{p}: content hash sha256:{have[:16]}... differs from the one recorded at save "
                                  f"time (sha256:{digest[:16]}...): the file is corrupted or was modified")
        checked.append(str(fname))
    return checked


def load_latest_intact(run_dir: str | os.PathLike, verify_hashes: bool = True) -> Checkpoint:
    """The newest checkpoint of a run that passes :func:`load_checkpoint` (what ``--resume`` uses).

    A damaged newer checkpoint (truncated or corrupted weight file, unreadable JSON) is skipped
    with a warning naming the problem. Raises :class:`CheckpointError` with a clear message when
    the run holds no checkpoint yet (e.g. it stopped before its first save) or none is intact."""
    run = Path(run_dir).expanduser()
    if run.name == CHECKPOINTS_DIR:
        run = run.parent
    if not run.is_dir():
        raise CheckpointError(f"{run}: no such run folder")
    found = list_checkpoints(run)
    if not found:
        raise CheckpointError(f"{run}: the run holds no checkpoint yet (no {CHECKPOINTS_DIR}/step_* folder; it "
                              f"stopped before its first save): start it again without --resume")
    ptr = latest_checkpoint(run)
    order = [p for _, p in reversed(found)]
    if ptr is not None and ptr in order:  # the one `latest` names first, then older ones
        order = [ptr] + [p for p in order if p != ptr and parse_step(p.name) < parse_step(ptr.name)]
    problems = []
    for cand in order:
        try:
            ck = load_checkpoint(cand, verify_hashes=verify_hashes)
        except CheckpointError as e:
            problems.append(f"{cand.name}: {e}")
            log.warning("checkpoint %s is damaged (%s); trying the previous one", cand, e)
            continue
        if problems:
            log.warning("resuming from %s, the newest intact checkpoint (skipped: %s)", ck.path,
                        "; ".join(p.split(":", 1)[0] for p in problems))
        return ck
    raise CheckpointError(f"{run}: no intact checkpoint:\n  - " + "\n  - ".join(problems))


def check_processor_config(cfg: DiT4DiTConfig, processor: Any, where: str | os.PathLike = "checkpoint") -> None:
    """Refuse a processor that disagrees with the model config (action horizon, input protocol,
    padded dimensions): the model would be fed or read out under another protocol than it was
    trained with."""
    if processor is None:
        return
    errs = []
    if processor.action_horizon is not None and int(processor.action_horizon) != int(cfg.action.action_horizon):
        errs.append(f"action_horizon: config.json {cfg.action.action_horizon}, processor.json "
                    f"{processor.action_horizon}")
    for name in ("action_dim", "state_dim"):
        a, b = int(getattr(cfg.action, name)), int(getattr(processor, name))
        if a != b:
            errs.append(f"{name} (padded): config.json {a}, processor.json {b}")
    pi, ci = processor.inputs, cfg.inputs
    for name in ("image_size", "num_cond_frames", "num_future_frames", "frame_stride", "cameras", "camera_layout"):
        a, b = getattr(ci, name), getattr(pi, name)
        if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
            a, b = list(a), list(b)
        if a != b:
            errs.append(f"inputs.{name}: config.json {a!r}, processor.json {b!r}")
    if errs:
        raise CheckpointError(f"{where}: config.json and processor.json disagree:\n  - " + "\n  - ".join(errs))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_differences(saved: dict[str, Any], requested: DiT4DiTConfig | dict[str, Any],
                       ignore: Iterable[str] = RESUME_MAY_DIFFER) -> list[tuple[str, Any, Any]]:
    """``[(key, saved, requested)]`` for every differing config field outside ``ignore``."""
    req = json.loads(requested.to_json()) if isinstance(requested, DiT4DiTConfig) else requested
    a, b = _flatten(json.loads(json.dumps(saved))), _flatten(req)
    skip = set(ignore)
    return [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b))
            if k not in skip and a.get(k, "<absent>") != b.get(k, "<absent>")]


def check_resume_config(checkpoint: Checkpoint, requested: DiT4DiTConfig) -> None:
    """Raise ``ConfigError`` when the requested config differs from the checkpoint's outside
    :data:`RESUME_MAY_DIFFER`. Fields the checkpoint's config predates count at their defaults."""
    diffs = config_differences(checkpoint.config.to_dict(), requested)
    if diffs:
        lines = "\n  - ".join(f"{k}: checkpoint {a!r}, requested {b!r}" for k, a, b in diffs[:20])
        raise ConfigError(f"cannot resume from {checkpoint.path}: the requested config differs from the "
                          f"checkpoint's (only {', '.join(sorted(RESUME_MAY_DIFFER))} may change):\n  - {lines}")


@torch.no_grad()
def _text_differences(a: Any, b: Any) -> list[str]:
    """Fields of two ``TextConfig`` that make them different text encoders (the folder path aside)."""
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    return [f"text.{k}: {da[k]!r} vs {db[k]!r}" for k in da if k != "path" and da[k] != db.get(k)]


# The parts a model may save (``DiT4DiT.saved_modules``), which ``train.init_parts`` may name.
INIT_PARTS = ("video_dit", "image_encoder", "image_head", "action_dit", "text_encoder", "codec")


@torch.no_grad()
def init_weights_from(model: nn.Module, path: str | os.PathLike, use_ema: bool = True,
                      config: DiT4DiTConfig | None = None, parts: Sequence[str] = ()) -> dict[str, Any]:
    """Initialise ``model`` from another run or checkpoint folder (``train.init_from``, ``--init``).

    Tensor by tensor over :func:`saved_parts` (the EMA weights when the checkpoint has them and
    ``use_ema``, else the raw ones; the optimiser state is never read): a tensor whose name and
    shape match loads; every other keeps its fresh initialisation. A codec that learns from the
    data (the ``pca`` basis) is taken whole from the checkpoint, so the video DiT keeps seeing the
    latents it was trained on; a different text encoder (``config.text`` differing from the
    checkpoint's in anything but its folder) is an error. ``parts`` (``train.init_parts``): only
    these parts load (a fitted codec always does); the others keep their fresh initialisation and
    are listed under ``"not_taken"``. Returns the report the trainer logs:
    ``{"checkpoint", "step", "weights", "loaded": {part: n}, "loaded_tensors", "kept": {part: n},
    "mismatched": [{"name", "checkpoint", "model"}], "missing": [names], "unused": [names],
    "codec"}``.
    """
    ck = load_checkpoint(path)
    if config is not None:
        diff = _text_differences(config.text, ck.config.text)
        if diff:
            raise CheckpointError(f"--init {ck.path}: it was trained with another text encoder ({'; '.join(diff)}); "
                                  f"its video DiT reads that encoder's embeddings, so it cannot initialise this "
                                  f"model")
    ema = use_ema and ck.has_ema
    state = ck.ema_state(lazy=True) if ema else ck.model_state(lazy=True)
    source = f"--init {ck.path / (EMA_FILE if ema else MODEL_FILE)}"
    from .distributed import place_like

    wanted = tuple(parts)
    parts = saved_parts(model)
    codec = parts.get("codec")
    unknown = [p for p in wanted if p not in INIT_PARTS]
    if unknown:
        raise CheckpointError(f"train.init_parts {list(wanted)}: unknown part(s) {unknown}; parts: "
                              f"{', '.join(INIT_PARTS)}")  # a known part this model lacks (a frozen text encoder) is no error
    not_taken = sorted(k for k in parts if wanted and k not in wanted and k != "codec")
    parts = {k: m for k, m in parts.items() if k not in not_taken}
    report: dict[str, Any] = {"checkpoint": str(ck.path), "step": ck.step, "weights": "ema" if ema else "model",
                              "loaded": {}, "kept": {}, "mismatched": [], "missing": [], "codec": None,
                              "not_taken": not_taken}
    held = set(state.keys())
    expected = set()
    for part, module in parts.items():
        for k, target in module.state_dict().items():
            name = f"{part}.{k}"
            expected.add(name)
            if name not in held:
                report["missing"].append(name)
                report["kept"][part] = report["kept"].get(part, 0) + 1
                continue
            shape = _stored_shape(state, name)
            if shape != _shape(target):
                if module is codec:  # the latents the video DiT was trained on: all or an error
                    raise CheckpointError(f"{source}: its codec tensor {name} has shape {shape}, this model's "
                                          f"{_shape(target)}: the codecs differ (codec.* in the configs)")
                report["mismatched"].append({"name": name, "checkpoint": list(shape), "model": list(_shape(target))})
                report["kept"][part] = report["kept"].get(part, 0) + 1
                continue
            target.copy_(place_like(state[name], target))
            report["loaded"][part] = report["loaded"].get(part, 0) + 1
    if codec is not None:
        names = [f"codec.{k}" for k in codec.state_dict()]
        if any(n in report["missing"] for n in names):
            if ck.config.codec.kind == "pca":
                raise CheckpointError(f"{source}: holds no fitted pca codec; this model's codec must be the one its "
                                      f"video DiT was trained on")
        else:
            report["codec"] = "loaded from the initialising checkpoint"
    report["unused"] = sorted(k for k in held - expected if k.split(".", 1)[0] not in not_taken)
    report["loaded_tensors"] = sum(report["loaded"].values())
    if report["loaded_tensors"] == 0:
        raise CheckpointError(f"--init {ck.path}: no tensor of it matches this model by name and shape (it holds "
                              f"{sorted({k.split('.', 1)[0] for k in held})}, the model {sorted(parts)})")
    return report


def describe_init(report: Mapping[str, Any]) -> list[str]:
    """Log lines for an :func:`init_weights_from` report: what loaded, what did not, and why."""
    loaded = ", ".join(f"{p} {n}" for p, n in report["loaded"].items()) or "none"
    lines = [f"initialised from {report['checkpoint']} ({report['weights']} weights, step {report['step']}): "
             f"{report['loaded_tensors']} tensors loaded ({loaded})"]
    for m in report["mismatched"]:
        lines.append(f"  kept fresh: {m['name']}: shape {tuple(m['checkpoint'])} in the checkpoint, "
                     f"{tuple(m['model'])} in this model")
    if report["missing"]:
        lines.append(f"  kept fresh: {len(report['missing'])} tensors the checkpoint does not hold: "
                     + ", ".join(report["missing"][:8]) + (" ..." if len(report["missing"]) > 8 else ""))
    if report["unused"]:
        lines.append(f"  not used: {len(report['unused'])} checkpoint tensors this model does not have: "
                     + ", ".join(report["unused"][:8]) + (" ..." if len(report["unused"]) > 8 else ""))
    if report.get("codec"):
        lines.append(f"  codec: {report['codec']}")
    if report.get("not_taken"):
        lines.append(f"  not taken (train.init_parts): {', '.join(report['not_taken'])} (fresh initialisation)")
    return lines


def recorded_backbone(state: Mapping[str, Any]) -> dict[str, Any] | None:
    """The backbone record of a checkpoint's ``trainer_state.json``: ``{"path", "hash", ...}``, or
    ``{"path"}`` for checkpoints that recorded the path only, or None (trained without one)."""
    rec = state.get("backbone")
    if rec is None or rec == "":
        return None
    if isinstance(rec, str):
        return {"path": rec}
    if isinstance(rec, Mapping):
        return dict(rec)
    raise CheckpointError(f"unexpected backbone record {rec!r} in {STATE_FILE}")


def check_backbone(checkpoint: "Checkpoint", backbone: Any = None, require: Iterable[str] = ("transformer",)) -> Any:
    """The ``Backbone`` to rebuild ``checkpoint``'s model over, or None when it was trained without one
    and none is given.

    ``backbone`` None: the folder recorded at training time, when it still exists. A checkpoint
    trained over a backbone whose folder is gone needs one (:class:`CheckpointError` saying so). A
    folder whose content hash differs from the recorded one is refused, naming the components
    that differ (the weights of the checkpoint were trained against the recorded VAE and
    transformer architecture; another folder would silently give another model).
    """
    from ..models.backbone import Backbone

    rec = recorded_backbone(checkpoint.state)
    if backbone is None:
        if rec is None:
            return None
        path = rec.get("path")
        if not path or not Path(path).is_dir():
            h = f" (content hash {str(rec['hash'])[:16]})" if rec.get("hash") else ""
            raise CheckpointError(f"{checkpoint.path} was trained over the backbone {path}{h}, which is not there; "
                                  f"pass backbone=PATH (--backbone PATH) pointing at a copy of that folder")
        backbone = path
    bb = Backbone.open(backbone, require)
    want = rec.get("hash") if rec else None
    if want and bb.content_hash != want:
        comps = rec.get("components") or {}
        differ = [c for c, h in comps.items() if bb.component_hashes.get(c) != h] or ["transformer/vae"]
        raise CheckpointError(
            f"{checkpoint.path} was trained over the backbone {rec.get('path')} (content hash {str(want)[:16]}), but "
            f"{bb.root} has content hash {bb.content_hash[:16]}: its {', '.join(d + '/' for d in differ)} differ. "
            f"Use the backbone the checkpoint was trained over")
    return bb


def load_policy(path: str | os.PathLike, device: str | torch.device = "cpu", *, backbone: str | None = None,
                use_ema: bool = True, video_dtype: torch.dtype | None = None, text_cache_dir: str | None = None,
                load_text_encoder: bool | None = None, verify_hashes: bool = True,
                require_processor: bool = False) -> tuple[nn.Module, Any, DiT4DiTConfig]:
    """Rebuild a trained policy from a checkpoint: ``(model in eval mode, processor or None, cfg)``.

    The model is built from the checkpoint's ``config.json``; frozen parts (VAE, frozen text
    encoder) come from ``backbone`` (default: the backbone folder recorded at training time, when
    it exists), whose content hash must equal the recorded one (:func:`check_backbone`). The
    video DiT is not read from the backbone: the checkpoint holds all its weights, so it is built
    empty and filled once. Weights are the EMA weights when present (``use_ema``), else the raw ones.

    Text: ``text_cache_dir`` defaults to the embedding cache recorded at training time (when it
    still exists). ``load_text_encoder`` None (auto) serves a frozen text encoder's embeddings from
    that cache alone, without the 7B model in memory (a prompt not in the cache is then an error
    naming it; add it with ``dit4dit embed-text``); True loads the encoder (new prompts are
    embedded and cached on the fly).
    """
    from ..models.backbone import needed_components
    from ..models.dit4dit import DiT4DiT

    ck = load_checkpoint(path, verify_hashes=verify_hashes)
    cfg = ck.config
    processor = ck.processor()  # checked against the config before anything heavy is built
    if processor is None and require_processor:
        raise CheckpointError(f"{ck.path}: no {PROCESSOR_FILE}; this use needs the checkpoint's processor (schema, "
                              "normalisation statistics, input protocol), which training writes into every "
                              "checkpoint folder")
    if text_cache_dir is None:
        recorded = ck.state.get("text_cache")
        if recorded and Path(recorded).is_dir():
            text_cache_dir = recorded
    if load_text_encoder is None:
        load_text_encoder = not (cfg.text.kind == "cosmos_reason1" and text_cache_dir is not None)
    need = needed_components(cfg, load_text_encoder=load_text_encoder, text_cache=text_cache_dir is not None)
    bb = check_backbone(ck, backbone, require=need)
    frozen = [c for c in need if c != "transformer"]
    if bb is None and frozen:
        raise CheckpointError(f"{ck.path}: the model needs {', '.join(c + '/' for c in frozen)} of a "
                              f"Cosmos-Predict2.5 backbone folder and the checkpoint records none; pass "
                              f"backbone=PATH (--backbone PATH)")
    try:
        model = DiT4DiT.from_config(cfg, bb, text_cache_dir=text_cache_dir, load_text_encoder=load_text_encoder,
                                    video_dtype=video_dtype, load_video_weights=False)
    except (FileNotFoundError, OSError) as e:
        raise CheckpointError(f"{ck.path}: cannot build the model's frozen parts ({e}); pass backbone= (the "
                              f"Cosmos-Predict2.5 folder the run was trained from)") from e
    if use_ema and ck.has_ema:
        weights, source = ck.ema_state(), str(ck.path / EMA_FILE)
    else:
        weights, source = ck.model_state(), str(ck.path / MODEL_FILE)
    load_weights(model, weights, source)
    model.to(device)
    model.eval()
    return model, processor, cfg
