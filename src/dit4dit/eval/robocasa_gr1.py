"""RoboCasa GR1 tabletop evaluation client (Fourier GR1, arms + waist + hands, 29-D actions).

For users who have the simulator (``robocasa`` from the GR1 tabletop-tasks fork + ``robosuite``;
not installable offline, so it is imported lazily). ``dit4dit eval robocasa-gr1 --server
HOST:PORT`` runs the 24 tabletop tasks through their gymnasium ids
``gr1_unified/<Task>_GR1ArmsAndWaistFourierHands_Env``:

- observation: the ego-view camera (``video.ego_view*``, 256 x 256 from the wrapper),
  ``state.{left_arm, right_arm, left_hand, right_hand, waist}`` and the language annotation;
  the client packs the state into the 44-D GR1 vector of the LeRobot GR1 datasets (left_arm
  0:7, left_hand 7:13, legs and neck zero, right_arm 22:29, right_hand 29:35, waist 41:44) that
  the ``robocasa_gr1`` schema slices (or a compact 29-D vector when the server asks for one);
- action: the server's 29-D chunk in schema order (left_arm 7, right_arm 7, left_hand 6,
  right_hand 6, waist 3) is split into the env's ``action.*`` dict;
- ``num_trials`` episodes per task (seeds ``seed + trial``), at most 720 env steps, success =
  ``info["success"]`` at any step; 16 actions of each chunk executed before replanning
  (GR00T's evaluation setting) unless told otherwise.

Outputs are the same as the LIBERO client's: manifest.json, episodes.jsonl, results.json,
videos/.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..serve.executor import ActionChunkExecutor, FrameHistory
from .libero import _read_done, _write_json, log_episode, resize_image, summarize

GR1_TASKS = (
    "PnPCupToDrawerClose",
    "PnPPotatoToMicrowaveClose",
    "PnPMilkToMicrowaveClose",
    "PnPBottleToCabinetClose",
    "PnPWineToCabinetClose",
    "PnPCanToDrawerClose",
    "PosttrainPnPNovelFromCuttingboardToBasketSplitA",
    "PosttrainPnPNovelFromCuttingboardToCardboardboxSplitA",
    "PosttrainPnPNovelFromCuttingboardToPanSplitA",
    "PosttrainPnPNovelFromCuttingboardToPotSplitA",
    "PosttrainPnPNovelFromCuttingboardToTieredbasketSplitA",
    "PosttrainPnPNovelFromPlacematToBasketSplitA",
    "PosttrainPnPNovelFromPlacematToBowlSplitA",
    "PosttrainPnPNovelFromPlacematToPlateSplitA",
    "PosttrainPnPNovelFromPlacematToTieredshelfSplitA",
    "PosttrainPnPNovelFromPlateToBowlSplitA",
    "PosttrainPnPNovelFromPlateToCardboardboxSplitA",
    "PosttrainPnPNovelFromPlateToPanSplitA",
    "PosttrainPnPNovelFromPlateToPlateSplitA",
    "PosttrainPnPNovelFromTrayToCardboardboxSplitA",
    "PosttrainPnPNovelFromTrayToPlateSplitA",
    "PosttrainPnPNovelFromTrayToPotSplitA",
    "PosttrainPnPNovelFromTrayToTieredbasketSplitA",
    "PosttrainPnPNovelFromTrayToTieredshelfSplitA",
)
ENV_ID_TEMPLATE = "gr1_unified/{task}_GR1ArmsAndWaistFourierHands_Env"
# (part, width, slice in the 44-D GR1 vector), in the 29-D action order of the robocasa_gr1 schema
GR1_PARTS = (("left_arm", 7, slice(0, 7)), ("right_arm", 7, slice(22, 29)), ("left_hand", 6, slice(7, 13)),
             ("right_hand", 6, slice(29, 35)), ("waist", 3, slice(41, 44)))
ACTION_DIM = sum(w for _, w, _ in GR1_PARTS)  # 29
MAX_EPISODE_STEPS = 720
DEFAULT_TRIALS = 50
DEFAULT_REPLAN = 16
LANGUAGE_KEYS = ("annotation.human.coarse_action", "annotation.human.action.task_description", "language")
_PREFIX = re.compile(r"^(unlocked_waist|locked_waist):\s*")

INSTALL_HINT = ("RoboCasa GR1 is not installed: it needs `robosuite` and the GR1 tabletop-tasks fork of `robocasa` "
                "(with its assets), which are not on PyPI; install them as their README says, then rerun.")


class RoboCasaNotInstalled(ImportError):
    pass


@dataclass
class GR1Protocol:
    num_trials: int = DEFAULT_TRIALS
    seed: int = 0
    max_steps: int = MAX_EPISODE_STEPS
    replan_steps: int | None = DEFAULT_REPLAN
    ensemble_decay: float | None = None
    tasks: list[str] | None = None  # None: all 24
    env_id_template: str = ENV_ID_TEMPLATE
    strip_language_prefix: bool = False  # send "unlocked_waist: <task>" as the env gives it

    @property
    def task_list(self) -> list[str]:
        return list(self.tasks) if self.tasks is not None else list(GR1_TASKS)

    @property
    def standard(self) -> bool:
        return (self.num_trials == DEFAULT_TRIALS and self.max_steps == MAX_EPISODE_STEPS and self.tasks is None
                and self.env_id_template == ENV_ID_TEMPLATE)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(standard=self.standard, task_list=self.task_list,
                 success="info['success'] true at any step within max_steps env steps",
                 episode_seeds="seed + trial")
        return d


def import_gym_robocasa() -> Any:
    """gymnasium with the GR1 envs registered, or a clear RoboCasaNotInstalled."""
    try:
        import gymnasium as gym
        import robocasa  # noqa: F401
        import robosuite  # noqa: F401
        from robocasa.utils.gym_utils import GrootRoboCasaEnv  # noqa: F401 - registers the env ids
    except ImportError as e:
        raise RoboCasaNotInstalled(f"{INSTALL_HINT} ({e})") from e
    return gym


class GR1Suite:
    """The real environments (lazy import)."""

    def __init__(self, env_id_template: str = ENV_ID_TEMPLATE) -> None:
        self._gym = import_gym_robocasa()
        self.template = env_id_template

    def make_env(self, task: str) -> Any:
        return self._gym.make(self.template.format(task=task), enable_render=True)

    def info(self) -> dict[str, Any]:
        import importlib.metadata as md

        out = {}
        for dist in ("robocasa", "robosuite", "gymnasium"):
            try:
                out[dist] = md.version(dist)
            except md.PackageNotFoundError:
                out[dist] = None
        return out


# --------------------------------------------------------------------------------------------
# observation / action mapping
# --------------------------------------------------------------------------------------------


def find_camera_key(raw: Mapping[str, Any]) -> str:
    cands = [k for k in raw if isinstance(k, str) and k.startswith("video.") and "ego_view" in k]
    plain = [k for k in cands if "bg_crop" not in k]
    if plain or cands:
        return sorted(plain or cands, key=len)[0]
    vids = [k for k in raw if isinstance(k, str) and k.startswith("video.")]
    if not vids:
        raise KeyError(f"the GR1 observation has no video.* key (keys {sorted(map(str, raw))})")
    return vids[0]


def gr1_state(raw: Mapping[str, Any], layout: str = "gr1_44") -> np.ndarray:
    parts = {}
    for name, width, _ in GR1_PARTS:
        key = f"state.{name}"
        if key not in raw:
            raise KeyError(f"the GR1 observation lacks {key!r} (keys {sorted(map(str, raw))})")
        v = np.asarray(raw[key], np.float64).reshape(-1)
        if v.shape[0] != width:
            raise ValueError(f"{key}: expected {width} values, got {v.shape[0]}")
        parts[name] = v
    if layout == "compact_29":
        return np.concatenate([parts[n] for n, _, _ in GR1_PARTS]).astype(np.float32)
    out = np.zeros(44, np.float64)
    for name, _, sl in GR1_PARTS:
        out[sl] = parts[name]
    return out.astype(np.float32)


def gr1_language(raw: Mapping[str, Any], strip_prefix: bool = False) -> str:
    for k in LANGUAGE_KEYS:
        if k in raw:
            text = raw[k]
            text = text.decode() if isinstance(text, bytes) else str(text)
            return _PREFIX.sub("", text) if strip_prefix else text
    raise KeyError(f"the GR1 observation has no language key ({LANGUAGE_KEYS})")


def split_action(action: np.ndarray) -> dict[str, np.ndarray]:
    a = np.asarray(action, np.float64).reshape(-1)
    if a.shape[0] != ACTION_DIM:
        raise ValueError(f"expected a {ACTION_DIM}-D GR1 action, got {a.shape[0]}")
    out, off = {}, 0
    for name, width, _ in GR1_PARTS:
        out[f"action.{name}"] = a[off:off + width].copy()
        off += width
    return out


class GR1ObservationBuilder:
    def __init__(self, metadata: Mapping[str, Any], strip_prefix: bool = False) -> None:
        cams = list(metadata.get("cameras") or ["observation.images.ego_view"])
        if len(cams) != 1:
            raise ValueError(f"the server expects cameras {cams}; RoboCasa GR1 gives one ego view")
        self.camera = cams[0]
        size = (metadata.get("camera_sizes") or {}).get(self.camera)
        self.size = tuple(size) if size else None
        stops = []
        keys = []
        for sk in metadata.get("state_keys") or ["observation.state[0:44]"]:
            m = re.fullmatch(r"(.+)\[(\d+):(\d+)\]", str(sk))
            if m:
                keys.append(m.group(1))
                stops.append(int(m.group(3)))
        self.state_key = keys[0] if keys else "observation.state"
        self.layout = "compact_29" if stops and max(stops) <= ACTION_DIM else "gr1_44"
        self.strip_prefix = strip_prefix
        self.history = FrameHistory(int(metadata.get("num_cond_frames") or 1), int(metadata.get("frame_stride") or 1))

    def reset(self) -> None:
        self.history.reset()

    def push(self, raw: Mapping[str, Any]) -> np.ndarray:
        img = np.ascontiguousarray(np.asarray(raw[find_camera_key(raw)], np.uint8))
        if self.size is not None:
            img = resize_image(img, self.size)
        self.history.push(img)
        return img

    def build(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        return {self.camera: self.history.frames(), self.state_key: gr1_state(raw, self.layout),
                "prompt": gr1_language(raw, self.strip_prefix)}


def _success(info: Any) -> bool:
    if not isinstance(info, Mapping) or "success" not in info:
        return False
    return bool(np.any(np.asarray(info["success"])))


def run_episode(env: Any, policy: Any, seed: int, protocol: GR1Protocol, builder: GR1ObservationBuilder, *,
                record: bool = False, horizon: int | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    execute = protocol.replan_steps if protocol.replan_steps is None or horizon is None else \
        min(protocol.replan_steps, horizon)
    executor = ActionChunkExecutor(policy, execute, ensemble_decay=protocol.ensemble_decay)
    builder.reset()
    raw, _info = env.reset(seed=seed)
    frames = []
    success = False
    steps = 0
    while steps < protocol.max_steps:
        img = builder.push(raw)
        if record:
            frames.append(img)
        obs = builder.build(raw) if executor.needs_query() else None
        action = executor.act(obs)
        raw, _reward, terminated, truncated, info = env.step(split_action(action))
        steps += 1
        if _success(info):
            success = True
            break
        if terminated or truncated:
            break
    return {"success": success, "steps": steps, "queries": executor.num_queries,
            "seconds": round(time.perf_counter() - t0, 3), "frames": frames}


def evaluate_gr1(policy: Any, suite: Any, protocol: GR1Protocol, out_dir: str | os.PathLike, *,
                 videos_per_task: int = 1, resume: bool = False, metadata: Mapping[str, Any] | None = None,
                 progress: Callable[[int, int, dict[str, Any]], None] | None = None,
                 command: Sequence[str] | None = None) -> dict[str, Any]:
    """Run ``protocol`` with ``policy`` on ``suite`` (:class:`GR1Suite` or anything with
    ``make_env(task)``)."""
    from .libero import _version

    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    episodes_path = out / "episodes.jsonl"
    if not resume and episodes_path.exists() and episodes_path.stat().st_size > 0:
        raise FileExistsError(f"{episodes_path} exists: pass resume=True (--resume) or choose another folder")
    done = _read_done(episodes_path) if resume else {}
    if metadata is None:
        metadata = policy.get_server_metadata() if hasattr(policy, "get_server_metadata") else \
            (policy.metadata() if hasattr(policy, "metadata") else {})
    metadata = dict(metadata)
    dim = metadata.get("action_dim")
    if dim is not None and int(dim) != ACTION_DIM:
        raise ValueError(f"the server's policy outputs {dim}-D actions; RoboCasa GR1 needs {ACTION_DIM}")
    builder = GR1ObservationBuilder(metadata, strip_prefix=protocol.strip_language_prefix)
    tasks = protocol.task_list
    manifest = {"benchmark": "robocasa_gr1", "protocol": protocol.to_dict(),
                "suite": suite.info() if hasattr(suite, "info") else {}, "server_metadata": metadata,
                "state_layout": builder.layout,
                "client": {"dit4dit": _version(), "python": sys.version.split()[0], "platform": platform.platform()},
                "command": list(command) if command is not None else None,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_episodes": len(done)}
    _write_json(out / "manifest.json", manifest)
    horizon = metadata.get("action_horizon")
    total = len(tasks) * protocol.num_trials
    count = sum(1 for k in done if k[0] < len(tasks) and k[1] < protocol.num_trials)
    info: dict[int, dict[str, Any]] = {}
    with open(episodes_path, "a") as log_file:
        for tid, task in enumerate(tasks):
            info[tid] = {"name": task, "env_id": protocol.env_id_template.format(task=task)}
            todo = [i for i in range(protocol.num_trials) if (tid, i) not in done]
            if not todo:
                continue
            env = suite.make_env(task)
            try:
                recorded = sum(1 for (t, _), r in done.items() if t == tid and r.get("video"))
                for trial in todo:
                    if hasattr(policy, "reset"):
                        policy.reset()
                    record = videos_per_task < 0 or recorded < videos_per_task
                    ep = run_episode(env, policy, protocol.seed + trial, protocol, builder, record=record,
                                     horizon=int(horizon) if horizon else None)
                    frames = ep.pop("frames")
                    name = f"{tid:02d}_{task}_trial{trial:02d}_{'success' if ep['success'] else 'failure'}.mp4"
                    rec = log_episode(log_file, done, {"task_id": tid, "task": task, "trial": trial, **ep}, out,
                                      frames if record else None, name)
                    recorded += record
                    count += 1
                    if progress:
                        progress(count, total, rec)
            finally:
                close = getattr(env, "close", None)
                if close:
                    close()
    records = [r for (t, i), r in done.items() if t in info and i < protocol.num_trials]
    results = {"benchmark": "robocasa_gr1", "standard_protocol": protocol.standard, **summarize(records, info),
               "model_version": metadata.get("model_version"), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_json(out / "results.json", results)
    manifest["finished"] = results["finished"]
    _write_json(out / "manifest.json", manifest)
    return results


def main_eval(server: str, out: str | None = None, *, token: str | None = None, trials: int = DEFAULT_TRIALS,
              tasks: Sequence[str] | None = None, seed: int = 0, replan: int | None = DEFAULT_REPLAN,
              ensemble_decay: float | None = None, videos: int = 1, max_steps: int = MAX_EPISODE_STEPS,
              strip_prefix: bool = False, env_id_template: str = ENV_ID_TEMPLATE, resume: bool = False,
              wait: float = 30.0, progress: Callable[[int, int, dict[str, Any]], None] | None = None,
              command: Sequence[str] | None = None) -> dict[str, Any]:
    """What ``dit4dit eval robocasa-gr1`` runs."""
    from ..serve.client import WebsocketClientPolicy, parse_address

    if tasks is not None:
        unknown = [t for t in tasks if t not in GR1_TASKS]
        if unknown:
            raise ValueError(f"unknown GR1 tasks {unknown}; known: {list(GR1_TASKS)}")
    protocol = GR1Protocol(num_trials=trials, seed=seed, max_steps=max_steps, replan_steps=replan,
                           ensemble_decay=ensemble_decay, tasks=list(tasks) if tasks is not None else None,
                           env_id_template=env_id_template, strip_language_prefix=strip_prefix)
    suite = GR1Suite(env_id_template)
    host, port = parse_address(server)
    with WebsocketClientPolicy(host, port, token=token, wait_for_server=wait) as client:
        return evaluate_gr1(client, suite, protocol, out or "eval_robocasa_gr1", videos_per_task=videos,
                            resume=resume, progress=progress, command=command)
