"""LeRobot dataset I/O: exact frame decoding (v3.0 and v2.1), metadata, validation, atomic writer."""

from __future__ import annotations

import json
import multiprocessing as mp
import pickle
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from lerobot_fixtures import (  # noqa: E402
    DEFAULT_CAMERA,
    DEFAULT_TASKS,
    action_row,
    camera_salt,
    code_image,
    episode_arrays,
    make_v21_dataset,
    make_v30_dataset,
    read_code,
    state_row,
)

from dit4dit.data.lerobot import DatasetError, Episode, LeRobotDataset  # noqa: E402
from dit4dit.data.video import VideoEncoder, VideoReader, resolve_encoder  # noqa: E402
from dit4dit.data.writer import LeRobotWriter  # noqa: E402

WRIST = "observation.images.wrist"
PNG_KEY = "observation.images.png"
V3_LENGTHS = [20, 13, 25, 7, 30, 18]
V21_LENGTHS = [20, 15, 22]


# ----------------------------------------------------------------------------------------------
# fixtures (built once per module; tests that damage a dataset work on a copy)


def _two_videos_and_png(make, folder: Path, lengths: list[int], **kw) -> Path:
    """``make`` a dataset in ``folder`` of episodes of ``lengths`` frames with two video cameras (main,
    wrist) and one image key stored as PNG."""
    return make(folder / "ds", episodes=len(lengths), length=lengths, cameras=(DEFAULT_CAMERA, WRIST),
                image_keys=(PNG_KEY,), **kw)


@pytest.fixture(scope="module")
def v30(tmp_path_factory) -> Path:
    # tiny size limits: several data files and several multi-episode video files per camera
    return _two_videos_and_png(make_v30_dataset, tmp_path_factory.mktemp("v30"), V3_LENGTHS,
                               video_files_size_mb=0.003, data_files_size_mb=0.001)


@pytest.fixture(scope="module")
def v21(tmp_path_factory) -> Path:
    return _two_videos_and_png(make_v21_dataset, tmp_path_factory.mktemp("v21"), V21_LENGTHS,
                               image_storage="files", gop=6,
                               chunks_size=2)  # episodes spread over chunk-000 and chunk-001


@pytest.fixture(scope="module")
def v21_parquet_images(tmp_path_factory) -> Path:
    return make_v21_dataset(
        tmp_path_factory.mktemp("v21p") / "ds",
        episodes=2,
        length=[9, 11],
        size=(32, 32),
        cameras=(),
        image_keys=(PNG_KEY,),
        image_storage="parquet",
    )


def copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def check_all_codes_random(ds: LeRobotDataset, keys: list[str], seed: int = 0) -> int:
    """Every (episode, frame) of every key, in random order, one request each; returns count."""
    pairs = [(k, c, e.index, f) for c, k in enumerate(keys) for e in ds.episodes for f in range(e.length)]
    random.Random(seed).shuffle(pairs)
    for key, c, ep, f in pairs:
        img = ds.frames(key, ep, [f])
        assert img.dtype == np.uint8 and img.shape == (1, *ds.features[key]["shape"])
        assert read_code(img[0], camera_salt(c)) == (ep, f), (key, ep, f)
    return len(pairs)


# ----------------------------------------------------------------------------------------------
# exact decoding


def test_v30_random_access_exact_across_episodes_and_files(v30):
    ds = LeRobotDataset(v30)
    assert ds.version == "v3.0"
    # the fixture really exercises multi-episode video files and several files per camera
    meta = pq.read_table(v30 / "meta/episodes/chunk-000/file-000.parquet").to_pydict()
    files = meta[f"videos/{DEFAULT_CAMERA}/file_index"]
    assert len(set(files)) >= 2 and len(files) > len(set(files))
    assert any(t > 0 for t in meta[f"videos/{DEFAULT_CAMERA}/from_timestamp"])
    assert len(set(meta["data/file_index"])) >= 2
    n = check_all_codes_random(ds, [DEFAULT_CAMERA, WRIST, PNG_KEY])
    assert n == 3 * sum(V3_LENGTHS)
    ds.close()


def test_v30_multi_frame_requests_any_order_with_duplicates(v30):
    ds = LeRobotDataset(v30)
    rng = random.Random(1)
    for _ in range(25):
        ep = rng.randrange(len(V3_LENGTHS))
        idx = [rng.randrange(V3_LENGTHS[ep]) for _ in range(rng.randint(1, 6))]
        idx += idx[:1]  # a duplicate
        out = ds.frames(DEFAULT_CAMERA, ep, idx)
        assert out.shape == (len(idx), 48, 64, 3)
        assert [read_code(im) for im in out] == [(ep, f) for f in idx]
    # whole episodes front to back (sequential path) and empty request
    for ep in (4, 0):
        out = ds.frames(WRIST, ep, list(range(V3_LENGTHS[ep])))
        assert [read_code(im, camera_salt(1)) for im in out] == [(ep, f) for f in range(V3_LENGTHS[ep])]
    assert ds.frames(DEFAULT_CAMERA, 0, []).shape[0] == 0


def test_v21_random_access_exact_videos_and_png_files(v21):
    ds = LeRobotDataset(v21)
    assert ds.version == "v2.1"
    assert (v21 / "data/chunk-001/episode_000002.parquet").is_file()
    assert (v21 / f"images/{PNG_KEY}/episode_000001/frame_000003.png").is_file()
    check_all_codes_random(ds, [DEFAULT_CAMERA, WRIST, PNG_KEY], seed=3)
    out = ds.frames(PNG_KEY, 2, [21, 0, 21])
    assert [read_code(im, camera_salt(2)) for im in out] == [(2, 21), (2, 0), (2, 21)]


def test_v21_images_inside_parquet(v21_parquet_images):
    ds = LeRobotDataset(v21_parquet_images)
    assert ds.image_keys == [PNG_KEY] and ds.video_keys == []
    check_all_codes_random(ds, [PNG_KEY])  # camera index 0 in this dataset
    assert PNG_KEY not in ds.episode_data(0)


def test_video_reader_seeks_with_b_frames_and_long_gop(tmp_path):
    """Raw reader on a file with B-frames and sparse keyframes: every frame, any order."""
    path = tmp_path / "v.mp4"
    frames = np.stack([code_image(0, i, (32, 32)) for i in range(90)])
    with VideoEncoder(path, 15, 32, 32, gop=25, options={"bf": "3"}) as enc:
        enc.write(frames)
    r = VideoReader(path)
    assert r.num_frames == 90
    order = list(range(90))
    random.Random(0).shuffle(order)
    for i in order:
        assert read_code(r.read([i / 15])[0]) == (0, i)
    with pytest.raises(DatasetError, match="too short"):
        r.read([90 / 15])
    with pytest.raises(DatasetError, match="no frame within"):
        r.read([10.5 / 15])  # between two frames: never substitute a neighbour
    r.close()


# ----------------------------------------------------------------------------------------------
# metadata and numeric data


@pytest.mark.parametrize("which", ["v30", "v21"])
def test_metadata_and_columns(which, request):
    root = request.getfixturevalue(which)
    lengths = V3_LENGTHS if which == "v30" else V21_LENGTHS
    ds = LeRobotDataset(root)
    assert ds.root == Path(root)
    assert ds.fps == 10.0 and ds.robot_type == "fixture_bot"
    assert ds.video_keys == [DEFAULT_CAMERA, WRIST] and ds.image_keys == [PNG_KEY]
    assert ds.features["observation.state"]["shape"] == [4]
    assert ds.num_episodes == len(lengths) and ds.num_frames == sum(lengths)
    assert [e.length for e in ds.episodes] == lengths
    assert [e.index for e in ds.episodes] == list(range(len(lengths)))
    assert all(isinstance(e, Episode) for e in ds.episodes)
    assert [e.data_start for e in ds.episodes] == list(np.cumsum([0] + lengths[:-1]))
    assert set(ds.tasks) == {DEFAULT_TASKS[i % 3] for i in range(len(lengths))}
    for e in ds.episodes:
        want = DEFAULT_TASKS[e.index % 3]
        assert e.tasks == (want,)
        assert ds.task(e.index) == want and ds.task(e.index, e.length - 1) == want

    state, action = ds.column("observation.state"), ds.column("action")
    assert state.shape == (sum(lengths), 4) and action.shape == (sum(lengths), 4)
    assert np.issubdtype(state.dtype, np.floating)
    for e in ds.episodes:
        d = ds.episode_data(e.index)
        assert {"observation.state", "action", "timestamp", "frame_index", "episode_index", "index",
                "task_index"} <= set(d)
        assert not set(d) & {DEFAULT_CAMERA, WRIST, PNG_KEY}
        want_s = np.stack([state_row(e.index, t, 4) for t in range(e.length)])
        want_a = np.stack([action_row(e.index, t, 4) for t in range(e.length)])
        np.testing.assert_allclose(d["observation.state"], want_s)
        np.testing.assert_allclose(d["action"], want_a)
        np.testing.assert_array_equal(d["frame_index"], np.arange(e.length))
        np.testing.assert_allclose(d["timestamp"], np.arange(e.length) / 10.0, atol=1e-6)
        np.testing.assert_allclose(state[e.data_start : e.data_start + e.length], want_s)
        np.testing.assert_allclose(action[e.data_start : e.data_start + e.length], want_a)
        assert ds.episode_data(e.index) is not d  # cached arrays, fresh dict
        assert ds.episode_data(e.index)["action"] is d["action"]
    assert not d["action"].flags.writeable  # cached arrays are protected
    np.testing.assert_array_equal(ds.column("index"), np.arange(sum(lengths)))

    with pytest.raises(KeyError):
        ds.frames("observation.state", 0, [0])
    with pytest.raises(IndexError):
        ds.frames(DEFAULT_CAMERA, 0, [lengths[0]])
    with pytest.raises(IndexError):
        ds.episode_data(len(lengths))


def test_pickle_fork_and_threads(v30):
    ds = LeRobotDataset(v30)
    assert read_code(ds.frames(DEFAULT_CAMERA, 3, [2])[0]) == (3, 2)  # decoders open in the parent
    clone = pickle.loads(pickle.dumps(ds))
    assert read_code(clone.frames(DEFAULT_CAMERA, 4, [7])[0]) == (4, 7)

    if "fork" in mp.get_all_start_methods():
        ctx = mp.get_context("fork")
        with ctx.Pool(2) as pool:
            got = pool.map(_read_in_child, [(ds, ep, f) for ep, f in [(0, 3), (5, 17), (2, 24), (3, 6)]])
        assert got == [(0, 3), (5, 17), (2, 24), (3, 6)]

    jobs = [(e.index, f) for e in ds.episodes for f in range(0, e.length, 2)]
    random.Random(5).shuffle(jobs)
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda j: read_code(ds.frames(DEFAULT_CAMERA, j[0], [j[1]])[0]), jobs))
    assert got == jobs


def _read_in_child(args):
    ds, ep, f = args
    return read_code(ds.frames(DEFAULT_CAMERA, ep, [f])[0])


# ----------------------------------------------------------------------------------------------
# validation: every bad input is a DatasetError naming file / episode / key


def _rewrite_parquet(path: Path, fn) -> None:
    t = pq.read_table(path)
    pq.write_table(fn(t), path)


def _with_nan(t: pa.Table, key: str, episode: int, frame: int) -> pa.Table:
    vals = np.stack(t.column(key).to_pylist()).astype(np.float32)
    rows = np.flatnonzero(
        (np.asarray(t.column("episode_index")) == episode) & (np.asarray(t.column("frame_index")) == frame)
    )
    vals[rows[0], 1] = np.nan
    i = t.column_names.index(key)
    arr = pa.FixedSizeListArray.from_arrays(pa.array(vals.reshape(-1)), vals.shape[1])
    return t.set_column(i, key, arr)


def test_missing_meta_files(v30, v21, tmp_path):
    with pytest.raises(DatasetError, match="info.json"):
        LeRobotDataset(tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        LeRobotDataset(tmp_path / "nope")

    a = copy(v30, tmp_path / "a")
    (a / "meta/tasks.parquet").unlink()
    with pytest.raises(DatasetError, match="tasks.parquet"):
        LeRobotDataset(a)
    b = copy(v30, tmp_path / "b")
    shutil.rmtree(b / "meta/episodes")
    with pytest.raises(DatasetError, match="episodes"):
        LeRobotDataset(b)
    c = copy(v21, tmp_path / "c")
    (c / "meta/episodes.jsonl").unlink()
    with pytest.raises(DatasetError, match="episodes.jsonl"):
        LeRobotDataset(c)
    d = copy(v21, tmp_path / "d")
    (d / "meta/tasks.jsonl").unlink()
    with pytest.raises(DatasetError, match="tasks.jsonl"):
        LeRobotDataset(d)
    e = copy(v21, tmp_path / "e")
    info = json.loads((e / "meta/info.json").read_text())
    info["codebase_version"] = "v1.6"
    (e / "meta/info.json").write_text(json.dumps(info))
    with pytest.raises(DatasetError, match="codebase_version"):
        LeRobotDataset(e)


def test_missing_data_and_video_files(v30, v21, tmp_path):
    a = copy(v21, tmp_path / "a")
    (a / "data/chunk-000/episode_000001.parquet").unlink()
    with pytest.raises(DatasetError, match=r"episode_000001\.parquet.*episode 1"):
        LeRobotDataset(a)
    b = copy(v21, tmp_path / "b")
    (b / f"videos/chunk-001/{WRIST}/episode_000002.mp4").unlink()
    with pytest.raises(DatasetError, match=rf"episode_000002\.mp4.*episode 2, key '{WRIST}'"):
        LeRobotDataset(b)
    c = copy(v30, tmp_path / "c")
    (c / f"videos/{WRIST}/chunk-000/file-001.mp4").unlink()
    with pytest.raises(DatasetError, match=rf"file-001\.mp4.*key '{WRIST}'"):
        LeRobotDataset(c)
    d = copy(v21, tmp_path / "d")
    shutil.rmtree(d / f"images/{PNG_KEY}/episode_000001")
    with pytest.raises(DatasetError, match=rf"episode_000001\.parquet.*episode 1.*'{PNG_KEY}'"):
        LeRobotDataset(d)


def test_parquet_without_declared_key(v30, v21, tmp_path):
    a = copy(v21, tmp_path / "a")
    _rewrite_parquet(a / "data/chunk-000/episode_000001.parquet", lambda t: t.drop_columns(["observation.state"]))
    with pytest.raises(DatasetError, match=r"episode_000001\.parquet.*episode 1.*'observation\.state'"):
        LeRobotDataset(a)
    b = copy(v30, tmp_path / "b")
    _rewrite_parquet(b / "data/chunk-000/file-001.parquet", lambda t: t.drop_columns(["action"]))
    with pytest.raises(DatasetError, match=r"file-001\.parquet.*episode.*'action'"):
        LeRobotDataset(b)


def test_video_shorter_than_timestamps(v30, v21, tmp_path):
    # v2.1: episode 1's wrist video loses its last 4 frames
    a = copy(v21, tmp_path / "a")
    vpath = a / f"videos/chunk-000/{WRIST}/episode_000001.mp4"
    n = V21_LENGTHS[1]
    frames = np.stack([code_image(1, t, (48, 64), camera_salt(1)) for t in range(n - 4)])
    with VideoEncoder(vpath, 10, 64, 48) as enc:
        enc.write(frames)
    with pytest.raises(DatasetError, match=rf"episode_000001\.mp4.*episode 1, key '{WRIST}'.*too short"):
        LeRobotDataset(a)
    # without the header check on open, decoding finds it exactly -- and never substitutes a frame
    ds = LeRobotDataset(a, check_videos=False)
    assert read_code(ds.frames(WRIST, 1, [n - 5])[0], camera_salt(1)) == (1, n - 5)
    with pytest.raises(DatasetError, match=rf"episode_000001\.mp4.*too short.*episode 1, key '{WRIST}'"):
        ds.frames(WRIST, 1, [n - 3])

    # v3.0: the last episode of a multi-episode file is cut short
    b = copy(v30, tmp_path / "b")
    meta = pq.read_table(b / "meta/episodes/chunk-000/file-000.parquet").to_pydict()
    key = DEFAULT_CAMERA
    last_file = max(meta[f"videos/{key}/file_index"])
    eps = [i for i, f in enumerate(meta[f"videos/{key}/file_index"]) if f == last_file]
    vpath = b / f"videos/{key}/chunk-000/file-{last_file:03d}.mp4"
    frames = [code_image(e, t) for e in eps for t in range(V3_LENGTHS[e])][:-3]
    with VideoEncoder(vpath, 10, 64, 48) as enc:
        enc.write(np.stack(frames))
    with pytest.raises(DatasetError, match=rf"file-{last_file:03d}\.mp4.*episode {eps[-1]}, key '{key}'"):
        LeRobotDataset(b)


def test_nan_in_action_and_state(v30, v21, tmp_path):
    a = copy(v21, tmp_path / "a")
    p = a / "data/chunk-000/episode_000001.parquet"
    t = pq.read_table(p)
    vals = np.stack(t.column("action").to_pylist()).astype(np.float32)
    vals[3, 2] = np.inf
    t = t.set_column(t.column_names.index("action"), "action", pa.array(vals.tolist(), pa.list_(pa.float32())))
    pq.write_table(t, p)
    with pytest.raises(DatasetError, match=r"episode_000001\.parquet.*episode 1, key 'action'.*frame 3"):
        LeRobotDataset(a)

    b = copy(v30, tmp_path / "b")
    meta = pq.read_table(b / "meta/episodes/chunk-000/file-000.parquet").to_pydict()
    f = meta["data/file_index"][4]
    _rewrite_parquet(b / f"data/chunk-000/file-{f:03d}.parquet", lambda t: _with_nan(t, "observation.state", 4, 11))
    with pytest.raises(DatasetError, match=rf"file-{f:03d}\.parquet.*episode 4, key 'observation\.state'.*frame 11"):
        LeRobotDataset(b)


def test_inconsistent_lengths_and_task_indices(v30, v21, tmp_path):
    a = copy(v21, tmp_path / "a")
    rows = [json.loads(x) for x in (a / "meta/episodes.jsonl").read_text().splitlines()]
    rows[2]["length"] += 1
    (a / "meta/episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DatasetError, match=r"episode_000002\.parquet.*episode 2.*rows"):
        LeRobotDataset(a)

    b = copy(v30, tmp_path / "b")
    pq.write_table(pa.table({"task_index": [0], "task": ["only one"]}), b / "meta/tasks.parquet")
    with pytest.raises(DatasetError, match=r"episode 1, key 'task_index'"):
        LeRobotDataset(b)


# ----------------------------------------------------------------------------------------------
# writer


def _features(size=(32, 32), with_video=True):
    h, w = size
    f = {
        "observation.state": {"dtype": "float32", "shape": [3], "names": ["x", "y", "z"]},
        "action": {"dtype": "float32", "shape": [2], "names": ["a", "b"]},
        "reward": {"dtype": "float32", "shape": [1], "names": None},
    }
    if with_video:
        f["observation.images.image"] = {"dtype": "video", "shape": [h, w, 3], "names": ["height", "width", "channels"]}
    return f


def _episode(ep, T, size=(32, 32)):
    rng = np.random.default_rng(ep)
    return {
        "observation.state": rng.normal(size=(T, 3)).astype(np.float32),
        "action": rng.uniform(-1, 1, size=(T, 2)).astype(np.float32),
        "reward": rng.uniform(size=T).astype(np.float32),
        "observation.images.image": np.stack([code_image(ep, t, size) for t in range(T)]),
    }


def test_writer_layout_info_stats_and_tasks(tmp_path):
    root = tmp_path / "ds"
    eps = [_episode(e, T) for e, T in enumerate([12, 9, 15])]
    with LeRobotWriter(root, fps=15, features=_features(), robot_type="arm") as w:
        for e, d in enumerate(eps):
            assert w.add_episode(d, "stack" if e != 1 else "unstack") == e
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 15 and info["robot_type"] == "arm"
    assert info["total_episodes"] == 3 and info["total_frames"] == 36 and info["total_tasks"] == 2
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    assert set(info["features"]) >= {"timestamp", "frame_index", "episode_index", "index", "task_index"}
    vinfo = info["features"]["observation.images.image"]["info"]
    assert vinfo["video.codec"] == ("h264" if resolve_encoder("h264") == "libx264" else vinfo["video.codec"])
    assert vinfo["video.pix_fmt"] in ("yuv420p", "yuv444p") and vinfo["video.height"] == 32

    tasks = pq.read_table(root / "meta/tasks.parquet")
    assert tasks.column("task").to_pylist() == ["stack", "unstack"]
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["task"]
    for p in ["data/chunk-000/file-000.parquet", "meta/episodes/chunk-000/file-000.parquet",
              "meta/stats.json", "videos/observation.images.image/chunk-000/file-000.mp4"]:
        assert (root / p).is_file(), p

    stats = json.loads((root / "meta/stats.json").read_text())
    act = np.concatenate([d["action"] for d in eps]).astype(np.float64)
    s = stats["action"]
    np.testing.assert_allclose(s["mean"], act.mean(0), rtol=1e-6)
    np.testing.assert_allclose(s["std"], act.std(0), rtol=1e-6)
    np.testing.assert_allclose(s["min"], act.min(0))
    np.testing.assert_allclose(s["max"], act.max(0))
    np.testing.assert_allclose(s["q01"], np.quantile(act, 0.01, axis=0), rtol=1e-6)
    np.testing.assert_allclose(s["q99"], np.quantile(act, 0.99, axis=0), rtol=1e-6)
    assert s["count"] == [36]
    assert np.asarray(stats["reward"]["mean"]).shape == (1,)
    img = stats["observation.images.image"]
    assert np.asarray(img["mean"]).shape == (3, 1, 1)
    pix = np.concatenate([d["observation.images.image"] for d in eps]).reshape(-1, 3) / 255.0
    np.testing.assert_allclose(np.asarray(img["mean"]).ravel(), pix.mean(0), atol=1e-9)
    assert 0.0 <= np.min(img["q01"]) <= np.max(img["q99"]) <= 1.0

    ds = LeRobotDataset(root)
    assert ds.task(1) == "unstack" and ds.tasks == ["stack", "unstack"]
    np.testing.assert_array_equal(ds.column("action"), np.concatenate([d["action"] for d in eps]))
    np.testing.assert_array_equal(ds.episode_data(2)["reward"], eps[2]["reward"])
    for e, d in enumerate(eps):
        got = ds.frames("observation.images.image", e, list(range(len(d["action"]))))
        assert [read_code(x) for x in got] == [(e, t) for t in range(len(d["action"]))]
        assert np.abs(got.astype(int) - d["observation.images.image"]).mean() < 8  # close to the originals


def test_writer_codec_fallback_records_codec(tmp_path):
    assert resolve_encoder("no-such-codec") in {"libx264", "libopenh264", "libsvtav1", "libaom-av1",
                                                "libvpx-vp9", "libx265", "mpeg4"}
    root = tmp_path / "ds"
    with pytest.warns(RuntimeWarning, match="unavailable"):
        w = LeRobotWriter(root, fps=10, features=_features(), video_codec="no-such-codec")
        w.add_episode(_episode(0, 10), "t")
    w.finalize()
    codec = json.loads((root / "meta/info.json").read_text())["features"]["observation.images.image"]["info"]["video.codec"]
    assert codec and codec != "no-such-codec"
    ds = LeRobotDataset(root)
    assert [read_code(x) for x in ds.frames("observation.images.image", 0, [9, 0, 4])] == [(0, 9), (0, 0), (0, 4)]

    root2 = tmp_path / "mpeg4"
    with LeRobotWriter(root2, fps=10, features=_features(), video_codec="mpeg4") as w:
        w.add_episode(_episode(0, 10), "t")
    assert json.loads((root2 / "meta/info.json").read_text())["features"]["observation.images.image"]["info"][
        "video.codec"] == "mpeg4"
    ds = LeRobotDataset(root2)
    assert [read_code(x) for x in ds.frames("observation.images.image", 0, [7, 1])] == [(0, 7), (0, 1)]


def test_writer_rejects_bad_episodes(tmp_path):
    w = LeRobotWriter(tmp_path / "ds", fps=10, features=_features())
    good = _episode(0, 5)
    with pytest.raises(ValueError, match="differ in length"):
        w.add_episode({**good, "reward": good["reward"][:4]}, "t")
    with pytest.raises(ValueError, match="missing keys"):
        w.add_episode({k: v for k, v in good.items() if k != "action"}, "t")
    bad = {**good, "action": good["action"].copy()}
    bad["action"][2, 1] = np.nan
    with pytest.raises(ValueError, match=r"'action'.*frame 2"):
        w.add_episode(bad, "t")
    with pytest.raises(ValueError, match="uint8"):
        w.add_episode({**good, "observation.images.image": good["observation.images.image"].astype(np.float32)}, "t")
    assert w.add_episode(good, "t") == 0  # the writer is still usable
    w.finalize()
    assert LeRobotDataset(tmp_path / "ds").num_episodes == 1


def _siblings(root: Path) -> list[str]:
    return sorted(p.name for p in root.parent.iterdir() if p.name != root.name)


def test_writer_atomic_on_exception(tmp_path):
    root = tmp_path / "ds"
    before = _siblings(root)
    with pytest.raises(RuntimeError, match="boom"):
        with LeRobotWriter(root, fps=10, features=_features()) as w:
            w.add_episode(_episode(0, 8), "t")
            w.add_episode(_episode(1, 8), "t")
            assert not root.exists()  # nothing at root while writing
            raise RuntimeError("boom")
    assert not root.exists()
    assert _siblings(root) == before  # temporary folder removed too
    with pytest.raises(DatasetError):
        LeRobotDataset(root)


def test_writer_atomic_when_killed(tmp_path):
    root = tmp_path / "ds"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_lerobot_io import _episode, _features
        from dit4dit.data.writer import LeRobotWriter
        w = LeRobotWriter({str(root)!r}, fps=10, features=_features())
        w.add_episode(_episode(0, 8), "t")
        w.add_episode(_episode(1, 8), "t")
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not root.exists()  # a half-written dataset never appears at root
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".ds.writing-")]
    assert leftovers and not (leftovers[0] / "meta/info.json").exists()  # and never looks complete


def test_writer_finished_dataset_survives_and_overwrite(tmp_path):
    root = tmp_path / "ds"
    with LeRobotWriter(root, fps=10, features=_features()) as w:
        w.add_episode(_episode(0, 6), "first")
    assert LeRobotDataset(root).num_frames == 6

    with pytest.raises(FileExistsError):
        LeRobotWriter(root, fps=10, features=_features())
    # a failed overwrite leaves the old dataset intact
    with pytest.raises(RuntimeError):
        with LeRobotWriter(root, fps=10, features=_features(), overwrite=True) as w:
            w.add_episode(_episode(0, 4), "second")
            raise RuntimeError("crash")
    ds = LeRobotDataset(root)
    assert ds.num_frames == 6 and ds.tasks == ["first"]
    # a successful overwrite replaces it
    with LeRobotWriter(root, fps=10, features=_features(), overwrite=True) as w:
        w.add_episode(_episode(0, 4), "second")
    ds = LeRobotDataset(root)
    assert ds.num_frames == 4 and ds.tasks == ["second"]
    assert _siblings(root) == []
    # an existing empty folder is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    with LeRobotWriter(empty, fps=10, features=_features(with_video=False)) as w:
        w.add_episode({k: v for k, v in _episode(0, 3).items() if "images" not in k}, "t")
    assert LeRobotDataset(empty).video_keys == []


def test_fixture_episode_arrays_match_codes():
    d = episode_arrays(2, 5, (32, 32), [DEFAULT_CAMERA], [], 3, 2)
    assert d["observation.state"].shape == (5, 3) and d["action"].shape == (5, 2)
    assert [read_code(x) for x in d[DEFAULT_CAMERA]] == [(2, t) for t in range(5)]
