"""The one object that turns raw robot data into model inputs, for training AND serving.

`Processor` holds the embodiment schema, the normaliser (statistics) and the input protocol
(`InputConfig`: cameras, image size, frames, stride). Training samples and the policy server
both call the same methods, and the processor travels with every checkpoint as
``processor.json``, so the two sides cannot drift apart:

- :meth:`Processor.images`: camera frames (uint8 RGB) -> ``(3, T, H, W)`` float32 in [-1, 1]
  (optional 180-degree flip per camera, resize in uint8 with torch bilinear + antialias to the
  camera's cell, cells combined side by side or in a grid, ``inputs.image_size`` overall);
- :meth:`Processor.state` / :meth:`Processor.actions`: normalise and zero-pad to 64 / 32 with masks;
- :meth:`Processor.unnormalize_actions`: model output -> robot actions (binary grippers snapped);
- :meth:`Processor.observation`: one policy call's observation dict -> batch-1 model inputs,
  with clear errors for missing keys, wrong shapes/dtypes, NaN, wrong image size or channel order.

Observations are checked exactly, never coerced: each state key must hold exactly as many real
numbers as the training data's column (``state_widths``, recorded from the dataset; for older
processors the widest slice the schema takes of the key), complex, string and object values are
refused, images must be uint8 (T, H, W, 3) at the recorded camera size, and the prompt a (UTF-8)
string. Each error names the key, what was expected and what was received, in a bounded summary
(:mod:`dit4dit.data.validation`), never the raw value.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import InputConfig, _from_dict as _config_from_dict
from .normalize import NormalizationError, Normalizer, check_description
from .schema import Camera, EmbodimentSchema, SchemaError, feature_width
from .validation import describe_keys, describe_value

PROCESSOR_FILE = "processor.json"
PROMPT_KEYS = ("prompt", "instruction", "task", "language_instruction")
MAX_PROMPT_CHARS = 4096  # longer instructions are refused (the text encoder's cost grows with the length)


class ProcessorError(ValueError):
    """A bad observation / input (names the key and what is wrong) or an inconsistent processor."""


def _key_forms(key: str) -> tuple[str, ...]:
    """Spellings of a dataset key a client may use: ``observation.state``, ``observation/state``."""
    return (key, key.replace(".", "/"))


class Processor:
    FORMAT = "dit4dit.processor"

    def __init__(
        self,
        schema: EmbodimentSchema,
        normalizer: Normalizer,
        inputs: InputConfig,
        action_dim: int = 32,
        state_dim: int = 64,
        action_horizon: int | None = None,
        camera_sizes: Mapping[str, Sequence[int]] | None = None,
        strict_image_size: bool = True,
        capture: Mapping[str, Any] | None = None,
        state_widths: Mapping[str, int] | None = None,
    ) -> None:
        self.schema = schema.validate(state_dim, action_dim)
        # how the training data's frames were captured (the dataset's meta/capture.json, e.g. the
        # simulator camera view of each camera key): evaluation renders the same views
        self.capture: dict[str, Any] = json.loads(json.dumps(dict(capture or {})))
        self.normalizer = normalizer
        self.inputs = inputs
        self.action_dim = int(action_dim)
        self.state_dim = int(state_dim)
        self.action_horizon = None if action_horizon is None else int(action_horizon)
        self.strict_image_size = bool(strict_image_size)
        for which, want in (("state", schema.state_dim), ("action", schema.action_dim)):
            try:
                have = normalizer.dim(which)
            except NormalizationError as e:
                raise ProcessorError(str(e)) from e
            if have != want:
                raise ProcessorError(f"normaliser {which} has {have} dims but schema {schema.name!r} has {want}")
        self.cameras, self.grid = self._resolve_cameras()
        h, w = (int(v) for v in inputs.image_size)
        rows, cols = self.grid
        if h % rows or w % cols:
            raise ProcessorError(f"inputs.image_size {inputs.image_size} cannot be split into a {rows} x {cols} "
                                 f"camera grid of equal cells (layout {schema.layout!r})")
        self.image_size = (h, w)
        self.cell_size = (h // rows, w // cols)
        self.camera_sizes: dict[str, tuple[int, int]] = {}
        for k, v in (camera_sizes or {}).items():
            cam = self._camera_for(k)
            self.camera_sizes[cam.key] = (int(v[0]), int(v[1]))
        self._action_grippers = schema.gripper_values("action")
        # the exact width of each state key of an observation: the dataset column's (recorded by
        # for_dataset), else the widest slice the schema takes of it
        widths: dict[str, int] = {}
        for p in schema.state:
            widths[p.key] = max(widths.get(p.key, 0), int(p.stop))
        for k, w in (state_widths or {}).items():
            if k in widths:
                if int(w) < widths[k]:
                    raise ProcessorError(f"state_widths: key {k!r} has {w} values but the schema takes "
                                         f"[..:{widths[k]}] of it")
                widths[k] = int(w)
        self.state_widths = widths

    # ------------------------------------------------------------------------------------------
    # construction helpers
    # ------------------------------------------------------------------------------------------
    def _resolve_cameras(self) -> tuple[list[Camera], tuple[int, int]]:
        schema, inputs = self.schema, self.inputs
        names = list(inputs.cameras) or [c.key for c in schema.cameras]
        chosen: list[Camera] = []
        for n in names:
            exact = [c for c in schema.cameras if n in c.candidates()]
            match = exact or [c for c in schema.cameras if c.matches(n)]
            if not match:
                raise ProcessorError(
                    f"inputs.cameras names {n!r}, which is not a camera of schema {schema.name!r} "
                    f"(cameras: {[c.key for c in schema.cameras]}); set inputs.cameras to some of "
                    f"{[c.short for c in schema.cameras]}"
                )
            if match[0] in chosen:
                raise ProcessorError(f"inputs.cameras lists camera {match[0].key!r} twice")
            chosen.append(match[0])
        if inputs.camera_layout == "single" and len(chosen) > 1:
            raise ProcessorError(f"inputs.camera_layout='single' but {len(chosen)} cameras are selected "
                                 f"({[c.key for c in chosen]}); use 'side_by_side'")
        if len(chosen) == len(schema.cameras):
            grid = schema.grid_shape()
        else:
            grid = schema.grid_shape(len(chosen)) if schema.layout == "grid" and schema.grid is None else \
                ((1, 1) if len(chosen) == 1 else (1, len(chosen)))
        return chosen, grid

    def _camera_for(self, name: str) -> Camera:
        for c in self.cameras:
            if name in c.candidates():
                return c
        for c in self.cameras:
            if c.matches(name):
                return c
        raise ProcessorError(f"{name!r} is not one of the processor's cameras {self.camera_keys}")

    @property
    def camera_keys(self) -> list[str]:
        return [c.key for c in self.cameras]

    @classmethod
    def for_dataset(cls, dataset: Any, schema: EmbodimentSchema | str, inputs: InputConfig,
                    stats: Mapping[str, Any] | None = None, mode: str = "min_max", action_dim: int = 32,
                    state_dim: int = 64, action_horizon: int | None = None, progress: bool = True,
                    strict_image_size: bool = True) -> "Processor":
        """Check ``schema`` against ``dataset``, compute statistics (unless given), record the
        dataset's camera resolutions and build the processor."""
        from .normalize import compute_dataset_stats
        from .schema import get_schema

        schema = get_schema(schema).check(dataset, state_dim, action_dim)
        if stats is None:
            stats = compute_dataset_stats(dataset, schema, keys=(), progress=progress)
        normalizer = Normalizer.from_stats(stats, schema, mode=mode)  # type: ignore[arg-type]
        sizes = {}
        for c in schema.cameras:
            shape = list(dataset.features[c.key].get("shape") or [])
            hw = _hw_from_feature(shape, dataset.features[c.key].get("names"))
            if hw is not None:
                sizes[c.key] = hw
        widths = {}
        for p in schema.state:
            w = feature_width(dataset.features.get(p.key, {})) if p.key in dataset.features else None
            if w is not None:
                widths[p.key] = w
        proc = cls(schema, normalizer, inputs, action_dim=action_dim, state_dim=state_dim,
                   action_horizon=action_horizon, camera_sizes=None, strict_image_size=strict_image_size,
                   capture=getattr(dataset, "capture", None), state_widths=widths)
        proc.camera_sizes = {k: v for k, v in sizes.items() if k in proc.camera_keys}
        return proc

    # ------------------------------------------------------------------------------------------
    # images
    # ------------------------------------------------------------------------------------------
    def images(self, cams: Mapping[str, Any]) -> torch.Tensor:
        """Camera frames -> float32 (3, T, H, W) in [-1, 1].

        ``cams`` maps each camera (dataset key, alias or short name) to uint8 RGB frames
        (T, H, W, 3) or one frame (H, W, 3). All cameras must give the same T.
        """
        frames = []
        t_count = None
        for cam in self.cameras:
            key = self._find_camera_key(cams, cam)
            if key is None:
                raise ProcessorError(f"camera {cam.key!r} missing; got keys {describe_keys(cams)}")
            arr = self._check_image(cams[key], key, cam)
            if t_count is None:
                t_count = arr.shape[0]
            elif arr.shape[0] != t_count:
                raise ProcessorError(f"camera {key!r} gives {arr.shape[0]} frames, another camera {t_count}")
            frames.append((cam, arr))
        assert t_count is not None
        ch, cw = self.cell_size
        rows, cols = self.grid
        # Resize in uint8 (torch's antialiased bilinear has a fast uint8 channels-last kernel,
        # ~15x faster than float32; results differ by at most one grey level) and convert once.
        canvas = torch.zeros((t_count, ch * rows, cw * cols, 3), dtype=torch.uint8)
        for i, (cam, arr) in enumerate(frames):
            x = torch.from_numpy(np.ascontiguousarray(arr))
            if cam.flip:
                x = x.flip(1, 2)
            if tuple(x.shape[1:3]) != (ch, cw):
                x = F.interpolate(x.permute(0, 3, 1, 2), size=(ch, cw), mode="bilinear", align_corners=False,
                                  antialias=True).permute(0, 2, 3, 1)
            r, c = divmod(i, cols)
            canvas[:, r * ch:(r + 1) * ch, c * cw:(c + 1) * cw] = x
        out = torch.empty((3, t_count, ch * rows, cw * cols), dtype=torch.float32)
        out.copy_(canvas.permute(3, 0, 1, 2))
        return out.mul_(1.0 / 127.5).sub_(1.0)

    @staticmethod
    def _find_camera_key(cams: Mapping[str, Any], cam: Camera) -> str | None:
        for k in cam.candidates():
            for form in _key_forms(k):
                if form in cams:
                    return form
        for k in cams:
            if isinstance(k, str) and cam.matches(k):
                return k
        return None

    def _check_image(self, value: Any, key: str, cam: Camera) -> np.ndarray:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        arr = _as_array(value, f"camera {key!r}", "uint8 RGB images (H, W, 3) or (T, H, W, 3)")
        if arr.dtype != np.uint8:
            hint = " (floats in [0, 1]? convert with (x * 255).round().astype(np.uint8))" \
                if np.issubdtype(arr.dtype, np.floating) else ""
            raise ProcessorError(f"camera {key!r}: expected uint8 RGB images, got dtype {arr.dtype}{hint}")
        if arr.ndim not in (3, 4):
            raise ProcessorError(f"camera {key!r}: expected (H, W, 3) or (T, H, W, 3), got shape {list(arr.shape)}")
        if arr.shape[-1] != 3:
            if arr.shape[-3] == 3:
                raise ProcessorError(f"camera {key!r}: shape {arr.shape} looks channel-first; expected "
                                     "channel-last (H, W, 3) RGB (transpose with .transpose(1, 2, 0))")
            raise ProcessorError(f"camera {key!r}: expected 3 channels (RGB) last, got shape {arr.shape}")
        if arr.ndim == 3:
            arr = arr[None]
        want = self.camera_sizes.get(cam.key)
        if self.strict_image_size and want is not None and tuple(arr.shape[1:3]) != tuple(want):
            raise ProcessorError(
                f"camera {key!r}: image is {arr.shape[1]}x{arr.shape[2]} (H x W) but the model was trained on "
                f"{want[0]}x{want[1]} images from this camera; resize on the client (same aspect ratio) or "
                "build the processor with strict_image_size=False"
            )
        return arr

    # ------------------------------------------------------------------------------------------
    # vectors
    # ------------------------------------------------------------------------------------------
    def state(self, raw: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw state (D,) (schema order) or a dict of dataset keys -> (64,) normalised, padded + mask."""
        vec = self._raw_vector(raw, "state")
        d = self.schema.state_dim
        out = torch.zeros(self.state_dim, dtype=torch.float32)
        out[:d] = torch.from_numpy(np.asarray(self.normalizer.normalize("state", vec), np.float32))
        mask = torch.zeros(self.state_dim, dtype=torch.bool)
        mask[:d] = True
        return out, mask

    def actions(self, raw: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw action chunk (H, A) (schema order) -> (H, 32) normalised, padded + (H, 32) mask
        (False on padded dimensions; padded *steps* are the caller's to mask)."""
        arr = np.asarray(raw, dtype=np.float64)
        a = self.schema.action_dim
        if arr.ndim != 2 or arr.shape[1] != a:
            raise ProcessorError(f"actions: expected (H, {a}) values for schema {self.schema.name!r}, got {arr.shape}")
        _check_finite(arr, "actions")
        out = torch.zeros((arr.shape[0], self.action_dim), dtype=torch.float32)
        out[:, :a] = torch.from_numpy(np.asarray(self.normalizer.normalize("action", arr), np.float32))
        mask = torch.zeros((arr.shape[0], self.action_dim), dtype=torch.bool)
        mask[:, :a] = True
        return out, mask

    def unnormalize_actions(self, norm: Any) -> np.ndarray:
        """Model output (..., H, 32) (numpy or torch) -> robot actions (..., H, A) float32 in schema
        order; binary gripper dimensions are snapped to their (low, high) values."""
        if isinstance(norm, torch.Tensor):
            norm = norm.detach().float().cpu().numpy()
        arr = np.asarray(norm, dtype=np.float64)
        a = self.schema.action_dim
        if arr.ndim < 2 or arr.shape[-1] not in (self.action_dim, a):
            raise ProcessorError(f"unnormalize_actions: expected (..., H, {self.action_dim}) values, got {arr.shape}")
        raw = np.asarray(self.normalizer.unnormalize("action", arr[..., :a]), np.float64)
        for i, (lo, hi) in self._action_grippers.items():
            raw[..., i] = np.where(raw[..., i] > (lo + hi) / 2, hi, lo)
        return raw.astype(np.float32)

    def _raw_vector(self, raw: Any, which: str) -> np.ndarray:
        if isinstance(raw, Mapping):
            try:
                vec = self.schema.extract(raw, which, batched=False)
            except SchemaError as e:
                raise ProcessorError(str(e)) from e
        else:
            if isinstance(raw, torch.Tensor):
                raw = raw.detach().cpu().numpy()
            vec = _as_array(raw, which, "a vector of numbers")
            want = self.schema.state_dim if which == "state" else self.schema.action_dim
            if vec.shape != (want,):
                raise ProcessorError(f"{which}: expected ({want},) values for schema {self.schema.name!r}, "
                                     f"got shape {vec.shape}")
        if vec.dtype.kind not in _REAL_KINDS:
            raise ProcessorError(f"{which}: expected real numbers, got dtype {vec.dtype}")
        vec = vec.astype(np.float64)
        _check_finite(vec, which)
        return vec

    # ------------------------------------------------------------------------------------------
    # one policy call
    # ------------------------------------------------------------------------------------------
    def observation(self, obs: Mapping[str, Any]) -> dict[str, Any]:
        """One observation (camera keys -> uint8 images, ``observation.state``, ``prompt``) ->
        ``{"video": (1, 3, num_cond, H, W), "state": (1, 64), "state_mask": (1, 64),
        "instruction": [str]}``."""
        if not isinstance(obs, Mapping):
            raise ProcessorError(f"observation must be a dict, got {type(obs).__name__}")
        nc = self.inputs.num_cond_frames
        cams = {}
        for cam in self.cameras:
            key = self._find_camera_key(obs, cam)
            if key is None:
                raise ProcessorError(
                    f"observation lacks camera {cam.key!r} (also accepted: "
                    f"{sorted({*cam.candidates(), cam.short, cam.key.replace('.', '/')})}); got keys {describe_keys(obs)}"
                )
            arr = self._check_image(obs[key], key, cam)
            if arr.shape[0] != nc:
                raise ProcessorError(f"camera {key!r}: the model conditions on {nc} frame(s) "
                                     f"(oldest first); got {arr.shape[0]} (shape {list(arr.shape)})")
            cams[cam.key] = arr
        video = self.images(cams)[None]
        state_src: dict[str, Any] = {}
        for p in self.schema.state:
            found = None
            for k in p.candidates():
                for form in _key_forms(k):
                    if form in obs:
                        found = form
                        break
                if found:
                    break
            if found is None:
                raise ProcessorError(f"observation lacks the state key {p.key!r} (or {p.key.replace('.', '/')!r}"
                                     f"{', ' + repr(list(p.aliases)) if p.aliases else ''}); got keys "
                                     f"{describe_keys(obs)}")
            width = self.state_widths.get(p.key, int(p.stop))
            val = obs[found]
            if isinstance(val, torch.Tensor):
                val = val.detach().cpu().numpy()
            val = _as_array(val, f"state key {found!r}", f"({width},) real numbers")
            if val.ndim == 2 and val.shape[0] == 1:
                val = val[0]
            if val.ndim == 0 and width == 1:
                val = val[None]
            if val.ndim != 1 or val.shape[0] != width:
                raise ProcessorError(f"state key {found!r}: expected a 1-D vector of {width} values (shape ({width},)), got "
                                     f"{describe_value(val)}")
            if val.dtype.kind not in _REAL_KINDS:
                raise ProcessorError(f"state key {found!r}: expected real numbers (bool, int or float), got dtype "
                                     f"{val.dtype}")
            bad = ~np.isfinite(val.astype(np.float64))
            if bad.any():
                raise ProcessorError(f"state key {found!r} contains {int(bad.sum())} NaN/inf value(s) (first at index "
                                     f"{int(np.flatnonzero(bad)[0])}) in {describe_value(val)}")
            state_src[p.key] = val
        state, mask = self.state(state_src)
        instruction = None
        for k in PROMPT_KEYS:
            if k in obs:
                instruction = obs[k]
                break
        if instruction is None:
            raise ProcessorError(f"observation lacks the instruction: give one of {list(PROMPT_KEYS)}; "
                                 f"got keys {describe_keys(obs)}")
        if isinstance(instruction, np.ndarray) and instruction.ndim == 0:
            instruction = instruction.item()
        if isinstance(instruction, (bytes, bytearray)):
            try:
                instruction = bytes(instruction).decode("utf-8")
            except UnicodeDecodeError as e:
                raise ProcessorError(f"instruction {k!r}: expected a UTF-8 string, got {len(instruction)} bytes that "
                                     f"are not valid UTF-8 (at byte {e.start})") from None
        if not isinstance(instruction, str):
            raise ProcessorError(f"instruction {k!r}: expected a string, got {describe_value(instruction)}")
        if len(instruction) > MAX_PROMPT_CHARS:
            raise ProcessorError(f"instruction {k!r}: {len(instruction)} characters, at most {MAX_PROMPT_CHARS} are "
                                 "accepted")
        return {"video": video, "state": state[None], "state_mask": mask[None], "instruction": [instruction]}

    # ------------------------------------------------------------------------------------------
    # serialisation
    # ------------------------------------------------------------------------------------------
    def protocol(self) -> dict[str, Any]:
        """What a client must send / will receive (for server metadata and docs)."""
        return {
            "schema": self.schema.name,
            "cameras": self.camera_keys,
            "camera_sizes": {k: list(v) for k, v in self.camera_sizes.items()},
            "camera_layout": self.schema.layout if len(self.cameras) == len(self.schema.cameras) else
            ("single" if len(self.cameras) == 1 else "side_by_side"),
            "image_size": list(self.image_size),
            "num_cond_frames": self.inputs.num_cond_frames,
            "num_future_frames": self.inputs.num_future_frames,
            "frame_stride": self.inputs.frame_stride,
            "fps": self.inputs.fps,
            "state_keys": [p.slice_text for p in self.schema.state],
            "state_widths": dict(self.state_widths),
            "state_names": self.schema.state_names,
            "action_names": self.schema.action_names,
            "action_dim": self.schema.action_dim,
            "action_horizon": self.action_horizon,
            "normalization": self.normalizer.mode,
            **({"capture": self.capture} if self.capture else {}),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.FORMAT,
            "version": 1,
            "schema": self.schema.to_dict(),
            "normalizer": self.normalizer.to_dict(),
            "inputs": json.loads(json.dumps(dataclasses.asdict(self.inputs))),
            "action_dim": self.action_dim,
            "state_dim": self.state_dim,
            "action_horizon": self.action_horizon,
            "camera_sizes": {k: list(v) for k, v in self.camera_sizes.items()},
            "strict_image_size": self.strict_image_size,
            "capture": self.capture,
            "state_widths": dict(self.state_widths),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Processor":
        check_description(d, cls.FORMAT, "processor", ProcessorError)
        schema = EmbodimentSchema.from_dict(d["schema"])
        normalizer = Normalizer.from_dict(d["normalizer"])
        inputs = _config_from_dict(InputConfig, dict(d["inputs"]), "inputs")
        return cls(schema, normalizer, inputs, action_dim=d["action_dim"], state_dim=d["state_dim"],
                   action_horizon=d.get("action_horizon"), camera_sizes=d.get("camera_sizes") or {},
                   strict_image_size=d.get("strict_image_size", True), capture=d.get("capture") or {},
                   state_widths=d.get("state_widths") or {})

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / PROCESSOR_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Processor":
        path = Path(path)
        if path.is_dir():
            path = path / PROCESSOR_FILE
        if not path.exists():
            raise ProcessorError(f"{path}: no processor.json (every checkpoint folder holds one)")
        return cls.from_dict(json.loads(path.read_text()))

    def __repr__(self) -> str:
        return (f"Processor(schema={self.schema.name!r}, cameras={self.camera_keys}, image_size={self.image_size}, "
                f"frames={self.inputs.num_cond_frames}+{self.inputs.num_future_frames}, "
                f"stride={self.inputs.frame_stride}, mode={self.normalizer.mode!r})")


_REAL_KINDS = frozenset("biuf")  # bool, signed / unsigned integer, float: never complex, str or object


def _as_array(value: Any, what: str, expected: str) -> np.ndarray:
    """``np.asarray(value)``, turning ragged or nested-object input into a :class:`ProcessorError`."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as e:
        raise ProcessorError(f"{what}: expected {expected}, got {describe_value(value)} that is not a regular "
                             f"array ({type(e).__name__})") from None
    if arr.dtype == object:
        raise ProcessorError(f"{what}: expected {expected}, got {describe_value(value)} holding mixed or nested "
                             "values")
    return arr


def _check_finite(arr: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        where = np.argwhere(bad)[0].tolist()
        raise ProcessorError(f"{what} contains NaN/inf (first at index {where})")


def _hw_from_feature(shape: Sequence[int], names: Any) -> tuple[int, int] | None:
    """(H, W) of a visual feature; LeRobot stores (H, W, C) with names, sometimes (C, H, W)."""
    if len(shape) != 3:
        return None
    if isinstance(names, list) and len(names) == 3:
        n = [str(x).lower() for x in names]
        if "height" in n and "width" in n:
            return int(shape[n.index("height")]), int(shape[n.index("width")])
    if shape[-1] in (1, 3, 4):
        return int(shape[0]), int(shape[1])
    if shape[0] in (1, 3, 4):
        return int(shape[1]), int(shape[2])
    return None
