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
videos/ (the shared loop and output folder of :mod:`dit4dit.eval.episodes`; this module holds the
GR1 protocol, observation / action mapping and episode, :class:`GR1Episode`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..serve.executor import FrameHistory
from ..serve.rollout import ClientEpisode, Rollout, chunk_executor, resize_image, run_episode as run_client_episode
from .episodes import BenchmarkClient, EpisodeLog, client_info, finish_run, now
from .episodes import run_trials, server_metadata, summarize, write_manifest

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


class GR1Episode(ClientEpisode):
    """One trial: ``env.reset(seed=seed)``, then actions until ``info["success"]`` (success) or
    the env ends the episode."""

    def __init__(self, env: Any, seed: int, builder: GR1ObservationBuilder) -> None:
        self.env, self.seed, self.builder = env, seed, builder
        self.raw: Any = None
        self._image: np.ndarray | None = None

    def reset(self) -> None:
        self.builder.reset()
        self.raw, _info = self.env.reset(seed=self.seed)

    def observe(self) -> Any:
        self._image = self.builder.push(self.raw)
        return self.raw

    def request(self, raw: Any) -> dict[str, Any]:
        return self.builder.build(raw)

    def act(self, action: np.ndarray) -> tuple[bool, bool]:
        self.raw, _reward, terminated, truncated, info = self.env.step(split_action(action))
        return _success(info), bool(terminated or truncated)

    def video_frame(self, raw: Any) -> np.ndarray | None:
        return self._image  # the ego view as sent (resized to the server's camera size)


def run_episode(env: Any, policy: Any, seed: int, protocol: GR1Protocol, builder: GR1ObservationBuilder, *,
                record: bool = False, horizon: int | None = None) -> Rollout:
    """One trial (:class:`GR1Episode`) with ``policy``."""
    executor = chunk_executor(policy, protocol.replan_steps, horizon, ensemble_decay=protocol.ensemble_decay)
    return run_client_episode(GR1Episode(env, seed, builder), executor, protocol.max_steps, record=record)


class _GR1Client(BenchmarkClient):
    def __init__(self, suite: Any, protocol: GR1Protocol, builder: GR1ObservationBuilder,
                 horizon: int | None) -> None:
        self.suite, self.protocol, self.builder = suite, protocol, builder
        self.tasks = {tid: {"name": task, "env_id": protocol.env_id_template.format(task=task)}
                      for tid, task in enumerate(protocol.task_list)}
        self.max_steps = protocol.max_steps
        self.replan_steps, self.horizon, self.ensemble_decay = protocol.replan_steps, horizon, protocol.ensemble_decay

    def open_task(self, task_id: int) -> Any:
        return self.suite.make_env(self.tasks[task_id]["name"])

    def episode(self, env: Any, task_id: int, trial: int) -> ClientEpisode:
        return GR1Episode(env, self.protocol.seed + trial, self.builder)

    def record(self, task_id: int, trial: int) -> dict[str, Any]:
        return {"task_id": task_id, "task": self.tasks[task_id]["name"], "trial": trial}

    def video_name(self, task_id: int, trial: int, success: bool) -> str:
        return f"{task_id:02d}_{self.tasks[task_id]['name']}_trial{trial:02d}_{'success' if success else 'failure'}.mp4"


def evaluate_gr1(policy: Any, suite: Any, protocol: GR1Protocol, out_dir: str | os.PathLike, *,
                 videos_per_task: int = 1, resume: bool = False, metadata: Mapping[str, Any] | None = None,
                 progress: Callable[[int, int, dict[str, Any]], None] | None = None,
                 command: Sequence[str] | None = None) -> dict[str, Any]:
    """Run ``protocol`` with ``policy`` on ``suite`` (:class:`GR1Suite` or anything with
    ``make_env(task)``)."""
    log = EpisodeLog(out_dir, resume=resume)
    metadata = server_metadata(policy, metadata)
    dim = metadata.get("action_dim")
    if dim is not None and int(dim) != ACTION_DIM:
        raise ValueError(f"the server's policy outputs {dim}-D actions; RoboCasa GR1 needs {ACTION_DIM}")
    builder = GR1ObservationBuilder(metadata, strip_prefix=protocol.strip_language_prefix)
    manifest = {"benchmark": "robocasa_gr1", "protocol": protocol.to_dict(),
                "suite": suite.info() if hasattr(suite, "info") else {}, "server_metadata": metadata,
                "state_layout": builder.layout, "client": client_info(),
                "command": list(command) if command is not None else None,
                "started": now(), "resumed_episodes": log.resumed}
    write_manifest(log.out, manifest)
    horizon = metadata.get("action_horizon")
    client = _GR1Client(suite, protocol, builder, int(horizon) if horizon else None)
    records = run_trials(policy, client, log, protocol.num_trials, videos_per_task=videos_per_task,
                         progress=progress)
    results = {"benchmark": "robocasa_gr1", "standard_protocol": protocol.standard,
               **summarize(records, client.tasks), "model_version": metadata.get("model_version"),
               "finished": now()}
    return finish_run(log.out, manifest, results)


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
