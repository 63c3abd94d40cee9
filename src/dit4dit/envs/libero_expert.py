"""Scripted LIBERO experts that read privileged object poses from the simulator.

The expert alone sees the poses (``env.env.object_states_dict``: bodies and region sites); a
dataset collected with it holds only the images, the robot state, the actions and the task's
instruction. Actions are LIBERO's 7-D OSC_POSE deltas (``dx, dy, dz`` scaled so 1 = 5 cm,
``droll, dpitch, dyaw`` with 1 = 0.5 rad, gripper -1 open / +1 close).

One family of tasks is supported: a single goal predicate ``(In A B)`` or ``(On A B)`` where A
is a movable object (pick-and-place). :func:`plan_expert` says why a task is not supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

OPEN, CLOSE = -1.0, 1.0
POS_SCALE = 0.05  # metres per unit of a position action (robosuite OSC_POSE output_max)
ROT_SCALE = 0.5  # radians per unit of a rotation action


class UnsupportedTask(ValueError):
    """The task's goal is outside what the scripted experts do (the message says why)."""


def _quat_xyzw_to_mat(q: np.ndarray) -> np.ndarray:
    x, y, z, w = (float(v) for v in q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _rot_error(current: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Axis-angle (world frame) that turns rotation matrix ``current`` into ``target``."""
    r = target @ current.T
    cos = float(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))
    angle = float(np.arccos(cos))
    if angle < 1e-6:
        return np.zeros(3)
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    n = np.linalg.norm(axis)
    if n < 1e-9:
        return np.zeros(3)
    return axis / n * angle


def _yaw_of(quat_xyzw: np.ndarray) -> float:
    m = _quat_xyzw_to_mat(np.asarray(quat_xyzw))
    return float(np.arctan2(m[1, 0], m[0, 0]))


def goal_predicates(env: Any) -> list[list[str]]:
    """The task's goal, e.g. ``[['in', 'alphabet_soup_1', 'basket_1_contain_region']]``."""
    inner = getattr(env, "env", env)
    goal = inner.parsed_problem["goal_state"]
    return [[str(x).lower() for x in g] for g in goal]


def plan_expert(env: Any, **kwargs: Any) -> "PickPlaceExpert":
    """The scripted expert for ``env``'s task, or :class:`UnsupportedTask` naming the reason."""
    goal = goal_predicates(env)
    if len(goal) != 1:
        raise UnsupportedTask(f"goal has {len(goal)} predicates {goal}; the experts handle one")
    pred = goal[0]
    if pred[0] not in ("in", "on") or len(pred) != 3:
        raise UnsupportedTask(f"goal {pred}: the experts handle (In A B) / (On A B) pick-and-place only")
    inner = getattr(env, "env", env)
    obj, target = pred[1], pred[2]
    if obj not in inner.objects_dict:
        raise UnsupportedTask(f"goal {pred}: {obj!r} is a fixture, not a movable object")
    if pred[0] == "in":
        fixture = _region_owner(inner, target)
        if fixture is not None and _has_joints(inner, fixture):
            raise UnsupportedTask(f"goal {pred}: {target!r} lies inside the articulated {fixture!r} (a drawer "
                                  "to open first); the experts do not open drawers")
    corners = object_corners(env, obj) if hasattr(inner, "sim") else np.zeros((0, 3))
    if len(corners):
        _yaw, narrow, _wide = object_footprint(env, obj)
        height = float(np.ptp(corners[:, 2]))
        if narrow > PickPlaceExpert.MAX_OPENING and height < 0.03:
            raise UnsupportedTask(f"goal {pred}: {obj!r} is flat ({height * 100:.1f} cm) and wider than the open "
                                  "gripper: it would be pushed, which the experts do not do")
    return PickPlaceExpert(obj, target, relation=pred[0], **kwargs)


def _region_owner(inner: Any, region: str) -> str | None:
    """The fixture a region site belongs to (``wooden_cabinet_1_top_region`` -> ``wooden_cabinet_1``);
    None for an object's region (``basket_1_contain_region``: movable objects have free joints)."""
    if region in inner.objects_dict or region in getattr(inner, "fixtures_dict", {}):
        return None
    names = list(getattr(inner, "fixtures_dict", {}))
    owners = [n for n in names if region.startswith(n + "_")]
    return max(owners, key=len) if owners else None


def _has_joints(inner: Any, name: str) -> bool:
    try:
        return bool(inner.get_object(name).joints)
    except (AttributeError, KeyError):
        return False


def _wrap_half_pi(a: float) -> float:
    """An angle modulo pi (a parallel gripper is symmetric under a half turn), in [-pi/2, pi/2)."""
    return float((a + np.pi / 2) % np.pi - np.pi / 2)


def object_corners(env: Any, name: str) -> np.ndarray:
    """World-frame corners (N, 3) of the bounding boxes of the collision geoms of the object's bodies."""
    inner = getattr(env, "env", env)
    sim = inner.sim
    m, d = sim.model, sim.data
    root = int(inner.obj_body_id[name])
    bodies = {root}
    for b in range(int(m.nbody)):  # descendants of the object's root body
        p = b
        while p > 0 and p not in bodies:
            p = int(m.body_parentid[p])
        if p in bodies:
            bodies.add(b)
    geoms = [g for g in range(int(m.ngeom)) if int(m.geom_bodyid[g]) in bodies]
    collide = [g for g in geoms if int(m.geom_contype[g]) or int(m.geom_conaffinity[g])]
    corners = []
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
    for g in collide or geoms:  # the collision geoms (visual meshes' boxes are loose), else all
        aabb = np.asarray(m.geom_aabb[g], dtype=np.float64)
        local = aabb[:3] + signs * aabb[3:]
        xmat = np.asarray(d.geom_xmat[g], dtype=np.float64).reshape(3, 3)
        corners.append(local @ xmat.T + np.asarray(d.geom_xpos[g], dtype=np.float64))
    return np.concatenate(corners) if corners else np.zeros((0, 3))


def object_footprint(env: Any, name: str) -> tuple[float, float, float]:
    """(yaw of the object's narrow horizontal axis, narrow extent, wide extent) in metres, from the
    world-frame corners of the bounding boxes of the object's geoms."""
    inner = getattr(env, "env", env)
    pts = object_corners(env, name)[:, :2]
    if not len(pts):
        return 0.0, 0.0, 0.0
    root = int(inner.obj_body_id[name])
    body = np.asarray(inner.sim.data.body_xmat[root], dtype=np.float64).reshape(3, 3)
    best = None
    for axis in (body[:, 0], body[:, 1], body[:, 2]):  # the object's axes that lie (mostly) horizontal
        h = axis[:2]
        if np.linalg.norm(h) < 0.5:
            continue
        h = h / np.linalg.norm(h)
        perp = np.array([-h[1], h[0]])
        ext_h = float(np.ptp(pts @ h))
        ext_p = float(np.ptp(pts @ perp))
        cand = (min(ext_h, ext_p), max(ext_h, ext_p),
                float(np.arctan2(h[1], h[0])) if ext_h <= ext_p else float(np.arctan2(perp[1], perp[0])))
        if best is None or cand[0] < best[0]:
            best = cand
    if best is None:
        return 0.0, 0.0, 0.0
    return best[2], best[0], best[1]


def finger_axis_yaw(env: Any) -> float | None:
    """Yaw of the line between the gripper's fingers (the closing direction), None if not found."""
    inner = getattr(env, "env", env)
    m, d = inner.sim.model, inner.sim.data
    try:
        a = d.body_xpos[m.body_name2id("gripper0_leftfinger")]
        b = d.body_xpos[m.body_name2id("gripper0_rightfinger")]
    except (ValueError, KeyError):
        return None
    v = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    return float(np.arctan2(v[1], v[0]))


def _rz(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


# The Panda hand in its own frame (x across the fingers, y along the closing axis, z up from the
# grasp point between the finger pads), measured from robosuite's collision geoms: the fingers
# reach 13 mm below the grasp point and 49 mm above it, the hand (palm) sits above them and is
# about 21 cm long along the closing axis.
_FINGER_BOX = (np.array([-0.012, 0.019, -0.013]), np.array([0.012, 0.055, 0.049]))
_PALM_BOX = (np.array([-0.035, -0.105, 0.049]), np.array([0.035, 0.105, 0.126]))


def _box_points(lo: np.ndarray, hi: np.ndarray, n: tuple[int, int, int]) -> np.ndarray:
    axes = [np.linspace(lo[i], hi[i], n[i]) for i in range(3)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def hand_points(opening: float = 0.08, rise: float = 0.0) -> np.ndarray:
    """Sample points (N, 3) of the open hand in its own frame; ``rise`` extends them upward (the
    volume the hand sweeps while descending that far onto the grasp)."""
    lo, hi = _FINGER_BOX
    shift = np.array([0.0, opening / 2 - 0.5 * (lo[1] + hi[1]), 0.0])
    lo, hi = lo + shift, hi + shift
    top = np.array([0.0, 0.0, rise])
    left = _box_points(lo, hi + top, (3, 3, 6 + int(rise / 0.02)))
    right = left * np.array([1.0, -1.0, 1.0])
    palm = _box_points(_PALM_BOX[0], _PALM_BOX[1] + top, (4, 11, 4 + int(rise / 0.02)))
    return np.concatenate([left, right, palm])


def obstacle_boxes(env: Any, exclude: str, floor_z: float) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Oriented boxes (centre, rotation, half sizes) of the collision geoms of everything but the
    robot and the object ``exclude``, leaving out what lies wholly below ``floor_z`` (the surface
    the object stands on)."""
    inner = getattr(env, "env", env)
    m, d = inner.sim.model, inner.sim.data
    root = int(inner.obj_body_id[exclude])
    mine = {root}
    for b in range(int(m.nbody)):
        p = b
        while p > 0 and p not in mine:
            p = int(m.body_parentid[p])
        if p in mine:
            mine.add(b)
    boxes = []
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
    for g in range(int(m.ngeom)):
        b = int(m.geom_bodyid[g])
        if b == 0 or b in mine or not (int(m.geom_contype[g]) or int(m.geom_conaffinity[g])):
            continue
        name = m.body_id2name(b) or ""
        if name.startswith(("robot", "gripper", "mount")):
            continue
        aabb = np.asarray(m.geom_aabb[g], dtype=np.float64)
        rot = np.asarray(d.geom_xmat[g], dtype=np.float64).reshape(3, 3)
        centre = np.asarray(d.geom_xpos[g], dtype=np.float64) + rot @ aabb[:3]
        top = float(((signs * aabb[3:]) @ rot.T)[:, 2].max() + centre[2])
        if top < floor_z:
            continue
        boxes.append((centre, rot, aabb[3:].copy()))
    return boxes


def _robot_base(inner: Any) -> np.ndarray | None:
    m = inner.sim.model
    try:
        return np.asarray(inner.sim.data.body_xpos[m.body_name2id("robot0_base")], dtype=np.float64)
    except (ValueError, KeyError):
        return None


def hand_collisions(points_world: np.ndarray, boxes: list, margin: float = 0.005) -> int:
    """How many of the hand's sample points lie inside an obstacle box grown by ``margin``."""
    hit = np.zeros(len(points_world), dtype=bool)
    for centre, rot, half in boxes:
        local = (points_world - centre) @ rot
        hit |= np.all(np.abs(local) < half + margin, axis=1)
    return int(hit.sum())


def grasp_height(origin_z: float, zmin: float, zmax: float, top_reach: float) -> float:
    """Height of the grasp point: 3 cm up the object (half way up a flat one), not below its
    origin, and no lower than ``top_reach`` under its top, so the hand above the fingers stays
    clear of a tall object (a bottle pushed by the palm topples)."""
    return max(origin_z, zmin + min(0.03, 0.5 * (zmax - zmin)), zmax - top_reach)


def choose_grasp(candidates: list[tuple[float, np.ndarray, float]], centre: np.ndarray, fingers: float,
                 boxes: list, *, base: np.ndarray | None, target: np.ndarray,
                 rise: float) -> tuple[float, np.ndarray, float]:
    """Of the candidate grasps ``(turn of the hand about the vertical, shift from the object's
    centre, grasp height)``: the first (the default) if the open hand, and the column it descends
    through from ``rise`` above, meets none of the obstacle ``boxes``; else, of the clear ones, the
    one that keeps the hand nearest the robot's ``base`` at the grasp and over the ``target`` (a
    stretched arm stalls); the default when none is clear (the check is a model of the hand: it
    changes a grasp only for one it finds clear). ``fingers``: the yaw of the closing axis before
    the turn."""
    if not boxes or len(candidates) == 1:
        return candidates[0]
    local = hand_points(rise=rise)
    best, best_key = candidates[0], None
    for i, cand in enumerate(candidates):
        turn, shift, z = cand
        rot = _rz(fingers + turn - np.pi / 2)  # hand frame y (the closing axis) along the finger axis
        hand = np.array([centre[0] + shift[0], centre[1] + shift[1], z])
        if hand_collisions(local @ rot.T + hand, boxes):
            continue
        if i == 0:
            return cand
        reach = 0.0 if base is None else max(float(np.linalg.norm((hand - base)[:2])),
                                              float(np.linalg.norm((np.asarray(target) + shift - base)[:2])))
        if best_key is None or reach < best_key:
            best, best_key = cand, reach
    return best


@dataclass
class ExpertStep:
    action: np.ndarray
    phase: str


class PickPlaceExpert:
    """Hover above the object, descend, close, lift, carry above the target, lower, open.

    Positions come from the simulator each step (closed loop), so a slipping object is followed;
    heights are relative to the objects' bounding boxes (floor and table scenes alike). The hand
    keeps its initial (top-down) orientation, turned about the vertical so the fingers close
    across an elongated object's narrow side; an object wider than the open gripper (a bowl) is
    taken by its rim; a tall one high enough that the palm clears its top. Before the first step
    the grasp is checked against the collision boxes of the fixtures and the other objects (the
    open hand and the column it descends through): where the default grasp is blocked (a bowl in
    an open drawer, a bowl beside the cabinet) another turn of the hand, rim side or rim inset is
    taken (the clear one that keeps the hand nearest the robot); where none is clear, or for an
    elongated object (whose turn is fixed by its shape), the default stays. ``rng`` perturbs the
    grasp point a little (diverse demonstrations); ``None`` = deterministic.
    """

    HOVER = 0.10  # above the grasp point while aligning
    MAX_OPENING = 0.075  # objects narrower than this fit between the open fingers
    GAIN = 12.0  # position action per metre of error (clipped to 1)
    ROT_GAIN = 2.0
    CLEARANCE = 0.03  # object bottom above the target's top when released
    TOP_REACH = 0.04  # grasp no lower than this under the object's top (the palm stays above it)
    RIM_INSETS = (0.004, 0.015, 0.025)  # rim grasp: grasp point this far inside the wall

    def __init__(self, obj: str, target: str, *, relation: str = "in",
                 rng: np.random.Generator | None = None) -> None:
        self.obj = obj
        self.target = target
        self.relation = relation
        self.rng = rng
        self.reset()

    def reset(self) -> None:
        self.phase = "hover"
        self.t_phase = 0
        self.target_rot: np.ndarray | None = None
        self.jitter = np.zeros(3) if self.rng is None else self.rng.uniform(-0.006, 0.006, 3)
        self.grasp_offset: np.ndarray | None = None  # object position - hand, once grasped
        self.bottom_offset = 0.0  # object bottom - hand height, once grasped
        self.shift = np.zeros(3)  # grasp point - object position (horizontal)
        self.grasp_height = 0.0  # grasp point - object position (vertical)
        self.carry_z = 0.0
        self.rim = False

    # -- privileged state ---------------------------------------------------------------------
    @staticmethod
    def _pos(env: Any, name: str) -> np.ndarray:
        inner = getattr(env, "env", env)
        return np.array(inner.object_states_dict[name].get_geom_state()["pos"], dtype=np.float64)

    def _top(self, env: Any, name: str) -> float:
        """Highest point of an object, or a region site's height."""
        inner = getattr(env, "env", env)
        if name in getattr(inner, "obj_body_id", {}):
            c = object_corners(env, name)
            if len(c):
                return float(c[:, 2].max())
        return float(self._pos(env, name)[2])

    def _nearest_other(self, env: Any) -> np.ndarray | None:
        inner = getattr(env, "env", env)
        me = self._pos(env, self.obj)
        best, best_d = None, np.inf
        for name in inner.objects_dict:
            if name in (self.obj, self.target) or name not in inner.object_states_dict:
                continue
            p = self._pos(env, name)
            dist = float(np.linalg.norm((p - me)[:2]))
            if dist < best_d:
                best, best_d = p, dist
        return best if best_d < 0.15 else None

    def _plan_grasp(self, env: Any, hand_rot: np.ndarray) -> None:
        self.target_rot = hand_rot
        pos = self._pos(env, self.obj)
        corners = object_corners(env, self.obj)
        zmin, zmax = (float(corners[:, 2].min()), float(corners[:, 2].max())) if len(corners) else (pos[2], pos[2])
        fingers = finger_axis_yaw(env)
        yaw, narrow, wide = object_footprint(env, self.obj)
        near = self._nearest_other(env)
        # low on the object, but high enough that the hand above the fingers clears its top (a tall
        # bottle pushed by the palm topples)
        grasp_z = grasp_height(float(pos[2]), zmin, zmax, self.TOP_REACH)
        candidates: list[tuple[float, np.ndarray, float]] = []  # (hand turn about vertical, shift, z)
        if fingers is not None and narrow > self.MAX_OPENING:
            # too wide to close around: one finger inside the rim, one outside, along the finger axis
            self.rim = True
            grasp_z = zmax - 0.02
            for inset in self.RIM_INSETS:  # the first is the default: the outer finger just off the wall
                r = 0.5 * narrow - inset
                for turn in self._turns():
                    a = fingers + turn
                    axis = np.array([np.cos(a), np.sin(a), 0.0])
                    sides = [axis * r, -axis * r]
                    if near is not None:  # the side away from the nearest neighbour
                        sides.sort(key=lambda v: -float(np.linalg.norm((pos + v - near)[:2])))
                    candidates += [(turn, v, grasp_z) for v in sides]
        elif fingers is not None and wide > 1.15 * narrow:
            # turn about the vertical so the fingers close across the object's narrow side
            turn = _wrap_half_pi(yaw - fingers)
            # and grasp off-centre along the long side, away from the nearest other object
            # (the hand is wide across the fingers: a close neighbour blocks the descent)
            along = np.array([-np.sin(yaw), np.cos(yaw), 0.0])
            reach = max(0.0, wide / 2 - 0.025)
            shift = np.zeros(3)
            if near is not None:
                side = float(np.dot(near - pos, along))
                shift = -np.sign(side) * reach * along if abs(side) > 1e-6 else np.zeros(3)
            candidates += [(turn, shift, grasp_z)]
        else:
            candidates += [(turn, np.zeros(3), grasp_z) for turn in self._turns()]
        if candidates:
            turn, shift, grasp_z = self._clear_candidate(env, candidates, pos, fingers, zmin)
            self.target_rot = _rz(turn) @ hand_rot
            self.shift = shift
        self.grasp_height = grasp_z - pos[2]

    @staticmethod
    def _turns() -> list[float]:
        """Turns of the hand about the vertical, no turn first (the fingers are symmetric under a
        half turn, so [-pi/2, pi/2) covers every closing direction)."""
        steps = np.deg2rad(np.arange(15, 91, 15))
        out = [0.0]
        for s in steps:
            out += [float(s), float(-s)] if s < np.pi / 2 else [float(-s)]
        return out

    def _clear_candidate(self, env: Any, candidates: list, pos: np.ndarray, fingers: float | None,
                         zmin: float) -> tuple[float, np.ndarray, float]:
        inner = getattr(env, "env", env)
        if fingers is None or not hasattr(inner, "sim"):
            return candidates[0]
        boxes = obstacle_boxes(env, self.obj, floor_z=zmin + 0.005)
        centre = pos + self.jitter * np.array([1.0, 1.0, 0.0])
        return choose_grasp(candidates, centre, fingers, boxes, base=_robot_base(inner),
                            target=self._pos(env, self.target), rise=self.HOVER)

    # -- control ------------------------------------------------------------------------------
    def _move(self, eef: np.ndarray, goal: np.ndarray, hand_rot: np.ndarray, grip: float) -> np.ndarray:
        a = np.zeros(7)
        a[:3] = np.clip((goal - eef) * self.GAIN, -1.0, 1.0)
        assert self.target_rot is not None
        a[3:6] = np.clip(_rot_error(hand_rot, self.target_rot) * self.ROT_GAIN / ROT_SCALE * 0.5, -0.5, 0.5)
        a[6] = grip
        return a

    def _next(self, phase: str) -> None:
        self.phase = phase
        self.t_phase = 0

    def act(self, env: Any, obs: Mapping[str, Any]) -> ExpertStep:
        eef = np.asarray(obs["robot0_eef_pos"], np.float64)
        hand_rot = _quat_xyzw_to_mat(np.asarray(obs["robot0_eef_quat"], np.float64))
        if self.target_rot is None:
            self._plan_grasp(env, hand_rot)
        obj = self._pos(env, self.obj)
        grasp = obj + self.shift + self.jitter * np.array([1.0, 1.0, 0.0])
        grasp[2] = obj[2] + self.grasp_height
        self.t_phase += 1
        p = self.phase
        if p == "hover":
            goal = grasp + np.array([0, 0, self.HOVER])
            a = self._move(eef, goal, hand_rot, OPEN)
            if np.linalg.norm((goal - eef)[:2]) < 0.008 and abs(goal[2] - eef[2]) < 0.03 or self.t_phase > 80:
                self._next("descend")
        elif p == "descend":
            a = self._move(eef, grasp, hand_rot, OPEN)
            if np.linalg.norm(grasp - eef) < 0.008 or self.t_phase > 60:
                self._next("grasp")
        elif p == "grasp":
            a = self._move(eef, grasp, hand_rot, CLOSE)
            if self.t_phase >= 12:
                self.grasp_offset = obj - eef
                corners = object_corners(env, self.obj)
                self.bottom_offset = (float(corners[:, 2].min()) if len(corners) else obj[2]) - eef[2]
                top = self._top(env, self.target)
                self.carry_z = max(top + 0.08 - self.bottom_offset, eef[2] + 0.12)
                self._next("lift")
        elif p == "lift":
            goal = np.array([eef[0], eef[1], self.carry_z])
            a = self._move(eef, goal, hand_rot, CLOSE)
            if eef[2] > self.carry_z - 0.03 or self.t_phase > 60:
                self._next("carry")
        else:
            tgt = self._pos(env, self.target)
            held = obj - eef if self.grasp_offset is None else self.grasp_offset
            # the object follows the hand: aim the object, not the hand, at the target
            above = np.array([tgt[0] - held[0], tgt[1] - held[1], self.carry_z])
            if p == "carry":
                a = self._move(eef, above, hand_rot, CLOSE)
                if np.linalg.norm((above - eef)[:2]) < 0.01 or self.t_phase > 100:
                    self._next("lower")
            elif p == "lower":
                goal = np.array([above[0], above[1], self._top(env, self.target) + self.CLEARANCE
                                 - self.bottom_offset])
                a = self._move(eef, goal, hand_rot, CLOSE)
                if abs(goal[2] - eef[2]) < 0.01 or self.t_phase > 60:
                    self._next("release")
            elif p == "release":
                a = self._move(eef, eef, hand_rot, OPEN)
                if self.t_phase >= 10:
                    self._next("retreat")
            else:  # retreat
                goal = np.array([eef[0], eef[1], self.carry_z])
                a = self._move(eef, goal, hand_rot, OPEN)
        return ExpertStep(a.astype(np.float32), p)
