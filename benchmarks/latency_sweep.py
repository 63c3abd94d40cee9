"""Execution under simulated inference delay on MetaWorld: success and smoothness per mode and delay.

For every (delay, mode) cell it runs `dit4dit.eval.metaworld.evaluate(..., execution=mode,
delay=d)` on the held-out layouts and appends the cell to a JSON file (written atomically), so an
interrupted sweep resumes where it stopped; `--table` prints the Markdown table of what the file
holds. docs/serving.md has the protocol and the measured table.

    python benchmarks/latency_sweep.py --checkpoint demo_out/run --out benchmarks/results/latency_metaworld_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

TASKS = ("button-press-topdown-v3", "drawer-open-v3", "push-v3")
# the cells that decide the comparison first (the zero-delay reference, then the largest delay)
ORDER = [(0, "sync"), (4, "async"), (4, "rtc"), (4, "ensemble"), (4, "sync"), (2, "async"), (2, "rtc"),
         (2, "ensemble"), (2, "sync"), (1, "async"), (1, "rtc"), (1, "ensemble"), (1, "sync"), (0, "rtc"),
         (0, "ensemble"), (0, "async")]


def _load(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"cells": []}


def _save(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def table(doc: dict) -> str:
    """Markdown: one row per cell, delays ascending, modes in a fixed order."""
    modes = ["sync", "async", "ensemble", "rtc"]
    cells = sorted(doc["cells"], key=lambda c: (c["delay"], modes.index(c["execution"])))
    tasks = list(cells[0]["per_task"]) if cells else []
    short = [t.split("-v3")[0] for t in tasks]
    lines = ["| delay d | mode | " + " | ".join(short) + " | all | 95% CI | mean abs. change at chunk boundaries "
             "| mean abs. change per step | held steps |",
             "|---:|---|" + "---:|" * len(tasks) + "---:|---|---:|---:|---:|"]
    for c in cells:
        per = " | ".join(f"{c['per_task'][t]['successes']}/{c['per_task'][t]['episodes']}" for t in tasks)
        b, a = c["latency"]["mean_abs_boundary_change"], c["latency"]["mean_abs_action_change"]
        lines.append(f"| {c['delay']} | {c['execution']} | {per} | {c['success_rate']:.0%} | "
                     f"{c['ci95'][0]:.0%}-{c['ci95'][1]:.0%} | {'-' if b is None else f'{b:.4f}'} | "
                     f"{'-' if a is None else f'{a:.4f}'} | {c['latency']['hold_steps']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="run folder or checkpoint")
    p.add_argument("--out", required=True, help="the JSON file the cells are appended to")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--episodes", type=int, default=10, help="episodes per task and cell")
    p.add_argument("--cells", default=None, help="delay:mode,... (default: all 16, the deciding ones first)")
    p.add_argument("--replan-every", type=int, default=4, help="actions executed per chunk (s)")
    p.add_argument("--ensemble-decay", type=float, default=0.0)
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--note", default="", help="free text stored with every new cell (checkpoint, recipe)")
    p.add_argument("--table", action="store_true", help="print the table of --out and exit")
    args = p.parse_args(argv)
    out = Path(args.out)
    doc = _load(out)
    if args.table:
        sys.stdout.write(table(doc))
        return 0
    if not args.checkpoint:
        p.error("--checkpoint is required to run cells")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from dit4dit.eval.metaworld import evaluate

    torch.set_num_threads(args.threads)
    cells = ORDER if args.cells is None else [(int(c.split(":")[0]), c.split(":")[1]) for c in args.cells.split(",")]
    for delay, mode in cells:
        done = {(c["delay"], c["execution"], c["episodes_per_task"]) for c in doc["cells"]}
        if (delay, mode, args.episodes) in done:
            continue
        print(f"[latency] delay {delay}, {mode}: {args.episodes} episodes per task ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        r = evaluate(args.checkpoint, args.tasks, args.episodes, replan_every=args.replan_every,
                     max_steps=args.max_steps, seed=args.seed, workers=args.workers, threads=args.threads,
                     execution=mode, delay=delay, ensemble_decay=args.ensemble_decay)
        cell = {"delay": delay, "execution": mode, "episodes_per_task": args.episodes,
                "per_task": {t: {k: v[k] for k in ("successes", "episodes", "success_rate", "ci95",
                                                  "mean_steps_to_success")} for t, v in r["per_task"].items()},
                "success_rate": r["success_rate"], "ci95": r["ci95"], "latency": r["latency"],
                "protocol": r["protocol"], "mean_infer_ms": r["timing"]["mean_infer_ms"],
                "seconds": time.perf_counter() - t0, "checkpoint": str(args.checkpoint), "note": args.note,
                "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, "
                           f"{args.threads} thread(s), {args.workers} process(es)"}
        cell["protocol"].pop("layouts", None)
        doc = _load(out)  # another sweep may have appended meanwhile
        doc["cells"].append(cell)
        _save(out, doc)
        lat = r["latency"]
        print(f"[latency] delay {delay}, {mode}: {r['success_rate']:.0%}, boundary change "
              f"{lat['mean_abs_boundary_change']}, per step {lat['mean_abs_action_change']} "
              f"({cell['seconds']:.0f} s)", file=sys.stderr, flush=True)
    sys.stdout.write(table(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
