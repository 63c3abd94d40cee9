"""Pictures and a Markdown report: training curves, predicted-vs-real future frames, rollout GIFs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image


def to_uint8(frames: Any) -> np.ndarray:
    """(3, T, H, W) float in [-1, 1] (tensor or array) -> (T, H, W, 3) uint8."""
    a = frames.detach().cpu().float().numpy() if hasattr(frames, "detach") else np.asarray(frames, dtype=np.float32)
    a = np.clip((a + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return np.transpose(a, (1, 2, 3, 0))


def frame_strip(rows: Sequence[np.ndarray], scale: int = 2, gap: int = 2) -> Image.Image:
    """Stack rows of frames (each (T, H, W, 3) uint8) into one image, rows top to bottom."""
    t = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[1:3]
    canvas = np.full((len(rows) * (h + gap) - gap, t * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for i, r in enumerate(rows):
        for j in range(r.shape[0]):
            canvas[i * (h + gap): i * (h + gap) + h, j * (w + gap): j * (w + gap) + w] = r[j]
    img = Image.fromarray(canvas)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale != 1 else img


def save_gif(frames: np.ndarray, path: str | Path, fps: float = 10, scale: int = 2) -> Path:
    """(T, H, W, 3) uint8 -> animated GIF."""
    path = Path(path)
    imgs = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in frames]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
    return path


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(metrics_jsonl: str | Path, out_png: str | Path, keys: Sequence[str] = ("loss", "loss_action",
                                                                                         "loss_video")) -> Path | None:
    """Training curves from the run's `metrics.jsonl` (one JSON object per logged step)."""
    path = Path(metrics_jsonl)
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "step" in r]
    if not rows:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r]
        if pts:
            s, v = zip(*pts)
            ax.plot(s, v, label=k)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)
