"""How much of a small coloured marker survives a PCA codec round trip, by channel count.

MetaWorld push-v3 shows its goal as a green dot of about one pixel at 64 x 64. This probe fits
the PCA codec as training does (on the clips of 256 seeded samples) and measures, on frames of
one task, how much of the marker's colour contrast (green minus the larger of red and blue, over
pixels where it exceeds 0.6) is left after encode + decode.

    python benchmarks/probes/codec_goal_marker.py DATASET [--task-word puck] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from dit4dit.demo import METAWORLD_OVERRIDES
from dit4dit.config import get_preset
from dit4dit.models.codecs import PCACodec
from dit4dit.train.trainer import CODEC_FIT_SAMPLES, build_training_data

SETTINGS = ((8, 16), (8, 32), (8, 48), (8, 64), (8, 96), (4, 16), (4, 24))


def green_excess(x: torch.Tensor) -> torch.Tensor:
    return x[:, 1] - torch.maximum(x[:, 0], x[:, 2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset")
    ap.add_argument("--task-word", default="puck", help="frames of the task whose instruction holds this word")
    ap.add_argument("--frames", type=int, default=400)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = get_preset("tiny", list(METAWORLD_OVERRIDES))
    samples, _ = build_training_data(cfg, args.dataset, progress=False, frame_cache=True)
    g = torch.Generator().manual_seed(0)
    fit_idx = torch.randperm(len(samples), generator=g)[:CODEC_FIT_SAMPLES].tolist()
    fit = torch.stack([samples[i]["video"] for i in fit_idx]).float()
    idx = [i for i in range(0, len(samples), 3) if args.task_word in samples[i]["instruction"]][:args.frames]
    if not idx:
        raise SystemExit(f"{args.dataset}: no sample whose instruction contains {args.task_word!r}")
    frames = torch.stack([samples[i]["video"] for i in idx])[:, :, :1].float()
    mask = green_excess(frames) > 0.6
    base = float(green_excess(frames)[mask].mean())
    rows = []
    for factor, channels in SETTINGS:
        codec = PCACodec(factor, channels)
        explained = codec.fit(fit)
        with torch.no_grad():
            rec = codec.decode(codec.encode(frames))
        rows.append({"pixel_factor": factor, "channels": channels, "explained_variance": round(explained, 5),
                     "marker_contrast_kept": round(float(green_excess(rec)[mask].mean()) / base, 4),
                     "frame_mse": round(float(((rec - frames) ** 2).mean()), 6)})
        print(rows[-1])
    out = {"probe": "codec_goal_marker", "dataset": args.dataset, "task_word": args.task_word, "frames": len(idx),
           "marker_pixels": int(mask.sum()), "marker_contrast": round(base, 4), "rows": rows,
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
