"""What the simulator evaluation clients share: trials over tasks, one record per episode, resume,
videos and the summary with Wilson 95% intervals.

A client (``dit4dit eval libero``, ``dit4dit eval robocasa-gr1``) describes its benchmark as a
:class:`BenchmarkClient`: the tasks, how to open a task's environment, one episode of a trial (a
:class:`~dit4dit.serve.rollout.ClientEpisode`) and the fields of its record. :func:`run_trials`
runs every trial not done yet through :func:`~dit4dit.serve.rollout.run_episode` (the episode loop
every client shares) and appends each finished episode to the output folder's ``episodes.jsonl``
(:class:`EpisodeLog`), so that a run cut short continues where it stopped (``--resume``).
:func:`summarize` turns the records into per-task and overall success rates with Wilson 95%
intervals; :func:`finish_run` writes ``results.json`` and closes the manifest.

Output folder: ``manifest.json`` (protocol, server metadata, versions, command),
``episodes.jsonl`` (one JSON line per finished episode), ``results.json``, ``videos/``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..jsonio import write_json
from ..serve.executor import ActionChunkExecutor
from ..serve.rollout import ClientEpisode, Rollout, chunk_executor, run_episode
from ..stats import wilson_interval

EPISODES_FILE = "episodes.jsonl"
RESULTS_FILE = "results.json"
MANIFEST_FILE = "manifest.json"
VIDEOS_DIR = "videos"

Progress = Callable[[int, int, dict[str, Any]], None]


# --------------------------------------------------------------------------------------------
# the output folder
# --------------------------------------------------------------------------------------------


def read_episodes(path: str | os.PathLike) -> dict[tuple[int, int], dict[str, Any]]:
    """The records of an ``episodes.jsonl`` by ``(task_id, trial)`` ({} when the file is absent).
    A line cut by a crash (or otherwise unreadable) is skipped: that episode runs again."""
    done: dict[tuple[int, int], dict[str, Any]] = {}
    path = Path(path)
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
                done[(int(rec["task_id"]), int(rec["trial"]))] = rec
            except (ValueError, KeyError, TypeError):
                continue
    return done


def write_video(frames: Sequence[np.ndarray], path: Path, fps: float = 20.0) -> Path | None:
    """mp4 via PyAV (the data pipeline's encoder), GIF when no encoder is available."""
    if not frames:
        return None
    arr = np.stack(frames).astype(np.uint8)
    h, w = arr.shape[1:3]
    arr = arr[:, : h - h % 2, : w - w % 2]
    try:
        from ..data.video import VideoEncoder

        with VideoEncoder(path, fps, arr.shape[2], arr.shape[1], codec="h264", crf=23, gop=None) as enc:
            enc.write(arr)
        return path
    except Exception:  # noqa: BLE001 - no working encoder in this FFmpeg build
        from .report import save_gif

        return save_gif(arr[::2], path.with_suffix(".gif"), fps=fps / 2, scale=1)


class EpisodeLog:
    """The episodes of an evaluation output folder: those done (read back on ``resume``) and the
    open ``episodes.jsonl`` each finished episode is appended to (flushed at once: a crash loses
    at most the running episode). Use it as a context manager around the trials.

    Without ``resume``, a folder whose ``episodes.jsonl`` already holds episodes is refused
    (``FileExistsError``): a new run never mixes with an old one."""

    def __init__(self, out_dir: str | os.PathLike, *, resume: bool = False) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / VIDEOS_DIR).mkdir(exist_ok=True)
        self.path = self.out / EPISODES_FILE
        if not resume and self.path.exists() and self.path.stat().st_size > 0:
            raise FileExistsError(f"{self.path} exists: pass resume=True (--resume) to continue that run, or "
                                  "choose another output folder")
        self.done = read_episodes(self.path) if resume else {}
        self.resumed = len(self.done)
        self._file: Any = None

    def __enter__(self) -> "EpisodeLog":
        self._file = open(self.path, "a")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def is_done(self, task_id: int, trial: int) -> bool:
        return (int(task_id), int(trial)) in self.done

    def videos(self, task_id: int) -> int:
        """How many episodes of ``task_id`` have a video already."""
        return sum(1 for (t, _), r in self.done.items() if t == task_id and r.get("video"))

    def add(self, rec: Mapping[str, Any], frames: Sequence[np.ndarray] | None = None,
            name: str | None = None) -> dict[str, Any]:
        """Save the episode's video (``frames`` as ``videos/<name>``, when given), append its record
        (``task_id``, ``trial``, ...) and mark it done. Returns the record with its ``video`` path
        relative to the folder (or None)."""
        if self._file is None:
            raise RuntimeError("EpisodeLog.add outside its `with` block")
        video = None
        if frames is not None:
            written = write_video(frames, self.out / VIDEOS_DIR / str(name))
            video = str(written.relative_to(self.out)) if written else None
        rec = {**rec, "video": video}
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        self.done[(int(rec["task_id"]), int(rec["trial"]))] = rec
        return rec

    def records(self, task_ids: Sequence[int] | Mapping[int, Any], num_trials: int) -> list[dict[str, Any]]:
        """The records of trials ``0 .. num_trials - 1`` of ``task_ids``."""
        tasks = set(task_ids)
        return [r for (t, i), r in self.done.items() if t in tasks and i < num_trials]


def server_metadata(policy: Any, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``metadata`` when given, else what the policy reports: a websocket client's server metadata,
    a local policy's ``metadata()``, else {}."""
    if metadata is None:
        if hasattr(policy, "get_server_metadata"):
            metadata = policy.get_server_metadata()
        elif hasattr(policy, "metadata"):
            metadata = policy.metadata()
        else:
            metadata = {}
    return dict(metadata)


def client_info() -> dict[str, Any]:
    """The evaluating side's versions, recorded in the manifest."""
    from .. import __version__

    return {"dit4dit": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "numpy": np.__version__}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_manifest(out: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
    write_json(Path(out) / MANIFEST_FILE, manifest, indent=2, default=str)


def finish_run(out: str | os.PathLike, manifest: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """Write ``results.json`` and the manifest with its ``finished`` time; returns ``results``."""
    write_json(Path(out) / RESULTS_FILE, results, indent=2, default=str)
    manifest["finished"] = results.get("finished")
    write_manifest(out, manifest)
    return results


# --------------------------------------------------------------------------------------------
# trials
# --------------------------------------------------------------------------------------------


class BenchmarkClient:
    """The environment-specific half of a benchmark client (subclass it).

    ``tasks``: task id -> what the results record about the task (name, description, ...);
    ``max_steps``: the action limit of an episode; ``replan_steps``, ``horizon``,
    ``ensemble_decay``: how action chunks are executed (:func:`chunk_executor`)."""

    tasks: dict[int, dict[str, Any]]
    max_steps: int
    replan_steps: int | None = None
    horizon: int | None = None
    ensemble_decay: float | None = None

    def open_task(self, task_id: int) -> Any:
        """The environment the trials of ``task_id`` run in (closed after them when it has ``close``)."""
        raise NotImplementedError

    def episode(self, env: Any, task_id: int, trial: int) -> ClientEpisode:
        """Trial ``trial`` of ``task_id`` in ``env``."""
        raise NotImplementedError

    def record(self, task_id: int, trial: int) -> dict[str, Any]:
        """The fields of an episode's record before its outcome (at least ``task_id`` and ``trial``)."""
        return {"task_id": task_id, "trial": trial}

    def video_name(self, task_id: int, trial: int, success: bool) -> str:
        return f"task{task_id:02d}_trial{trial:02d}_{'success' if success else 'failure'}.mp4"

    def executor(self, policy: Any) -> ActionChunkExecutor:
        return chunk_executor(policy, self.replan_steps, self.horizon, ensemble_decay=self.ensemble_decay)


def run_trials(policy: Any, client: BenchmarkClient, log: EpisodeLog, num_trials: int, *,
               videos_per_task: int = 2, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Run trials ``0 .. num_trials - 1`` of every task of ``client`` not in ``log`` yet (the
    policy's ``reset`` before each, when it has one), recording the first ``videos_per_task``
    episodes of each task (all when negative). Returns the records of those trials, resumed ones
    included."""
    total = len(client.tasks) * num_trials
    count = len(log.records(client.tasks, num_trials))
    with log:
        for tid in client.tasks:
            todo = [i for i in range(num_trials) if not log.is_done(tid, i)]
            if not todo:
                continue
            env = client.open_task(tid)
            try:
                recorded = log.videos(tid)
                for trial in todo:
                    if hasattr(policy, "reset"):
                        policy.reset()
                    record = videos_per_task < 0 or recorded < videos_per_task
                    ep: Rollout = run_episode(client.episode(env, tid, trial), client.executor(policy),
                                              client.max_steps, record=record)
                    rec = log.add({**client.record(tid, trial), "success": ep.success, "steps": ep.steps,
                                   "queries": ep.queries, "seconds": round(ep.seconds, 3)},
                                  ep.frames if record else None, client.video_name(tid, trial, ep.success))
                    recorded += record
                    count += 1
                    if progress:
                        progress(count, total, rec)
            finally:
                close = getattr(env, "close", None)
                if close:
                    close()
    return log.records(client.tasks, num_trials)


def summarize(records: Sequence[Mapping[str, Any]], task_info: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Per-task and overall successes, rates and Wilson 95% intervals, and the mean of the
    per-task rates, from episode records (``task_id``, ``success``)."""
    per_task = []
    for tid in sorted(task_info):
        recs = [r for r in records if int(r["task_id"]) == tid]
        s, n = sum(bool(r["success"]) for r in recs), len(recs)
        lo, hi = wilson_interval(s, n)
        per_task.append({"task_id": tid, **task_info[tid], "successes": s, "trials": n,
                         "success_rate": s / n if n else None, "ci95": [lo, hi]})
    s_all = sum(t["successes"] for t in per_task)
    n_all = sum(t["trials"] for t in per_task)
    rates = [t["success_rate"] for t in per_task if t["success_rate"] is not None]
    return {"per_task": per_task, "successes": s_all, "episodes": n_all,
            "success_rate": s_all / n_all if n_all else None, "ci95": list(wilson_interval(s_all, n_all)),
            "mean_task_success_rate": float(np.mean(rates)) if rates else None}
