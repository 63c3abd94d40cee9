"""Initialising a model from another run (``train.init_from``, ``--init``): tensor by tensor by
name and shape, a fitted codec taken whole, ``train.init_parts`` choosing the parts, and a report
of what loaded and what kept its fresh initialisation."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Sequence

import torch
from torch import nn

from ..config import DiT4DiTConfig
from .checkpoint import EMA_FILE, MODEL_FILE, load_checkpoint, saved_parts
from .tensor_files import CheckpointError, stored_shape, tensor_shape


def text_differences(a: Any, b: Any) -> list[str]:
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
        diff = text_differences(config.text, ck.config.text)
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
            shape = stored_shape(state, name)
            if shape != tensor_shape(target):
                if module is codec:  # the latents the video DiT was trained on: all or an error
                    raise CheckpointError(f"{source}: its codec tensor {name} has shape {shape}, this model's "
                                          f"{tensor_shape(target)}: the codecs differ (codec.* in the configs)")
                report["mismatched"].append({"name": name, "checkpoint": list(shape), "model": list(tensor_shape(target))})
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
