"""Tiny LeRobot datasets (v3.0 and v2.1) for tests, with content that identifies itself.

Every video/image frame encodes its own (episode, frame) pair in large black/white blocks
(4 x 4 grid, 16 bits: 6 bits episode, 10 bits frame, XOR a per-camera salt) that survive lossy
compression, so a test can tell exactly which frame a decoder returned. Numeric columns are
deterministic functions of (episode, frame): see :func:`state_row` and :func:`action_row`.

    from lerobot_fixtures import make_v30_dataset, make_v21_dataset, read_code
    root = make_v30_dataset(tmp_path / "ds", episodes=3, length=20)
    ds = LeRobotDataset(root)
    img = ds.frames("observation.images.image", 1, [5])[0]
    assert read_code(img, salt=camera_salt(0)) == (1, 5)
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DEFAULT_TASKS = ("pick up the red block", "open the top drawer", "push the green button")
DEFAULT_CAMERA = "observation.images.image"
GRID = (4, 4)  # rows x cols of code blocks -> 16 bits
EP_BITS, FRAME_BITS = 6, 10


# ----------------------------------------------------------------------------------------------
# self-identifying content


def camera_salt(camera: int) -> int:
    """XOR mask that makes codes of different cameras differ (camera 0 -> 0)."""
    return (0xA5A5 * camera) & 0xFFFF if camera else 0


def code_image(episode: int, frame: int, size: tuple[int, int] = (48, 64), salt: int = 0) -> np.ndarray:
    """uint8 (H, W, 3) frame whose blocks spell (episode, frame)."""
    if not (0 <= episode < 1 << EP_BITS and 0 <= frame < 1 << FRAME_BITS):
        raise ValueError(f"code supports episode < {1 << EP_BITS}, frame < {1 << FRAME_BITS}")
    value = ((episode << FRAME_BITS) | frame) ^ salt
    h, w = size
    rows, cols = GRID
    bits = np.array([(value >> b) & 1 for b in range(rows * cols)], dtype=np.uint8).reshape(rows, cols)
    ys = (np.arange(h) * rows) // h
    xs = (np.arange(w) * cols) // w
    img = bits[ys][:, xs] * 255
    return np.repeat(img[:, :, None], 3, axis=2).astype(np.uint8)


def read_code(img: np.ndarray, salt: int = 0) -> tuple[int, int]:
    """(episode, frame) spelled by a (possibly lossy) frame made by :func:`code_image`."""
    h, w = img.shape[:2]
    rows, cols = GRID
    gray = np.asarray(img, dtype=np.float64).mean(axis=2)
    value = 0
    for b in range(rows * cols):
        r, c = divmod(b, cols)
        y0, y1 = r * h // rows, (r + 1) * h // rows
        x0, x1 = c * w // cols, (c + 1) * w // cols
        my, mx = max(1, (y1 - y0) // 4), max(1, (x1 - x0) // 4)
        if gray[y0 + my : y1 - my, x0 + mx : x1 - mx].mean() > 127.5:
            value |= 1 << b
    value ^= salt
    return value >> FRAME_BITS, value & ((1 << FRAME_BITS) - 1)


def state_row(episode: int, frame: int, dim: int) -> np.ndarray:
    return (episode * 100.0 + frame + np.arange(dim) / 10.0).astype(np.float32)


def action_row(episode: int, frame: int, dim: int) -> np.ndarray:
    return (-(episode * 100.0 + frame) - np.arange(dim) / 100.0).astype(np.float32)


def _lengths(episodes: int, length: int | Sequence[int]) -> list[int]:
    if isinstance(length, int):
        return [length] * episodes
    lengths = [int(x) for x in length]
    if len(lengths) != episodes:
        raise ValueError("one length per episode")
    return lengths


def episode_task(episode: int, tasks: Sequence[str]) -> str:
    return tasks[episode % len(tasks)]


def episode_arrays(
    episode: int,
    length: int,
    size: tuple[int, int],
    cameras: Sequence[str],
    image_keys: Sequence[str],
    state_dim: int,
    action_dim: int,
) -> dict[str, np.ndarray]:
    """The data of one fixture episode: state, action and coded frames per camera/image key."""
    d = {
        "observation.state": np.stack([state_row(episode, t, state_dim) for t in range(length)]),
        "action": np.stack([action_row(episode, t, action_dim) for t in range(length)]),
    }
    for c, key in enumerate(list(cameras) + list(image_keys)):
        d[key] = np.stack([code_image(episode, t, size, camera_salt(c)) for t in range(length)])
    return d


def _base_features(size, cameras, image_keys, state_dim, action_dim, video_dtype="video") -> dict:
    h, w = size
    feats = {
        "observation.state": {
            "dtype": "float32",
            "shape": [state_dim],
            "names": [f"s{i}" for i in range(state_dim)],
        },
        "action": {"dtype": "float32", "shape": [action_dim], "names": [f"a{i}" for i in range(action_dim)]},
    }
    for key in cameras:
        feats[key] = {"dtype": video_dtype, "shape": [h, w, 3], "names": ["height", "width", "channels"]}
    for key in image_keys:
        feats[key] = {"dtype": "image", "shape": [h, w, 3], "names": ["height", "width", "channels"]}
    return feats


# ----------------------------------------------------------------------------------------------
# v3.0 (through the project's writer)


def make_v30_dataset(
    root: str | Path,
    episodes: int = 3,
    length: int | Sequence[int] = 20,
    size: tuple[int, int] = (48, 64),
    cameras: Sequence[str] = (DEFAULT_CAMERA,),
    state_dim: int = 4,
    action_dim: int = 4,
    tasks: Sequence[str] = DEFAULT_TASKS,
    fps: int = 10,
    image_keys: Sequence[str] = (),
    robot_type: str | None = "fixture_bot",
    **writer_kwargs,
) -> Path:
    """A v3.0 dataset written by :class:`dit4dit.data.writer.LeRobotWriter`.

    Camera ``c`` (index in ``cameras`` then ``image_keys``) uses salt ``camera_salt(c)``.
    ``writer_kwargs`` go to the writer (e.g. ``video_files_size_mb=0.01`` for many video files).
    """
    from dit4dit.data.writer import LeRobotWriter

    lengths = _lengths(episodes, length)
    feats = _base_features(size, cameras, image_keys, state_dim, action_dim)
    with LeRobotWriter(root, fps=fps, features=feats, robot_type=robot_type, **writer_kwargs) as w:
        for ep, n in enumerate(lengths):
            w.add_episode(
                episode_arrays(ep, n, size, cameras, image_keys, state_dim, action_dim), episode_task(ep, tasks)
            )
    return Path(root)


# ----------------------------------------------------------------------------------------------
# v2.1 (written here by hand, the way LeRobot v2.1 lays it out)


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def make_v21_dataset(
    root: str | Path,
    episodes: int = 3,
    length: int | Sequence[int] = 20,
    size: tuple[int, int] = (48, 64),
    cameras: Sequence[str] = (DEFAULT_CAMERA,),
    state_dim: int = 4,
    action_dim: int = 4,
    tasks: Sequence[str] = DEFAULT_TASKS,
    fps: int = 10,
    image_keys: Sequence[str] = (),
    image_storage: str = "files",
    chunks_size: int = 1000,
    gop: int = 6,
    codec: str = "h264",
    robot_type: str | None = "fixture_bot",
) -> Path:
    """A v2.1 dataset: per-episode parquet (variable-size list columns) and per-episode mp4.

    ``image_storage``: "files" (``images/<key>/episode_XXXXXX/frame_XXXXXX.png``, no parquet
    column) or "parquet" (struct {bytes, path} column). Videos use keyframes every ``gop``
    frames with B-frames, so exact decoding needs real seeking.
    """
    from dit4dit.data.video import VideoEncoder

    if image_storage not in ("files", "parquet"):
        raise ValueError("image_storage must be 'files' or 'parquet'")
    root = Path(root)
    lengths = _lengths(episodes, length)
    h, w = size
    feats = _base_features(size, cameras, image_keys, state_dim, action_dim)
    for k in ("timestamp", "frame_index", "episode_index", "index", "task_index"):
        feats[k] = {"dtype": "float32" if k == "timestamp" else "int64", "shape": [1], "names": None}
    used_tasks = list(dict.fromkeys(episode_task(ep, tasks) for ep in range(episodes)))
    task_idx = {t: i for i, t in enumerate(used_tasks)}

    (root / "meta").mkdir(parents=True, exist_ok=True)
    ep_rows, stats_rows = [], []
    start = 0
    for ep, n in enumerate(lengths):
        chunk = ep // chunks_size
        arrays = episode_arrays(ep, n, size, cameras, image_keys, state_dim, action_dim)
        task = episode_task(ep, tasks)
        cols = {
            "observation.state": pa.array(arrays["observation.state"].tolist(), pa.list_(pa.float32())),
            "action": pa.array(arrays["action"].tolist(), pa.list_(pa.float32())),
            "timestamp": pa.array(np.arange(n, dtype=np.float32) / fps),
            "frame_index": pa.array(np.arange(n, dtype=np.int64)),
            "episode_index": pa.array(np.full(n, ep, dtype=np.int64)),
            "index": pa.array(start + np.arange(n, dtype=np.int64)),
            "task_index": pa.array(np.full(n, task_idx[task], dtype=np.int64)),
        }
        for key in image_keys:
            if image_storage == "parquet":
                cols[key] = pa.array(
                    [{"bytes": _png(img), "path": f"frame_{t:06d}.png"} for t, img in enumerate(arrays[key])],
                    pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
                )
            else:
                d = root / "images" / key / f"episode_{ep:06d}"
                d.mkdir(parents=True, exist_ok=True)
                for t, img in enumerate(arrays[key]):
                    (d / f"frame_{t:06d}.png").write_bytes(_png(img))
        dpath = root / f"data/chunk-{chunk:03d}/episode_{ep:06d}.parquet"
        dpath.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols), dpath)
        for key in cameras:
            vpath = root / f"videos/chunk-{chunk:03d}/{key}/episode_{ep:06d}.mp4"
            with VideoEncoder(vpath, fps, w, h, codec=codec, crf=18, gop=gop) as enc:
                enc.write(arrays[key])
        ep_rows.append({"episode_index": ep, "tasks": [task], "length": n})
        st = {}
        for key in ("observation.state", "action"):
            v = arrays[key].astype(np.float64)
            st[key] = {
                "min": v.min(0).tolist(),
                "max": v.max(0).tolist(),
                "mean": v.mean(0).tolist(),
                "std": v.std(0).tolist(),
                "count": [n],
            }
        stats_rows.append({"episode_index": ep, "stats": st})
        start += n

    def jsonl(path: Path, rows: list[dict]) -> None:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    jsonl(root / "meta/episodes.jsonl", ep_rows)
    jsonl(root / "meta/tasks.jsonl", [{"task_index": i, "task": t} for t, i in task_idx.items()])
    jsonl(root / "meta/episodes_stats.jsonl", stats_rows)
    for key in cameras:
        feats[key]["info"] = {
            "video.fps": float(fps),
            "video.height": h,
            "video.width": w,
            "video.channels": 3,
            "video.codec": "h264",
            "video.pix_fmt": "yuv420p",
            "video.is_depth_map": False,
            "has_audio": False,
        }
    info = {
        "codebase_version": "v2.1",
        "robot_type": robot_type,
        "total_episodes": episodes,
        "total_frames": start,
        "total_tasks": len(used_tasks),
        "total_videos": episodes * len(cameras),
        "total_chunks": (episodes - 1) // chunks_size + 1,
        "chunks_size": chunks_size,
        "fps": fps,
        "splits": {"train": f"0:{episodes}"},
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
        "features": feats,
    }
    (root / "meta/info.json").write_text(json.dumps(info, indent=4), encoding="utf-8")
    return root
