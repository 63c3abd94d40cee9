"""Run logging: ``RUN/metrics.jsonl`` always, TensorBoard and W&B when available, a text log.

Only rank 0 logs (other ranks get a logger whose methods do nothing). TensorBoard is used when
``train.tensorboard`` is set and the ``tensorboard`` package imports; W&B when ``train.wandb`` is
set and ``wandb`` imports (``WANDB_MODE=offline`` works without a network). Neither is required:
without them the JSONL file still holds every logged value.

``metrics.jsonl``: one JSON object per line, ``{"step": int, "time": unix seconds, "kind": "train" |
"eval" | ..., <metric>: number, ...}``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..progress import tqdm_bar

METRICS_FILE = "metrics.jsonl"
TEXT_LOG_FILE = "train.log"
TENSORBOARD_DIR = "tensorboard"
IMAGES_DIR = "images"

logger = logging.getLogger("dit4dit.train")


def _number(v: Any) -> float | int | None:
    try:
        if isinstance(v, bool):
            return int(v)
        if isinstance(v, int):
            return v
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class RunLogger:
    """Scalars and images of one run. ``enabled=False`` (ranks other than 0) makes it a no-op."""

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True,
                 wandb: bool = False, wandb_project: str = "dit4dit", config: Mapping[str, Any] | None = None,
                 run_name: str | None = None, resume: bool = False, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._wandb = None
        self._file_handler: logging.Handler | None = None
        self.backends: list[str] = []
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_metrics(self.run_dir, resume_step)
        self._jsonl = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        self.backends.append("jsonl")
        self._file_handler = logging.FileHandler(self.run_dir / TEXT_LOG_FILE, encoding="utf-8")
        self._file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(self._file_handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR))
                self.backends.append("tensorboard")
            except Exception as e:  # noqa: BLE001 - tensorboard missing or broken: JSONL only
                logger.info("TensorBoard not available (%s); metrics go to %s", type(e).__name__, METRICS_FILE)
        if wandb:
            try:
                import wandb as wb

                id_file = self.run_dir / "wandb_id.txt"
                run_id = id_file.read_text().strip() if (resume and id_file.is_file()) else None
                if run_id is None:
                    run_id = wb.util.generate_id() if hasattr(wb, "util") else None
                self._wandb = wb.init(project=wandb_project, dir=str(self.run_dir), config=dict(config or {}),
                                      name=run_name or self.run_dir.name, id=run_id, resume="allow")
                if run_id:
                    id_file.write_text(run_id)
                self.backends.append("wandb")
            except Exception as e:  # noqa: BLE001 - W&B is optional
                logger.warning("W&B requested but not available (%s: %s); continuing without it", type(e).__name__, e)

    # ------------------------------------------------------------------ scalars
    def log(self, step: int, metrics: Mapping[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: n for k, v in metrics.items() if (n := _number(v)) is not None}
        row = {"step": int(step), "time": round(time.time(), 3), "kind": kind, **clean}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(f"{kind}/{k}", v, int(step))
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{k}": v for k, v in clean.items()}, step=int(step))

    # ------------------------------------------------------------------ images
    def log_image(self, step: int, tag: str, image: Any) -> Path | None:
        """An (H, W, 3) uint8 (or float in [0, 1]) image: PNG under ``RUN/images/`` + TB/W&B."""
        if not self.enabled:
            return None
        arr = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = np.transpose(arr, (1, 2, 0))
        if arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in tag)
        out = self.run_dir / IMAGES_DIR / f"step_{int(step):06d}_{safe}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            from PIL import Image

            Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).save(out)
        except Exception as e:  # noqa: BLE001
            logger.warning("could not write %s (%s)", out, e)
            out = None
        if self._tb is not None:
            self._tb.add_image(tag, arr, int(step), dataformats="HWC")
            self._tb.flush()
        if self._wandb is not None:
            import wandb as wb

            self._wandb.log({tag: wb.Image(arr)}, step=int(step))
        if self._jsonl is not None and out is not None:
            self._jsonl.write(json.dumps({"step": int(step), "time": round(time.time(), 3), "kind": "image",
                                          "tag": tag, "path": str(out.relative_to(self.run_dir))}) + "\n")
            self._jsonl.flush()
        return out

    def info(self, msg: str, *args: Any) -> None:
        if self.enabled:
            logger.info(msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        if self.enabled:
            logger.warning(msg, *args)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception:  # noqa: BLE001
                pass
            self._wandb = None
        if self._file_handler is not None:
            logger.removeHandler(self._file_handler)
            self._file_handler.close()
            self._file_handler = None


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "train"):
    """The training bar on stderr (steps, rate, ETA) starting at ``initial``, or None when disabled."""
    if not enabled:
        return None
    return tqdm_bar(total, desc, initial=initial, unit="step", smoothing=0.1)


def read_metrics(run_dir: str | os.PathLike, kind: str | None = "train") -> list[dict[str, Any]]:
    """Rows of ``RUN/metrics.jsonl`` (of one ``kind``, or all with ``kind=None``)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if kind is None or row.get("kind") == kind:
            rows.append(row)
    return rows


def truncate_metrics(run_dir: str | os.PathLike, step: int) -> None:
    """Drop rows logged after ``step`` (a resumed run logs those steps again)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if int(row.get("step", 0)) <= step:
            keep.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
    os.replace(tmp, path)
