"""MetaWorld (Sawyer arm, MuJoCo) as a pixel + language benchmark: env wrapper, scripted experts,
demonstration collection into a LeRobot v3.0 dataset (`metaworld_sawyer` schema).

What the policy sees (docs/design.md, "Simulators"): the `corner4` camera image, the hand state (the first four
values of MetaWorld's 39-D observation: hand x, y, z and the gripper opening in [0, 1]) and a
language instruction — never the object or goal positions, which only the scripted experts read.

Layouts. `MT1(task, seed=s)` draws 50 object/goal layouts per task; `set_task` selects one and
`reset()` keeps it. Layout number ``L`` is layout ``L % 50`` of ``MT1(task, seed=LAYOUT_SEED + L // 50)``,
so there are as many layouts as a collection needs, the same on every machine (MetaWorld itself
draws them from NumPy's global generator when no seed is given). In every block of 50 the first 40
are training layouts (`train_layout(i)`: 0..39, 50..89, ...) and the last 10 are held out for
evaluation (`eval_layout(i)`: 40..49, 90..99, ...); `TRAIN_LAYOUTS` and `EVAL_LAYOUTS` are the
first block's.

Actions: (dx, dy, dz, gripper) in [-1, 1]; MetaWorld moves the hand mocap by `action * 0.01` m per
step (frame_skip 5 x 2.5 ms = 12.5 ms a step, i.e. 80 control steps a second). The experts'
continuous grip efforts are snapped to -1 (open) / +1 (close) by default, as the schema's binary
gripper will be at inference; this costs nothing on most tasks but breaks the experts that grasp
with partial effort (basketball, assembly; fewer successes on peg-insert-side, sweep-into: see
docs/metaworld.md), for which ``collect(..., gripper="continuous")`` keeps the raw effort.

Rendering: offscreen through MuJoCo's EGL backend (Mesa's software EGL on a CPU machine) or
OSMesa; :func:`ensure_gl_backend` picks one that works when `MUJOCO_GL` is unset. Shadows,
reflections and multisampling are turned off before the first render (10-20x faster), and the
upside-down frames are flipped on both axes.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..jsonio import write_json

IMAGE_KEY = "observation.images.image"
STATE_KEY = "observation.state"
ACTION_KEY = "action"
DEFAULT_CAMERA = "corner4"
# MetaWorld's own cameras (the `camera_name` values of its envs)
METAWORLD_CAMERAS = ("corner", "corner2", "corner3", "corner4", "topview", "gripperPOV", "behindGripper")


@dataclass(frozen=True)
class CameraView:
    """A fixed camera of our own: MetaWorld's ``base`` camera moved to ``pos`` (world, m), aimed at
    ``lookat`` with vertical field of view ``fovy`` (degrees). Kept upside down like MetaWorld's
    corner cameras, so the same both-axes flip turns its frames upright."""

    base: str
    pos: tuple[float, float, float]
    lookat: tuple[float, float, float]
    fovy: float

    def quat(self) -> np.ndarray:
        """MuJoCo (w, x, y, z) orientation: the camera's -z axis points at ``lookat``."""
        f = np.asarray(self.lookat, np.float64) - np.asarray(self.pos, np.float64)
        f /= np.linalg.norm(f)
        right = np.cross(f, (0.0, 0.0, 1.0))
        right /= np.linalg.norm(right)
        up = np.cross(-f, right)
        rot = np.stack([-right, -up, -f], axis=1)  # columns: camera x, y, z in world axes (rolled 180 deg)
        import mujoco

        q = np.zeros(4)
        mujoco.mju_mat2Quat(q, rot.reshape(-1))
        return q


# corner4_zoom: corner4's position, aimed at the middle of the workspace (the objects' and goals'
# ranges of the default suite) with a 38-degree field of view instead of 60: objects appear about
# 1.7x larger. corner4_close: the same direction of view from 40% nearer (0.82 m from the middle of
# the workspace instead of 1.17 m): push's puck covers about 26 pixels at 64 x 64 (corner4_zoom: 13,
# corner4: 4). Both keep the objects and goals of button-press-topdown, drawer-open and push in view
# through the experts' episodes; corner4_close loses the hand at the top edge while it is high up
# (the hand state still gives its position).
CAMERA_VIEWS: dict[str, CameraView] = {
    "corner4_zoom": CameraView(base="corner4", pos=(0.75, 0.075, 0.7), lookat=(0.0, 0.72, 0.1), fovy=38.0),
    "corner4_close": CameraView(base="corner4", pos=(0.5, 0.35, 0.6), lookat=(0.0, 0.75, 0.08), fovy=38.0),
}


def check_camera(camera: str) -> str:
    if camera not in METAWORLD_CAMERAS and camera not in CAMERA_VIEWS:
        raise MetaWorldError(f"unknown camera {camera!r}; MetaWorld's: {list(METAWORLD_CAMERAS)}, "
                             f"ours: {sorted(CAMERA_VIEWS)}")
    return camera
LAYOUTS_PER_SEED = 50  # MT1(task, seed=...) draws this many layouts
TRAIN_PER_SEED = 40  # the first 40 of each block of 50 are training layouts, the last 10 held out
LAYOUT_SEED = 0  # MT1 seed of layouts 0..49; layout L comes from seed LAYOUT_SEED + L // 50


def train_layout(i: int) -> int:
    """The ``i``-th training layout: 0..39, then 50..89, 100..139, ..."""
    return (i // TRAIN_PER_SEED) * LAYOUTS_PER_SEED + i % TRAIN_PER_SEED


def eval_layout(i: int) -> int:
    """The ``i``-th held-out layout: 40..49, then 90..99, 140..149, ..."""
    held_out = LAYOUTS_PER_SEED - TRAIN_PER_SEED
    return (i // held_out) * LAYOUTS_PER_SEED + TRAIN_PER_SEED + i % held_out


def is_train_layout(layout: int) -> bool:
    return int(layout) % LAYOUTS_PER_SEED < TRAIN_PER_SEED


TRAIN_LAYOUTS: tuple[int, ...] = tuple(train_layout(i) for i in range(TRAIN_PER_SEED))  # 0..39
EVAL_LAYOUTS: tuple[int, ...] = tuple(eval_layout(i) for i in range(LAYOUTS_PER_SEED - TRAIN_PER_SEED))  # 40..49
MAX_PATH_LENGTH = 500  # MetaWorld raises past this many steps without a reset
CONTROL_FPS = 80  # 1 / (frame_skip 5 x timestep 2.5 ms)
STATE_NAMES = ("hand_x", "hand_y", "hand_z", "gripper_open")
ACTION_NAMES = ("dx", "dy", "dz", "gripper")

# One instruction per MetaWorld v3 task (after the task descriptions of the MetaWorld paper).
INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "pick up the nut and place it onto the peg",
    "basketball-v3": "dunk the basketball into the basket",
    "bin-picking-v3": "pick up the puck from one bin and place it into the other bin",
    "box-close-v3": "pick up the lid and close the box with it",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "reach over the wall and press the button from the top",
    "button-press-v3": "press the button",
    "button-press-wall-v3": "reach past the wall and press the button",
    "coffee-button-v3": "push the button on the coffee machine",
    "coffee-pull-v3": "pull the mug out of the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "rotate the dial half a turn",
    "disassemble-v3": "pick the nut off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "lock the door by turning the lock",
    "door-open-v3": "open the door",
    "door-unlock-v3": "unlock the door by turning the lock",
    "hand-insert-v3": "put the gripper into the hole",
    "drawer-close-v3": "push the drawer closed",
    "drawer-open-v3": "open the drawer",
    "faucet-open-v3": "turn the faucet counter-clockwise",
    "faucet-close-v3": "turn the faucet clockwise",
    "hammer-v3": "hammer the nail into the wall",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "pick-out-of-hole-v3": "pick the puck up out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate into the goal",
    "plate-slide-side-v3": "slide the plate sideways into the goal",
    "plate-slide-back-v3": "slide the plate back out of the goal",
    "plate-slide-back-side-v3": "slide the plate sideways back out of the goal",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "peg-unplug-side-v3": "pull the peg out of the hole sideways",
    "soccer-v3": "kick the ball into the goal",
    "stick-push-v3": "grab the stick and push the box with it",
    "stick-pull-v3": "grab the stick and pull the box with it",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck around the wall to the goal",
    "push-back-v3": "push the puck back to the goal",
    "reach-v3": "reach the goal position",
    "reach-wall-v3": "reach over the wall to the goal position",
    "shelf-place-v3": "pick up the puck and place it on the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}


class MetaWorldError(RuntimeError):
    """MetaWorld is missing, a task is unknown, or offscreen rendering cannot work here."""


# --------------------------------------------------------------------------------------------
# Tasks, instructions, the package
# --------------------------------------------------------------------------------------------


def task_name(name: str) -> str:
    """Canonical v3 name: ``push`` / ``push-v3`` / ``push_v3`` -> ``push-v3``."""
    n = name.strip().lower().replace("_", "-")
    if not n.endswith("-v3"):
        if n.endswith("-v2"):
            n = n[:-3]
        n = n + "-v3"
    if n not in INSTRUCTIONS:
        raise MetaWorldError(f"unknown MetaWorld task {name!r}; available: {sorted(INSTRUCTIONS)}")
    return n


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """``"push,reach"`` or a list -> canonical names (order kept, duplicates dropped)."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for t in items:
        if t.strip():
            n = task_name(t)
            if n not in out:
                out.append(n)
    if not out:
        raise MetaWorldError("no MetaWorld task given")
    return out


def instruction(task: str) -> str:
    return INSTRUCTIONS[task_name(task)]


def require_metaworld():
    """Import MetaWorld (after choosing a GL backend), with an install hint when it is missing."""
    ensure_gl_backend()
    try:
        import metaworld  # noqa: F401
        import metaworld.policies  # noqa: F401
    except ImportError as e:
        raise MetaWorldError(f"MetaWorld is not installed ({e}); install it with "
                             "`pip install -e '.[metaworld]'` (metaworld 3.1.1, mujoco 3.3.0)") from e
    return metaworld


# --------------------------------------------------------------------------------------------
# Offscreen rendering backend
# --------------------------------------------------------------------------------------------

GL_BACKENDS = ("egl", "osmesa")
_PROBE = """
import os, sys
b = sys.argv[1]
os.environ["MUJOCO_GL"] = b
os.environ["PYOPENGL_PLATFORM"] = b
mod = __import__("mujoco." + b, fromlist=["GLContext"])
ctx = mod.GLContext(16, 16)
ctx.make_current()
ctx.free()
print("ok")
"""


def _probe_backend(backend: str, timeout: float = 60.0) -> tuple[bool, str]:
    """Can MuJoCo create an offscreen OpenGL context with `backend`? (in a subprocess: the choice
    of PyOpenGL platform cannot be undone inside a process)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM")}
    try:
        r = subprocess.run([sys.executable, "-c", _PROBE, backend], capture_output=True, text=True,
                           timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    if r.returncode == 0 and "ok" in r.stdout:
        return True, ""
    lines = [ln for ln in (r.stderr or "").strip().splitlines() if ln.strip()]
    return False, lines[-1] if lines else f"exit code {r.returncode}"


@functools.lru_cache(maxsize=1)
def ensure_gl_backend() -> str:
    """The MuJoCo offscreen backend to use; sets `MUJOCO_GL` (and `PYOPENGL_PLATFORM`).

    A backend named in `MUJOCO_GL` is used as given. Otherwise EGL (hardware EGL on a GPU machine,
    Mesa's software EGL on a CPU one), then OSMesa, are tried in a subprocess and the first that
    creates a context wins; the choice is exported so worker processes inherit it. Raises
    :class:`MetaWorldError` with the packages to install when neither works.
    """
    chosen = os.environ.get("MUJOCO_GL")
    if chosen:
        return chosen
    errors = {}
    for backend in GL_BACKENDS:
        ok, err = _probe_backend(backend)
        if ok:
            os.environ["MUJOCO_GL"] = backend
            os.environ["PYOPENGL_PLATFORM"] = backend
            return backend
        errors[backend] = err
    raise MetaWorldError(
        "no offscreen OpenGL backend works for MuJoCo here: "
        + "; ".join(f"{b}: {e}" for b, e in errors.items())
        + ". On Debian/Ubuntu install EGL (`apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri`) or "
        "OSMesa (`apt-get install libosmesa6`), or set MUJOCO_GL=egl|osmesa|glfw explicitly."
    )


# --------------------------------------------------------------------------------------------
# The environment
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _benchmark(task: str, layout_seed: int = LAYOUT_SEED):
    metaworld = require_metaworld()
    return metaworld.MT1(task, seed=layout_seed)


def layout_task(task: str, layout: int):
    """MetaWorld's `Task` (what `set_task` takes) for layout number `layout` (module docstring)."""
    if int(layout) < 0:
        raise MetaWorldError(f"layout {layout} must be >= 0")
    block, index = divmod(int(layout), LAYOUTS_PER_SEED)
    return _benchmark(task_name(task), LAYOUT_SEED + block).train_tasks[index]


def layout_vectors(task: str, layouts: Sequence[int] = range(LAYOUTS_PER_SEED)) -> np.ndarray:
    """(len(layouts), k) object/goal positions that define the layouts (MetaWorld's ``rand_vec``)."""
    name = task_name(task)
    env = _benchmark(name, LAYOUT_SEED).train_classes[name]()
    try:
        vecs = []
        for layout in layouts:
            env.set_task(layout_task(name, layout))
            vecs.append(np.array(env._last_rand_vec, dtype=np.float64))
        return np.stack(vecs)
    finally:
        env.close()


def expert_policy(task: str):
    """MetaWorld's scripted expert for `task` (reads the full 39-D state; never the learner's input)."""
    require_metaworld()
    from metaworld.policies import ENV_POLICY_MAP

    return ENV_POLICY_MAP[task_name(task)]()


def binarize_gripper(action: np.ndarray) -> np.ndarray:
    """Clip to [-1, 1] and snap the gripper to -1 (open) / +1 (close) at 0 (float32 copy)."""
    a = np.clip(np.asarray(action, dtype=np.float32).reshape(-1)[:4], -1.0, 1.0).copy()
    a[3] = 1.0 if a[3] > 0 else -1.0
    return a


def _size(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)):
        return int(image_size), int(image_size)
    h, w = (int(v) for v in image_size)
    return h, w


class MetaWorldEnv:
    """One MetaWorld task, rendered from one camera, with the learner's observation dict.

    ``reset(layout)`` selects a layout number (see the module docstring) and returns
    ``{"observation.images.image": uint8 (H, W, 3), "observation.state": float32 (4,),
    "prompt": str}``; ``step(action)`` returns ``(obs, success, done)`` with ``done`` once
    ``max_steps`` steps have run (``step(action, observe=False)`` skips the rendering and returns
    None for obs). ``last_info`` keeps MetaWorld's info dict, ``raw_obs`` the full
    39-D observation (for the scripted expert only). Timing: ``timing`` accumulates the seconds
    spent in physics and in rendering.
    """

    def __init__(self, task: str, layout: int = 0, *, camera: str = DEFAULT_CAMERA,
                 image_size: int | Sequence[int] = 64, max_steps: int = MAX_PATH_LENGTH,
                 instruction: str | None = None, fast_render: bool = True):
        self.task = task_name(task)
        if not 1 <= int(max_steps) <= MAX_PATH_LENGTH:
            raise MetaWorldError(f"max_steps={max_steps} must be in [1, {MAX_PATH_LENGTH}] (MetaWorld's limit)")
        self.max_steps = int(max_steps)
        self.camera = check_camera(camera)
        view = CAMERA_VIEWS.get(camera)
        self.height, self.width = _size(image_size)
        self.instruction = instruction or INSTRUCTIONS[self.task]
        env_class = _benchmark(self.task, LAYOUT_SEED).train_classes[self.task]
        self._env = env_class(render_mode="rgb_array", camera_name=view.base if view else camera,
                              width=self.width, height=self.height)
        if view is not None:
            import mujoco

            m = self._env.model
            cid = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_CAMERA, view.base)
            m.cam_pos[cid] = view.pos
            m.cam_quat[cid] = view.quat()
            m.cam_fovy[cid] = view.fovy
        if fast_render:
            m = self._env.model
            m.vis.quality.offsamples = 0
            m.light_castshadow[:] = 0
            m.mat_reflectance[:] = 0
        self._expert = None
        self.layout: int | None = None
        self.steps = 0
        self.raw_obs: np.ndarray | None = None
        self.last_info: dict[str, Any] = {}
        self.success = False
        self.timing = {"step_s": 0.0, "render_s": 0.0, "steps": 0, "renders": 0}
        self.reset(layout)

    # ---- episode -------------------------------------------------------------------------
    def reset(self, layout: int | None = None) -> dict[str, Any]:
        if layout is not None and layout != self.layout:
            self._env.set_task(layout_task(self.task, layout))
            self.layout = int(layout)
        raw, _ = self._env.reset()
        # MetaWorld's reset places the objects without recomputing the kinematics, so the first
        # frame would show them where the previous episode left them (or where the model starts).
        # mj_forward only derives positions from the state: the simulation is unchanged.
        import mujoco

        mujoco.mj_forward(self._env.model, self._env.data)
        self.raw_obs = np.asarray(raw, dtype=np.float64)
        self.steps = 0
        self.success = False
        self.last_info = {}
        return self.observation()

    def step(self, action: np.ndarray, observe: bool = True) -> tuple[dict[str, Any] | None, bool, bool]:
        """Execute one action: ``(obs, success, done)``. With ``observe=False`` nothing is rendered
        and ``obs`` is None (rendering is most of a step's cost and never changes the simulation;
        :meth:`observation` renders the current state when it is wanted)."""
        if self.steps >= self.max_steps:
            raise MetaWorldError(f"episode over ({self.max_steps} steps): call reset()")
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), -1.0, 1.0)
        if a.shape != (4,):
            raise MetaWorldError(f"a MetaWorld action has 4 values (dx, dy, dz, gripper); got shape {a.shape}")
        t0 = time.perf_counter()
        raw, _reward, _term, _trunc, info = self._env.step(a)
        self.timing["step_s"] += time.perf_counter() - t0
        self.timing["steps"] += 1
        self.raw_obs = np.asarray(raw, dtype=np.float64)
        self.last_info = info
        self.steps += 1
        self.success = bool(info.get("success", 0.0))
        return (self.observation() if observe else None), self.success, self.steps >= self.max_steps

    # ---- what the learner sees ---------------------------------------------------------------
    def state(self) -> np.ndarray:
        return self.raw_obs[:4].astype(np.float32)

    def render(self) -> np.ndarray:
        t0 = time.perf_counter()
        try:
            img = self._env.render()
        except Exception as e:  # noqa: BLE001 - say which backend failed, keep the cause
            raise MetaWorldError(f"offscreen rendering failed with MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}: "
                                 f"{type(e).__name__}: {e}") from e
        self.timing["render_s"] += time.perf_counter() - t0
        self.timing["renders"] += 1
        return np.ascontiguousarray(img[::-1, ::-1])  # MuJoCo's offscreen frames are upside down

    def observation(self) -> dict[str, Any]:
        return {IMAGE_KEY: self.render(), STATE_KEY: self.state(), "prompt": self.instruction}

    # ---- the scripted expert (privileged) ------------------------------------------------------
    def expert_action(self, binary_gripper: bool = True) -> np.ndarray:
        """The scripted expert's action for the current state (reads object/goal positions)."""
        if self._expert is None:
            self._expert = expert_policy(self.task)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Constant(s) may be too high": the env clips anyway
            a = self._expert.get_action(self.raw_obs)
        return binarize_gripper(a) if binary_gripper else np.clip(np.asarray(a, np.float32), -1, 1)

    def close(self) -> None:
        env, self._env = getattr(self, "_env", None), None
        if env is not None:
            env.close()

    def __enter__(self) -> "MetaWorldEnv":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class OracleExpertPolicy:
    """The scripted expert behind the `Policy.infer` interface, for testing the evaluation
    plumbing: each call returns the expert's current action repeated ``horizon`` times.

    It is an *oracle*: :func:`dit4dit.eval.metaworld.evaluate` hands it the environment through
    ``bind_env`` so it can read object positions. Learned policies get only the observation dict.
    """

    def __init__(self, horizon: int = 4, image_size: int = 64):
        self.horizon = int(horizon)
        self.image_size = int(image_size)
        self.env: MetaWorldEnv | None = None

    def bind_env(self, env: MetaWorldEnv) -> None:
        self.env = env

    def metadata(self) -> dict[str, Any]:
        return {"schema": "metaworld_sawyer", "cameras": [IMAGE_KEY], "num_cond_frames": 1,
                "camera_sizes": {IMAGE_KEY: [self.image_size, self.image_size]},
                "image_size": [self.image_size, self.image_size], "action_horizon": self.horizon,
                "action_dim": 4}

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        if self.env is None:
            raise RuntimeError("OracleExpertPolicy needs bind_env(env) before infer()")
        a = self.env.expert_action()
        return {"actions": np.repeat(a[None], self.horizon, axis=0)}


# --------------------------------------------------------------------------------------------
# Expert rollouts and collection
# --------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    task: str
    layout: int
    attempt: int
    success: bool
    steps: int
    data: dict[str, np.ndarray] | None = None  # only for successful episodes
    timing: dict[str, float] = field(default_factory=dict)


def rollout_expert(env: MetaWorldEnv, layout: int, *, noise: float = 0.0, rng: np.random.Generator | None = None,
                   keep_failed: bool = False, binary_gripper: bool = True,
                   ) -> tuple[dict[str, np.ndarray] | None, bool, int]:
    """One expert episode on `layout`, stopped at the first success (or `env.max_steps`).

    Records, per step, the frame and hand state seen *before* acting and the expert's clean action
    (gripper snapped to +-1 unless ``binary_gripper`` is False). With ``noise`` > 0 the executed
    action adds Gaussian noise (std ``noise``) to dx, dy, dz while the recorded label stays the
    expert's action at the visited state (DART-style), which diversifies repeated layouts.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    obs = env.reset(layout)
    images, states, actions = [], [], []
    success = done = False
    while not (success or done):
        a = env.expert_action(binary_gripper)
        images.append(obs[IMAGE_KEY])
        states.append(obs[STATE_KEY])
        actions.append(a)
        executed = a.copy()
        if noise > 0:
            executed[:3] = np.clip(executed[:3] + rng.normal(0.0, noise, size=3), -1.0, 1.0)
        obs, success, done = env.step(executed)
    if not (success or keep_failed):
        return None, success, env.steps
    data = {IMAGE_KEY: np.stack(images), STATE_KEY: np.stack(states).astype(np.float32),
            ACTION_KEY: np.stack(actions).astype(np.float32)}
    return data, success, env.steps


def features(image_size: int | Sequence[int]) -> dict[str, dict]:
    """The dataset features: exactly the keys of the `metaworld_sawyer` schema."""
    h, w = _size(image_size)
    return {
        STATE_KEY: {"dtype": "float32", "shape": [4], "names": list(STATE_NAMES)},
        ACTION_KEY: {"dtype": "float32", "shape": [4], "names": list(ACTION_NAMES)},
        IMAGE_KEY: {"dtype": "video", "shape": [h, w, 3], "names": ["height", "width", "channels"]},
    }


# per-process cache of environments (collection and evaluation workers reuse them)
_ENVS: dict[tuple, MetaWorldEnv] = {}


def cached_env(task: str, camera: str, image_size: int | Sequence[int], max_steps: int) -> MetaWorldEnv:
    key = (task_name(task), camera, _size(image_size))
    env = _ENVS.get(key)
    if env is None:
        env = _ENVS[key] = MetaWorldEnv(task, camera=camera, image_size=image_size, max_steps=max_steps)
    env.max_steps = int(max_steps)
    return env


def close_cached_envs() -> None:
    while _ENVS:
        _ENVS.popitem()[1].close()


def _collect_job(spec: dict[str, Any]) -> Rollout:
    env = cached_env(spec["task"], spec["camera"], spec["image_size"], spec["max_steps"])
    t0 = dict(env.timing)
    rng = np.random.default_rng(spec["rng_seed"])
    start = time.perf_counter()
    data, success, steps = rollout_expert(env, spec["layout"], noise=spec["noise"], rng=rng,
                                          binary_gripper=spec["gripper"] == "binary")
    timing = {k: env.timing[k] - t0[k] for k in env.timing}
    timing["wall_s"] = time.perf_counter() - start
    return Rollout(spec["task"], spec["layout"], spec["attempt"], success, steps, data, timing)


class JobRunner:
    """Run picklable jobs in order, in `workers` spawned processes (each keeps its own cached
    environments and, for evaluation, its own policy), or in this process when `workers` <= 1.
    The pool is started on first use and kept until :meth:`close`."""

    def __init__(self, workers: int = 1, initializer: Callable | None = None, initargs: tuple = ()):
        self.workers = max(1, int(workers))
        self.initializer, self.initargs = initializer, initargs
        self._pool = None
        self._initialized = False

    def map(self, fn: Callable[[Any], Any], specs: list):
        if self.workers <= 1:
            if self.initializer is not None and not self._initialized:
                self.initializer(*self.initargs)
            self._initialized = True
            for s in specs:
                yield fn(s)
            return
        if self._pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            ensure_gl_backend()  # decide once; the workers inherit MUJOCO_GL
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn"),
                                             initializer=self.initializer, initargs=self.initargs)
        futures = [self._pool.submit(fn, s) for s in specs]
        try:
            for f in futures:
                yield f.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self.workers <= 1:
            close_cached_envs()

    def __enter__(self) -> "JobRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def layout_for_attempt(attempt: int, seed: int = 0) -> int:
    """The training layout of the `attempt`-th collection attempt of a task: a new one every time."""
    return train_layout(seed + attempt)


def episode_counts(tasks: Sequence[str], episodes: int | str | Mapping[str, int]) -> dict[str, int]:
    """Successful episodes wanted per task: ``episodes`` is one count for every task, a mapping
    task -> count, or a string ``"N"`` / ``"80,push=200"`` / ``"push=200,button=80,drawer=80"``
    (short task names allowed; a bare number counts for the tasks not named). Every task of
    ``tasks`` needs a count >= 1; a named task must be one of ``tasks``."""
    default: int | None = None
    named: dict[str, int] = {}
    if isinstance(episodes, Mapping):
        named = {task_name(k): v for k, v in episodes.items()}
    elif isinstance(episodes, str):
        for item in (x.strip() for x in episodes.split(",")):
            if not item:
                continue
            name, sep, n = item.rpartition("=")
            if not n.strip().lstrip("-").isdigit() or (sep and not name.strip()):
                raise MetaWorldError(f"episodes {episodes!r}: {item!r} must read N or TASK=N with N an integer")
            if sep:
                named[task_name(name)] = int(n)
            else:
                default = int(n)
    else:
        default = int(episodes)
    for t in named:
        if t not in tasks:
            raise MetaWorldError(f"episodes {episodes!r} names {t}, which is not among the tasks {list(tasks)}")
    counts = {t: named.get(t, default) for t in tasks}
    bad = {t: n for t, n in counts.items() if n is None or n < 1}
    if bad:
        raise MetaWorldError(f"episodes {episodes!r}: every task needs a count >= 1 "
                             f"({', '.join(f'{t}: {n}' for t, n in bad.items())})")
    return counts  # type: ignore[return-value]


def collect(tasks: str | Sequence[str], episodes_per_task: int | str | Mapping[str, int], out: str | Path, *,
            image_size: int = 64,
            camera: str = DEFAULT_CAMERA, seed: int = 0, workers: int = 1, max_steps: int = MAX_PATH_LENGTH,
            action_noise: float = 0.0, max_attempts: int | None = None,
            gripper: str = "binary", fps: int = CONTROL_FPS, overwrite: bool = False,
            progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Collect `episodes_per_task` successful expert episodes per task into a LeRobot v3.0
    dataset at `out` (features = the `metaworld_sawyer` schema's keys; one instruction per task).
    `episodes_per_task` may also give each task its own count (:func:`episode_counts`).

    Attempt ``a`` of a task runs on training layout ``train_layout(seed + a)`` (0..39, 50..89, ...:
    every episode has a layout of its own); failed episodes are dropped and the next layouts tried
    (at most ``max_attempts`` attempts per task, default twice the task's count + 10).
    ``action_noise`` adds Gaussian noise to the executed actions (see :func:`rollout_expert`).
    ``gripper="binary"`` (default) snaps the experts' grip effort to -1 / +1 both in the executed
    and the recorded action, as the `metaworld_sawyer` schema (binary gripper) will at inference;
    ``"continuous"`` keeps the experts' values (clipped to [-1, 1]) for a schema whose gripper is
    continuous. Several grasping experts need partial effort (docs/metaworld.md).
    Returns a summary with the experts' success rate per task and the collection speed; a
    ``meta/metaworld.json`` file in the dataset records the tasks, layouts and settings.
    """
    from ..data.lerobot import CAPTURE_FILE
    from ..data.writer import LeRobotWriter

    task_list = parse_tasks(tasks)
    check_camera(camera)
    wanted = episode_counts(task_list, episodes_per_task)
    if gripper not in ("binary", "continuous"):
        raise MetaWorldError(f"gripper={gripper!r} must be binary | continuous")
    limits = {t: max_attempts if max_attempts is not None else 2 * n + 10 for t, n in wanted.items()}
    size = _size(image_size)
    require_metaworld()
    stats = {t: {"instruction": INSTRUCTIONS[t], "attempts": 0, "successes": 0, "kept": 0, "frames": 0,
                 "episode_lengths": [], "failed_layouts": [], "layouts": []} for t in task_list}
    timing = {"step_s": 0.0, "render_s": 0.0, "steps": 0, "renders": 0}
    episodes_meta: list[dict[str, Any]] = []
    total = sum(wanted.values())
    done = 0
    start = time.perf_counter()
    with JobRunner(workers) as runner, \
            LeRobotWriter(out, fps=fps, features=features(size), robot_type="sawyer", overwrite=overwrite) as w:
        while True:
            specs = []
            for ti, t in enumerate(task_list):
                st = stats[t]
                n = min(wanted[t] - st["kept"], limits[t] - st["attempts"])
                for _ in range(max(0, n)):
                    a = st["attempts"]
                    specs.append({"task": t, "attempt": a, "layout": layout_for_attempt(a, seed),
                                  "noise": float(action_noise),
                                  "rng_seed": [int(seed), list(INSTRUCTIONS).index(t), a],
                                  "camera": camera, "image_size": size, "max_steps": int(max_steps),
                                  "gripper": gripper})
                    st["attempts"] += 1
            if not specs:
                break
            for r in runner.map(_collect_job, specs):
                st = stats[r.task]
                for k in timing:
                    timing[k] += r.timing.get(k, 0)
                if not r.success:
                    st["failed_layouts"].append(r.layout)
                    continue
                st["successes"] += 1
                if st["kept"] >= wanted[r.task]:
                    continue
                ep = w.add_episode(r.data, INSTRUCTIONS[r.task])
                st["kept"] += 1
                st["frames"] += r.steps
                st["episode_lengths"].append(r.steps)
                st["layouts"].append(r.layout)
                episodes_meta.append({"episode_index": ep, "task": r.task, "layout": r.layout,
                                      "attempt": r.attempt, "length": r.steps})
                done += 1
                if progress:
                    progress(done, total)
        if done == 0:
            raise MetaWorldError(f"the experts succeeded on no episode of {task_list}; nothing written")
        w.finalize()
    seconds = time.perf_counter() - start
    per_task = {}
    for t, st in stats.items():
        lens = st.pop("episode_lengths")
        per_task[t] = {**st, "expert_success_rate": st["successes"] / max(1, st["attempts"]),
                       "mean_length": float(np.mean(lens)) if lens else None}
    frames = sum(st["frames"] for st in per_task.values())
    counts = set(wanted.values())
    settings = {"tasks": task_list, "episodes_per_task": counts.pop() if len(counts) == 1 else wanted,
                "image_size": list(size),
                "camera": camera, "seed": seed, "fps": fps, "max_steps": max_steps, "action_noise": action_noise,
                "layout_seed": LAYOUT_SEED, "layouts_per_seed": LAYOUTS_PER_SEED,
                "train_per_seed": TRAIN_PER_SEED,
                "gripper": "binary (-1 open, +1 close)" if gripper == "binary" else "continuous (expert effort)"}
    meta = Path(out).expanduser() / "meta"
    write_json(meta / "metaworld.json", {"settings": settings, "episodes": episodes_meta})
    write_json(meta / CAPTURE_FILE, {"env": "metaworld", "cameras": {IMAGE_KEY: camera}})
    incomplete = [t for t, s in per_task.items() if s["kept"] < wanted[t]]
    return {
        "dataset": str(Path(out).expanduser()),
        "episodes": done,
        "frames": frames,
        "tasks": per_task,
        "incomplete_tasks": incomplete,
        "expert_success_rate": sum(s["successes"] for s in per_task.values())
        / max(1, sum(s["attempts"] for s in per_task.values())),
        "seconds": seconds,
        "frames_per_s": frames / seconds if seconds > 0 else None,  # kept (written) frames
        "rendered_frames_per_s": timing["renders"] / seconds if seconds > 0 else None,  # incl. failed attempts
        "ms_per_env_step": 1e3 * timing["step_s"] / max(1, timing["steps"]),
        "ms_per_render": 1e3 * timing["render_s"] / max(1, timing["renders"]),
        "workers": workers,
        "settings": settings,
    }
