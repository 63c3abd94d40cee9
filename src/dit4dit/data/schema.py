"""Embodiment schemas: which dataset keys form the model's padded state and action vectors.

A schema is declarative and frozen. It says

- which dataset keys (each with a slice ``[start:stop]`` and optional per-dimension names) are
  concatenated, in order, into the robot state and into the robot action;
- which of those dimensions are *binary grippers* (kept unnormalised, i.e. identity, and
  thresholded to their two values when actions are unnormalised);
- which camera keys the model sees, how they are combined (``single``, ``side_by_side``
  horizontally, or a ``grid``), whether a camera is stored upside down (``flip`` = rotate 180
  degrees), and the recommended combined image size.

The model works on vectors padded to ``state_dim`` (64) and ``action_dim`` (32) with masks, so
one network can serve several embodiments; a schema must fit that padding.

Keys may carry ``aliases`` (other names the same data goes by in other conversions of a dataset,
for instance ``actions`` for ``action``). :meth:`EmbodimentSchema.check` validates a schema
against a dataset's features and returns a copy whose keys are the ones the dataset really uses.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np

from ..jsonio import to_jsonable

Layout = Literal["single", "side_by_side", "grid"]
VISUAL_DTYPES = ("video", "image")
NUMERIC_DTYPES = (
    "float16", "float32", "float64", "bfloat16",
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool",
)


class SchemaError(ValueError):
    """A schema that is inconsistent in itself or with a dataset (the message names the key)."""


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """``dataset[key][..., start:stop]``: one contiguous piece of the state or action vector.

    ``gripper`` lists indices *within this part* of binary gripper dimensions; they are not
    normalised (identity) and, for actions, unnormalised outputs are snapped to
    ``gripper_values = (low, high)`` at the midpoint threshold.
    """

    key: str
    start: int = 0
    stop: int | None = None  # None: start + len(names)
    names: tuple[str, ...] = ()
    gripper: tuple[int, ...] = ()
    gripper_values: tuple[float, float] = (-1.0, 1.0)
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "gripper", tuple(int(g) for g in self.gripper))
        object.__setattr__(self, "aliases", tuple(self.aliases))
        object.__setattr__(self, "gripper_values", tuple(float(v) for v in self.gripper_values))
        if self.stop is None:
            if not self.names:
                raise SchemaError(f"part {self.key!r}: give `stop` or `names` so its width is known")
            object.__setattr__(self, "stop", self.start + len(self.names))
        if self.start < 0 or self.stop <= self.start:
            raise SchemaError(f"part {self.key!r}: empty or negative slice [{self.start}:{self.stop}]")
        if self.names and len(self.names) != self.dim:
            raise SchemaError(
                f"part {self.key!r}[{self.start}:{self.stop}]: {len(self.names)} names for {self.dim} dimensions"
            )
        for g in self.gripper:
            if not 0 <= g < self.dim:
                raise SchemaError(f"part {self.key!r}: gripper index {g} outside its {self.dim} dimensions")
        if len(self.gripper_values) != 2 or not self.gripper_values[0] < self.gripper_values[1]:
            raise SchemaError(f"part {self.key!r}: gripper_values must be (low, high) with low < high")

    @property
    def dim(self) -> int:
        return int(self.stop) - int(self.start)

    @property
    def slice_text(self) -> str:
        return f"{self.key}[{self.start}:{self.stop}]"

    def dim_names(self) -> list[str]:
        if self.names:
            return list(self.names)
        return [f"{self.key}[{i}]" for i in range(self.start, int(self.stop))]

    def candidates(self) -> tuple[str, ...]:
        return (self.key, *self.aliases)


@dataclass(frozen=True)
class Camera:
    """A camera key; ``flip`` rotates its images by 180 degrees (stored upside down)."""

    key: str
    flip: bool = False
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "aliases", tuple(self.aliases))

    @property
    def short(self) -> str:
        """The name after the last dot: ``observation.images.wrist_image`` -> ``wrist_image``."""
        return self.key.rsplit(".", 1)[-1]

    def candidates(self) -> tuple[str, ...]:
        return (self.key, *self.aliases)

    def matches(self, name: str) -> bool:
        """Whether ``name`` designates this camera (full key, alias, short name, ``a/b`` form)."""
        name = name.replace("/", ".")
        if name in self.candidates():
            return True
        shorts = {c.rsplit(".", 1)[-1] for c in self.candidates()}
        return name.rsplit(".", 1)[-1] in shorts


# --------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbodimentSchema:
    name: str
    state: tuple[Part, ...]
    action: tuple[Part, ...]
    cameras: tuple[Camera, ...]
    layout: Layout = "single"
    grid: tuple[int, int] | None = None  # (rows, cols) for layout="grid"
    image_size: tuple[int, int] = (224, 224)  # recommended (H, W) of the combined image
    robot_type: str | None = None
    fps: float | None = None
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", tuple(self.state))
        object.__setattr__(self, "action", tuple(self.action))
        object.__setattr__(self, "cameras", tuple(self.cameras))
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        if self.grid is not None:
            object.__setattr__(self, "grid", tuple(int(v) for v in self.grid))

    # ---- dimensions ----------------------------------------------------------------------
    @property
    def state_dim(self) -> int:
        return sum(p.dim for p in self.state)

    @property
    def action_dim(self) -> int:
        return sum(p.dim for p in self.action)

    @property
    def state_names(self) -> list[str]:
        return [n for p in self.state for n in p.dim_names()]

    @property
    def action_names(self) -> list[str]:
        return [n for p in self.action for n in p.dim_names()]

    @staticmethod
    def _grippers(parts: Sequence[Part]) -> list[int]:
        out, off = [], 0
        for p in parts:
            out.extend(off + g for g in p.gripper)
            off += p.dim
        return out

    @property
    def state_grippers(self) -> list[int]:
        """Indices (in the state vector) of binary gripper dimensions."""
        return self._grippers(self.state)

    @property
    def action_grippers(self) -> list[int]:
        """Indices (in the action vector) of binary gripper dimensions."""
        return self._grippers(self.action)

    def gripper_values(self, which: str) -> dict[int, tuple[float, float]]:
        """``{vector index: (low, high)}`` for the binary gripper dimensions of ``state``/``action``."""
        out, off = {}, 0
        for p in self._parts(which):
            for g in p.gripper:
                out[off + g] = p.gripper_values
            off += p.dim
        return out

    def identity_mask(self, which: str) -> list[bool]:
        """Per-dimension flag: True where the normaliser must leave the value unchanged."""
        dim = self.state_dim if which == "state" else self.action_dim
        grip = set(self._grippers(self._parts(which)))
        return [i in grip for i in range(dim)]

    @property
    def camera_keys(self) -> list[str]:
        return [c.key for c in self.cameras]

    @property
    def data_keys(self) -> list[str]:
        """Every non-visual dataset key the schema reads (state then action, no duplicates)."""
        seen: list[str] = []
        for p in (*self.state, *self.action):
            if p.key not in seen:
                seen.append(p.key)
        return seen

    def _parts(self, which: str) -> tuple[Part, ...]:
        if which == "state":
            return self.state
        if which == "action":
            return self.action
        raise SchemaError(f"unknown vector {which!r}: expected 'state' or 'action'")

    # ---- camera layout ---------------------------------------------------------------------
    def grid_shape(self, num_cameras: int | None = None) -> tuple[int, int]:
        """(rows, cols) of the camera layout for ``num_cameras`` cameras (default: all)."""
        n = len(self.cameras) if num_cameras is None else num_cameras
        if n == 1:
            return (1, 1)
        if self.layout == "grid":
            if self.grid is None:
                cols = int(np.ceil(np.sqrt(n)))
                return (int(np.ceil(n / cols)), cols)
            return self.grid
        return (1, n)  # side_by_side (and "single" with one camera)

    # ---- validation ------------------------------------------------------------------------
    def validate(self, state_pad: int = 64, action_pad: int = 32) -> "EmbodimentSchema":
        """Check the schema on its own: widths fit the padding, cameras and layout agree."""
        errs: list[str] = []
        if not self.state:
            errs.append("no state parts")
        if not self.action:
            errs.append("no action parts")
        if self.state_dim > state_pad:
            errs.append(f"state has {self.state_dim} dimensions; the model pads state to {state_pad}")
        if self.action_dim > action_pad:
            errs.append(f"action has {self.action_dim} dimensions; the model pads actions to {action_pad}")
        if not self.cameras:
            errs.append("no cameras")
        if self.layout not in ("single", "side_by_side", "grid"):
            errs.append(f"layout {self.layout!r} must be single | side_by_side | grid")
        if self.layout == "single" and len(self.cameras) != 1:
            errs.append(f"layout 'single' needs exactly one camera, got {len(self.cameras)}")
        if self.layout == "grid" and self.grid is not None:
            r, c = self.grid
            if r < 1 or c < 1 or r * c < len(self.cameras):
                errs.append(f"grid {self.grid} cannot hold {len(self.cameras)} cameras")
        keys = [c.key for c in self.cameras]
        if len(set(keys)) != len(keys):
            errs.append(f"duplicate camera keys {keys}")
        h, w = self.image_size
        if h < 1 or w < 1:
            errs.append(f"image_size {self.image_size} must be positive")
        if errs:
            raise SchemaError(f"schema {self.name!r}:\n  - " + "\n  - ".join(errs))
        return self

    def check(self, dataset: Any, state_pad: int = 64, action_pad: int = 32,
              require_cameras: bool = True) -> "EmbodimentSchema":
        """Validate against a dataset (anything with a ``features`` dict, e.g. ``LeRobotDataset``).

        Reports every problem at once: missing keys (with the keys the dataset does have),
        dimension mismatches (schema slice vs. dataset shape), non-numeric state/action keys,
        non-visual camera keys. Returns a copy whose keys are those the dataset uses (aliases
        resolved).
        """
        self.validate(state_pad, action_pad)
        features: Mapping[str, Mapping[str, Any]] = getattr(dataset, "features", dataset)
        errs: list[str] = []
        numeric = sorted(k for k, f in features.items() if f.get("dtype") not in VISUAL_DTYPES)
        visual = sorted(k for k, f in features.items() if f.get("dtype") in VISUAL_DTYPES)

        def resolve_part(p: Part, which: str) -> Part:
            found = next((k for k in p.candidates() if k in features), None)
            if found is None:
                alias = f" (or aliases {list(p.aliases)})" if p.aliases else ""
                errs.append(f"{which} key {p.key!r}{alias} is not in the dataset; numeric keys: {numeric}")
                return p
            feat = features[found]
            dtype = str(feat.get("dtype"))
            if dtype in VISUAL_DTYPES or dtype not in NUMERIC_DTYPES:
                errs.append(f"{which} key {found!r} has dtype {dtype!r}; a numeric feature is needed")
                return p
            width = feature_width(feat)
            if width is None:
                errs.append(f"{which} key {found!r} has shape {list(feat.get('shape', []))}; "
                            "only scalars and 1-D vectors can form a state/action")
            elif p.stop > width:
                errs.append(f"{which} part {p.slice_text} does not fit: the dataset's {found!r} has shape "
                            f"{list(feat.get('shape', []))} ({width} values)")
            return replace(p, key=found) if found != p.key else p

        state = tuple(resolve_part(p, "state") for p in self.state)
        action = tuple(resolve_part(p, "action") for p in self.action)
        cams = []
        for c in self.cameras:
            found = next((k for k in c.candidates() if k in features), None)
            if found is None:
                if require_cameras:
                    alias = f" (or aliases {list(c.aliases)})" if c.aliases else ""
                    errs.append(f"camera {c.key!r}{alias} is not in the dataset; camera keys: {visual}")
                cams.append(c)
                continue
            if features[found].get("dtype") not in VISUAL_DTYPES:
                errs.append(f"camera {found!r} has dtype {features[found].get('dtype')!r}, not video/image")
            cams.append(replace(c, key=found) if found != c.key else c)
        if errs:
            raise SchemaError(f"schema {self.name!r} does not match the dataset:\n  - " + "\n  - ".join(errs))
        return replace(self, state=state, action=action, cameras=tuple(cams))

    # ---- extraction ------------------------------------------------------------------------
    def extract(self, data: Mapping[str, Any], which: str, batched: bool = True) -> np.ndarray:
        """Concatenate the parts of ``state``/``action`` from ``data`` (key -> array).

        ``batched``: arrays are (T, D) (or (T,) for scalar keys) and the result is (T, dim);
        otherwise arrays are (D,) (or scalars) and the result is (dim,). float32.
        """
        cols = []
        for p in self._parts(which):
            key = next((k for k in p.candidates() if k in data), None)
            if key is None:
                raise SchemaError(f"{which} key {p.key!r} missing; got keys {sorted(data)}")
            arr = np.asarray(data[key])
            if arr.dtype == object:
                arr = np.stack([np.asarray(v) for v in arr]) if batched else np.asarray(list(arr))
            if batched:
                if arr.ndim == 1:
                    arr = arr[:, None]
                if arr.ndim != 2:
                    raise SchemaError(f"{which} key {key!r}: expected (T, D) values, got shape {arr.shape}")
            else:
                if arr.ndim == 0:
                    arr = arr[None]
                if arr.ndim != 1:
                    raise SchemaError(f"{which} key {key!r}: expected a 1-D vector, got shape {arr.shape}")
            if arr.shape[-1] < p.stop:
                raise SchemaError(f"{which} part {p.slice_text}: the value of {key!r} has only "
                                  f"{arr.shape[-1]} entries (shape {arr.shape})")
            cols.append(arr[..., p.start:p.stop].astype(np.float32, copy=False))
        return np.concatenate(cols, axis=-1)

    def split(self, vec: np.ndarray, which: str = "action") -> dict[str, np.ndarray]:
        """Inverse of :meth:`extract` for one vector family: ``{part slice text: (..., part.dim)}``."""
        vec = np.asarray(vec)
        out, off = {}, 0
        for p in self._parts(which):
            out[p.slice_text] = vec[..., off:off + p.dim]
            off += p.dim
        return out

    # ---- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EmbodimentSchema":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise SchemaError(f"schema: unknown key(s) {sorted(unknown)}")
        try:
            d["state"] = tuple(Part(**_tuples(p)) for p in d.get("state", ()))
            d["action"] = tuple(Part(**_tuples(p)) for p in d.get("action", ()))
            d["cameras"] = tuple(Camera(**_tuples(c)) for c in d.get("cameras", ()))
            if d.get("grid") is not None:
                d["grid"] = tuple(d["grid"])
            if "image_size" in d:
                d["image_size"] = tuple(d["image_size"])
            return cls(**d)
        except TypeError as e:
            raise SchemaError(f"schema: {e}") from e

    def save(self, path: str | Path) -> Path:
        """Write the schema as JSON; ``get_schema(path)`` reads it back (e.g. ``--schema my_arm.json``)."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def describe(self) -> str:
        lines = [f"schema {self.name}: state {self.state_dim}-D, action {self.action_dim}-D, "
                 f"cameras {self.camera_keys} ({self.layout})"]
        for which in ("state", "action"):
            grips = set(self._grippers(self._parts(which)))
            names = self.state_names if which == "state" else self.action_names
            lines.append(f"  {which}: " + ", ".join(n + (" (gripper)" if i in grips else "")
                                                  for i, n in enumerate(names)))
        return "\n".join(lines)


def feature_width(feature: Mapping[str, Any]) -> int | None:
    """Number of values of a scalar/1-D feature (None for anything of higher rank)."""
    shape = list(feature.get("shape") or [])
    if len(shape) == 0:
        return 1
    if len(shape) == 1:
        return int(shape[0])
    if all(int(s) == 1 for s in shape[1:]):
        return int(shape[0])
    return None


def _tuples(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

SCHEMAS: dict[str, EmbodimentSchema] = {}


def register_schema(schema: EmbodimentSchema, overwrite: bool = False) -> EmbodimentSchema:
    """Add a schema to :data:`SCHEMAS` (validated against the default 64/32 padding)."""
    schema.validate()
    if schema.name in SCHEMAS and not overwrite:
        raise SchemaError(f"schema {schema.name!r} already registered")
    SCHEMAS[schema.name] = schema
    return schema


AUTO = "auto"  # `--set schema=auto`: the schema inferred from the dataset's meta/info.json


def resolve_schema(name: str | EmbodimentSchema, dataset: Any) -> EmbodimentSchema:
    """The schema ``name`` stands for with ``dataset``: :func:`infer_schema` for ``auto``, else
    :func:`get_schema` (a registered name or a ``.json`` schema file)."""
    if isinstance(name, str) and name == AUTO:
        return infer_schema(dataset, name=AUTO)
    return get_schema(name)


def schema_name(name: str) -> str:
    """The name a processor built with config ``schema = name`` records (a ``.json`` file's own name)."""
    if str(name).endswith(".json"):
        return get_schema(name).name
    return name


def get_schema(name: str | EmbodimentSchema) -> EmbodimentSchema:
    """A registered schema by name (dashes or underscores), or one saved as JSON
    (``EmbodimentSchema.save``) when ``name`` is the path of a ``.json`` file."""
    if isinstance(name, EmbodimentSchema):
        return name
    if name == AUTO:
        raise SchemaError("schema=auto is inferred from a dataset's meta/info.json: `dit4dit train` does it; "
                          "elsewhere use the schema recorded in the checkpoint's processor.json")
    if str(name).endswith(".json"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise SchemaError(f"schema file {path} not found")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SchemaError(f"schema file {path}: invalid JSON: {e}") from e
        return EmbodimentSchema.from_dict(d).validate()
    key = name.replace("-", "_")
    if key not in SCHEMAS:
        raise SchemaError(f"unknown schema {name!r}; available: {sorted(SCHEMAS)} "
                          "(see docs/adding-a-robot.md to add one)")
    return SCHEMAS[key]


def schema_names() -> list[str]:
    return sorted(SCHEMAS)


def infer_schema(dataset: Any, name: str = "inferred", state_key: str | None = None,
                 action_key: str | None = None, cameras: Iterable[str] | None = None) -> EmbodimentSchema:
    """A plain schema from a dataset's features: the whole state key, the whole action key and
    every camera side by side. No gripper dimensions (everything normalised). A starting point
    for a new robot (print it with ``describe()``), not a substitute for a real schema."""
    features: Mapping[str, Mapping[str, Any]] = getattr(dataset, "features", dataset)

    def pick(explicit: str | None, options: Sequence[str], what: str) -> str:
        if explicit is not None:
            return explicit
        for o in options:
            if o in features:
                return o
        raise SchemaError(f"cannot infer the {what} key: none of {list(options)} in {sorted(features)}")

    sk = pick(state_key, ("observation.state", "state", "observation.states"), "state")
    ak = pick(action_key, ("action", "actions"), "action")
    cams = list(cameras) if cameras is not None else sorted(
        k for k, f in features.items() if f.get("dtype") in VISUAL_DTYPES)
    parts = []
    for key in (sk, ak):
        w = feature_width(features[key]) if key in features else None
        if w is None:
            raise SchemaError(f"cannot infer a schema: {key!r} is missing or not a vector")
        names = _feature_names(features[key], w)
        parts.append(Part(key, 0, w, names=names))
    return EmbodimentSchema(
        name=name, state=(parts[0],), action=(parts[1],), cameras=tuple(Camera(c) for c in cams),
        layout="single" if len(cams) == 1 else "side_by_side",
        robot_type=getattr(dataset, "robot_type", None), fps=getattr(dataset, "fps", None),
        description="inferred from the dataset's features",
    )


def _feature_names(feature: Mapping[str, Any], width: int) -> tuple[str, ...]:
    names = feature.get("names")
    if isinstance(names, dict):  # {"motors": [...]} (LeRobot v2 style)
        names = next(iter(names.values()), None) if len(names) == 1 else None
    if isinstance(names, list) and len(names) == 1 and isinstance(names[0], list):
        names = names[0]
    if isinstance(names, list) and len(names) == width and all(isinstance(n, str) for n in names):
        if len(set(names)) == width:
            return tuple(names)
        return tuple(f"{n}.{i}" for i, n in enumerate(names))
    return ()


# --------------------------------------------------------------------------------------------
# Built-in embodiments
# --------------------------------------------------------------------------------------------

register_schema(EmbodimentSchema(
    name="metaworld_sawyer",
    # The policy sees the hand (first 4 observation values: xyz + gripper opening in [0, 1]),
    # never object/goal positions; the slice works on the full 39-D observation or a 4-D state.
    state=(Part("observation.state", 0, 4, names=("hand_x", "hand_y", "hand_z", "gripper_open"),
                aliases=("state",)),),
    action=(Part("action", 0, 4, names=("dx", "dy", "dz", "gripper"), gripper=(3,),
                 gripper_values=(-1.0, 1.0), aliases=("actions",)),),
    cameras=(Camera("observation.images.image", aliases=("image",)),),
    layout="single",
    image_size=(64, 64),
    robot_type="sawyer",
    fps=None,  # set by whoever records the dataset
    description="MetaWorld Sawyer: hand xyz + gripper opening; action dx, dy, dz, gripper (-1 open, +1 close).",
))

register_schema(EmbodimentSchema(
    name="libero_franka",
    state=(Part("observation.state", 0, 8,
                names=("eef_x", "eef_y", "eef_z", "eef_axis_angle_x", "eef_axis_angle_y", "eef_axis_angle_z",
                       "gripper_qpos_left", "gripper_qpos_right"),
                aliases=("state",)),),
    action=(Part("action", 0, 7,
                 names=("d_x", "d_y", "d_z", "d_roll", "d_pitch", "d_yaw", "gripper"),
                 gripper=(6,), gripper_values=(-1.0, 1.0), aliases=("actions",)),),
    cameras=(
        Camera("observation.images.image", aliases=("image", "observation.images.agentview_image")),
        Camera("observation.images.wrist_image", aliases=("wrist_image", "observation.images.image2")),
    ),
    layout="side_by_side",
    image_size=(224, 448),
    robot_type="panda",
    fps=10.0,
    description="LIBERO Franka Panda (LeRobot conversions of the no-op-filtered demos): 6-D EEF delta + "
                "binary gripper (-1 open, +1 close); images stored already rotated 180 degrees.",
))

_GR1_ARM = ("shoulder_pitch", "shoulder_roll", "shoulder_yaw", "elbow_pitch", "wrist_yaw", "wrist_roll",
            "wrist_pitch")
_GR1_HAND = tuple(f"hand_{i}" for i in range(6))
_GR1_WAIST = ("waist_yaw", "waist_pitch", "waist_roll")


def _gr1_parts(key: str, aliases: tuple[str, ...]) -> tuple[Part, ...]:
    # GR1 LeRobot datasets (GR00T conversions) store a 44-D vector, meta/modality.json:
    # left_arm 0:7, left_hand 7:13, left_leg 13:19, neck 19:22, right_arm 22:29,
    # right_hand 29:35, right_leg 35:41, waist 41:44. The arms-waist embodiment uses 29 of them.
    return (
        Part(key, 0, 7, names=tuple(f"left_{n}" for n in _GR1_ARM), aliases=aliases),
        Part(key, 22, 29, names=tuple(f"right_{n}" for n in _GR1_ARM), aliases=aliases),
        Part(key, 7, 13, names=tuple(f"left_{n}" for n in _GR1_HAND), aliases=aliases),
        Part(key, 29, 35, names=tuple(f"right_{n}" for n in _GR1_HAND), aliases=aliases),
        Part(key, 41, 44, names=_GR1_WAIST, aliases=aliases),
    )


register_schema(EmbodimentSchema(
    name="robocasa_gr1",
    state=_gr1_parts("observation.state", ("state",)),
    action=_gr1_parts("action", ("actions",)),
    cameras=(Camera("observation.images.ego_view", aliases=("ego_view",)),),
    layout="single",
    image_size=(224, 224),
    robot_type="fourier_gr1_arms_waist",
    fps=20.0,
    description="RoboCasa GR1 tabletop (Fourier GR1, arms + hands + waist, 29-D) from the 44-D GR1 vectors; "
                "one ego view.",
))

_G1_ARM = ("ShoulderPitch", "ShoulderRoll", "ShoulderYaw", "Elbow", "WristRoll", "WristPitch", "WristYaw")
_G1_NAMES = (tuple(f"kLeft{n}" for n in _G1_ARM) + tuple(f"kRight{n}" for n in _G1_ARM)
             + ("kLeftGripper", "kRightGripper"))

register_schema(EmbodimentSchema(
    name="unitree_g1",
    # Unitree G1 with Dex1 grippers (unitree_IL_lerobot layout). The gripper values are joint
    # positions (continuous), so they are normalised like the arm joints, not binarised.
    state=(Part("observation.state", 0, 16, names=_G1_NAMES, aliases=("state",)),),
    action=(Part("action", 0, 16, names=_G1_NAMES, aliases=("actions",)),),
    cameras=(Camera("observation.images.cam_left_high",
                    aliases=("observation.images.cam_high", "observation.images.ego_view", "cam_left_high")),),
    layout="single",
    image_size=(224, 224),
    robot_type="Unitree_G1_Dex1",
    fps=30.0,
    description="Unitree G1 upper body: two 7-DoF arms + two Dex1 grippers (16-D); head (ego) camera.",
))

register_schema(EmbodimentSchema(
    name="toy_reach",
    # the built-in pixel reaching task (dit4dit.envs.toy): agent position, velocity action, one camera
    state=(Part("observation.state", 0, 2, names=("x", "y")),),
    action=(Part("action", 0, 2, names=("dx", "dy")),),
    cameras=(Camera("observation.images.image"),),
    layout="single",
    image_size=(64, 64),
))
