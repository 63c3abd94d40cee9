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

Beside this module: ``tensor_files`` (the safetensors files themselves), ``train_state`` (the
optimiser and RNG states a resume restores) and ``init_from`` (``--init``: a model started from
another run's weights).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..config import ConfigError, DiT4DiTConfig
from ..filehash import file_sha256
from ..jsonio import read_json, write_json
from .tensor_files import (CheckpointError, LazySafetensors, fsync_path, read_safetensors, stored_shape,
                           tensor_header, tensor_shape, write_safetensors)

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


def check_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` naming missing/unexpected keys and shape mismatches."""
    expected: dict[str, tuple[int, ...]] = {}
    for part, module in saved_parts(model).items():
        for k, v in module.state_dict().items():
            expected[f"{part}.{k}"] = tensor_shape(v)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [(k, stored_shape(state, k), expected[k]) for k in expected
                  if k in state and stored_shape(state, k) != expected[k]]
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
    fsync_path(root)


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
        write_safetensors(tmp / MODEL_FILE, model_state, {**meta, "content": "trainable weights"})
        if ema_state is not None:
            write_safetensors(tmp / EMA_FILE, ema_state, {**meta, "content": "EMA of the trainable weights"})
        _maybe_pause(step, tmp)
        if optimizer_state is not None:
            tensors, ometa = optimizer_state
            write_safetensors(tmp / OPTIMIZER_FILE, tensors, meta)
            write_json(tmp / OPTIMIZER_META_FILE, ometa, sort_keys=True)
        if rng_state is not None:
            write_safetensors(tmp / RNG_FILE, rng_state, meta)
        if processor is not None:
            processor.save(tmp)
            if (tmp / PROCESSOR_FILE).is_file():
                fsync_path(tmp / PROCESSOR_FILE)
        state = dict(trainer_state)
        if backbone is not None:
            state["backbone"] = dict(backbone)
        state.update({"format": FORMAT, "version": FORMAT_VERSION, "step": int(step),
                      "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()},
                      "hashes": {p.name: "sha256:" + file_sha256(p) for p in sorted(tmp.iterdir())
                                 if p.is_file() and p.name.endswith(".safetensors")}})
        write_json(tmp / STATE_FILE, state, sort_keys=True)  # written last: its presence marks a complete folder
        fsync_path(tmp)
        final = root / name
        old = None
        if final.exists():
            old = root / f".old-{name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_path(root)
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
                tensor_header(ck / fname)
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
