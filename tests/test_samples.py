"""Training samples, the shared processor and the loader.

Unit tests run on a small in-memory dataset with the reader's interface whose frames carry a
code (episode, frame, camera) in their pixel values; integration tests run the same checks on
real LeRobot folders (v3.0 and v2.1) built by ``tests/lerobot_fixtures.py``.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from dit4dit.config import InputConfig
from dit4dit.data.lerobot import Episode
from dit4dit.data.loader import batch_order, make_loader
from dit4dit.data.normalize import NormalizationError, Normalizer
from dit4dit.data.processor import Processor, ProcessorError
from dit4dit.data.samples import SampleIndex, TrainingSamples, collate
from dit4dit.data.schema import Camera, EmbodimentSchema, Part, get_schema

CAM0, CAM1 = "observation.images.image", "observation.images.wrist_image"


# ---------------------------------------------------------------------------------------------
# in-memory fake of the reader
# ---------------------------------------------------------------------------------------------


class FakeDataset:
    """Frame (ep, t) of camera c is a uniform image (R, G, B) = (ep * 20 + c, t, 100 + c)."""

    def __init__(self, lengths=(7, 3, 12), cameras=(CAM0,), size=(16, 20), state_dim=8, action_dim=7):
        self.cameras = list(cameras)
        self.size = size
        self.episodes, start = [], 0
        for i, n in enumerate(lengths):
            self.episodes.append(Episode(i, n, (f"task {i}",), start))
            start += n
        self.num_frames = start
        self.num_episodes = len(lengths)
        self.features = {
            "observation.state": {"dtype": "float32", "shape": [state_dim]},
            "action": {"dtype": "float32", "shape": [action_dim]},
            "timestamp": {"dtype": "float32", "shape": [1]},
            "episode_index": {"dtype": "int64", "shape": [1]},
        }
        for c in cameras:
            self.features[c] = {"dtype": "video", "shape": [size[0], size[1], 3], "names": ["height", "width", "channel"]}
        self.video_keys = list(cameras)
        self.image_keys = []
        self.frame_calls = 0
        rng = np.random.default_rng(0)
        self._cols = {"observation.state": [], "action": []}
        for e in self.episodes:
            t = np.arange(e.length, dtype=np.float32)[:, None]
            st = e.index * 1000 + t * 10 + np.arange(state_dim, dtype=np.float32)[None]
            ac = e.index * 1000 + t * 10 + np.arange(action_dim, dtype=np.float32)[None] + 0.5
            ac[:, -1] = rng.choice([-1.0, 1.0], size=e.length)  # binary gripper
            self._cols["observation.state"].append(st)
            self._cols["action"].append(ac)

    def episode_data(self, ep):
        e = self.episodes[ep]
        return {"observation.state": self._cols["observation.state"][ep], "action": self._cols["action"][ep],
                "timestamp": np.arange(e.length) / 10.0, "episode_index": np.full(e.length, ep)}

    def column(self, key):
        return np.concatenate([self.episode_data(e.index)[key] for e in self.episodes])

    def frames(self, key, ep, frame_indices):
        self.frame_calls += 1
        c = self.cameras.index(key)
        n = self.episodes[ep].length
        out = np.zeros((len(frame_indices), *self.size, 3), np.uint8)
        for j, t in enumerate(frame_indices):
            assert 0 <= t < n, f"frame {t} outside episode {ep}"
            out[j] = (ep * 20 + c, t, 100 + c)
        return out

    def task(self, ep, frame=None):
        return self.episodes[ep].tasks[0]


def decode_codes(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> (T, 3) integer codes of the (uniform) frames."""
    px = ((video + 1) * 127.5).round().to(torch.int64)
    assert (px == px[:, :, :1, :1]).all(), "frames are not uniform"
    return px[:, :, 0, 0].T.numpy()


def make_processor(ds, schema="libero_franka", inputs=None, horizon=4, mode="min_max", **kw):
    schema = get_schema(schema)
    inputs = inputs or InputConfig(cameras=("image",), camera_layout="single", image_size=(8, 8),
                                   num_cond_frames=2, num_future_frames=3, frame_stride=2)
    if len(ds.cameras) == 1 and len(schema.cameras) > 1:
        schema = replace(schema, cameras=schema.cameras[:1], layout="single")
    return Processor.for_dataset(ds, schema, inputs, action_horizon=horizon, mode=mode, progress=False, **kw)


# ---------------------------------------------------------------------------------------------
# frame plan
# ---------------------------------------------------------------------------------------------


def test_sample_index_plan():
    inp = InputConfig(num_cond_frames=3, num_future_frames=3, frame_stride=2)
    idx = SampleIndex([10, 4], inp, action_horizon=5)
    assert len(idx) == 14
    assert idx.locate(0) == (0, 0) and idx.locate(9) == (0, 9) and idx.locate(10) == (1, 0) and idx.locate(-1) == (1, 3)
    with pytest.raises(IndexError):
        idx.locate(14)
    p = idx.plan(10, 0)  # conditioning clamped at the start
    assert p.video == (0, 0, 0, 2, 4, 6) and p.future_mask == (True, True, True) and p.action_steps == 5
    p = idx.plan(10, 3)
    assert p.video == (0, 1, 3, 5, 7, 9) and p.future_mask == (True, True, True)
    p = idx.plan(10, 6)  # future past the end: last frame repeated, masked
    assert p.video == (2, 4, 6, 8, 9, 9) and p.future_mask == (True, False, False) and p.action_steps == 4
    p = idx.plan(10, 9)
    assert p.video == (5, 7, 9, 9, 9, 9) and p.future_mask == (False, False, False) and p.action_steps == 1
    p = idx.plan(1, 0)
    assert p.video == (0,) * 6 and p.action_steps == 1


# ---------------------------------------------------------------------------------------------
# samples on the fake
# ---------------------------------------------------------------------------------------------


def _check_sample(item, ds, proc, plan_idx, ep_len_of):
    ep, t = item["episode_index"], item["frame_index"]
    L = ep_len_of[ep]
    plan = plan_idx.plan(L, t)
    codes = decode_codes(item["video"])
    nc = proc.inputs.num_cond_frames
    # every frame belongs to this episode and is the planned one
    assert (codes[:, 0] == ep * 20).all(), codes
    assert codes[:, 1].tolist() == list(plan.video)
    s = proc.inputs.frame_stride
    for k in range(proc.inputs.num_future_frames):
        want = t + (k + 1) * s
        assert item["future_mask"][k].item() == (want < L)
        assert codes[nc + k, 1] == min(want, L - 1)
    for k in range(nc):
        assert codes[k, 1] == max(0, t - (nc - 1 - k) * s)
    # state at t
    raw_state = ds.episode_data(ep)["observation.state"][t]
    np.testing.assert_allclose(proc.normalizer.unnormalize("state", item["state"][:8].numpy()), raw_state, atol=1e-2)
    assert item["state_mask"][:8].all() and not item["state_mask"][8:].any()
    assert item["state"].shape == (64,) and not item["state"][8:].any()
    # actions t .. t+H-1, padded and masked past the end
    h = item["actions"].shape[0]
    n = min(h, L - t)
    raw = ds.episode_data(ep)["action"][t:t + n]
    back = proc.unnormalize_actions(item["actions"][:n])
    np.testing.assert_allclose(back, raw, atol=1e-2)
    assert item["action_mask"][:n, :7].all() and not item["action_mask"][:, 7:].any()
    assert not item["action_mask"][n:].any() and not item["actions"][n:].any()
    assert item["instruction"] == f"task {ep}"


def test_samples_boundaries_on_fake():
    ds = FakeDataset(lengths=(7, 3, 12))
    proc = make_processor(ds)
    samples = TrainingSamples(ds, "libero_franka", proc.inputs, 4, proc)
    assert len(samples) == 22
    lens = {e.index: e.length for e in ds.episodes}
    for i in range(len(samples)):
        item = samples[i]
        assert item["video"].shape == (3, 5, 8, 8) and item["video"].dtype == torch.float32
        assert item["actions"].shape == (4, 32) and item["action_mask"].shape == (4, 32)
        assert item["future_mask"].shape == (3,)
        assert (item["episode_index"], item["frame_index"]) == samples.locate(i)
        _check_sample(item, ds, proc, samples.index, lens)
    # the last frame of episode 0: nothing from episode 1 anywhere
    last = samples[6]
    assert (decode_codes(last["video"])[:, 0] == 0).all()
    assert last["action_mask"][:, 0].tolist() == [True, False, False, False]
    assert not last["future_mask"].any()


def test_samples_stride_one_and_episode_subset():
    ds = FakeDataset(lengths=(5, 9))
    inp = InputConfig(cameras=("image",), camera_layout="single", image_size=(8, 8), num_cond_frames=1,
                      num_future_frames=4, frame_stride=1)
    proc = make_processor(ds, inputs=inp, horizon=3)
    samples = TrainingSamples(ds, processor=proc, episodes=[1])
    assert len(samples) == 9 and samples.locate(0) == (1, 0)
    item = samples[6]
    assert decode_codes(item["video"])[:, 1].tolist() == [6, 7, 8, 8, 8]
    assert item["future_mask"].tolist() == [True, True, False, False]


def test_two_cameras_side_by_side_and_collate():
    ds = FakeDataset(lengths=(4, 4), cameras=(CAM0, CAM1), size=(12, 12))
    inp = InputConfig(cameras=("image", "wrist_image"), camera_layout="side_by_side", image_size=(8, 16),
                      num_cond_frames=1, num_future_frames=2, frame_stride=1)
    proc = make_processor(ds, inputs=inp, horizon=2)
    samples = TrainingSamples(ds, processor=proc, action_horizon=2)
    item = samples[5]
    v = ((item["video"] + 1) * 127.5).round()
    assert item["video"].shape == (3, 3, 8, 16)
    assert (v[0, :, :, :8] == 20).all() and (v[0, :, :, 8:] == 21).all()  # left: camera 0, right: camera 1
    assert (v[2, :, :, :8] == 100).all() and (v[2, :, :, 8:] == 101).all()
    batch = collate([samples[i] for i in range(3)])
    assert batch["video"].shape == (3, 3, 3, 8, 16)
    assert batch["instruction"] == ["task 0"] * 3
    assert batch["episode_index"].dtype == torch.long and batch["frame_index"].tolist() == [0, 1, 2]
    assert batch["action_mask"].dtype == torch.bool


def test_samples_reject_nan_and_mismatch():
    ds = FakeDataset(lengths=(4, 4))
    proc = make_processor(ds)
    ds._cols["action"][1][2, 0] = np.nan
    with pytest.raises(NormalizationError, match=r"episode 1, key 'action'"):
        TrainingSamples(ds, processor=proc, action_horizon=4)
    with pytest.raises(ProcessorError, match="action_horizon"):
        TrainingSamples(ds, processor=proc, action_horizon=5)
    with pytest.raises(ProcessorError, match="differs"):
        TrainingSamples(ds, "metaworld_sawyer", processor=proc)


# ---------------------------------------------------------------------------------------------
# processor
# ---------------------------------------------------------------------------------------------


def test_processor_images_flip_resize_range():
    schema = EmbodimentSchema("flip", state=(Part("s", 0, 2),), action=(Part("a", 0, 2),),
                              cameras=(Camera(CAM0, flip=True),))
    norm = Normalizer({"state": {"min": [0, 0], "max": [1, 1]}, "action": {"min": [0, 0], "max": [1, 1]}})
    img = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    proc = Processor(schema, norm, InputConfig(cameras=("image",), image_size=(4, 6), num_cond_frames=1))
    out = proc.images({CAM0: img})
    assert out.shape == (3, 1, 4, 6)
    back = ((out[:, 0] + 1) * 127.5).round().permute(1, 2, 0).numpy().astype(np.uint8)
    np.testing.assert_array_equal(back, img[::-1, ::-1])
    proc2 = Processor(schema, norm, InputConfig(cameras=("image",), image_size=(2, 3), num_cond_frames=1))
    small = proc2.images({"image": np.stack([img, img])})
    assert small.shape == (3, 2, 2, 3) and small.min() >= -1 and small.max() <= 1


def test_processor_grid_layout():
    cams = tuple(Camera(f"observation.images.c{i}") for i in range(3))
    schema = EmbodimentSchema("grid", state=(Part("s", 0, 2),), action=(Part("a", 0, 2),), cameras=cams,
                              layout="grid", grid=(2, 2))
    norm = Normalizer({"state": {"min": [0, 0], "max": [1, 1]}, "action": {"min": [0, 0], "max": [1, 1]}})
    proc = Processor(schema, norm, InputConfig(cameras=("c0", "c1", "c2"), camera_layout="side_by_side",
                                               image_size=(8, 8), num_cond_frames=1))
    out = proc.images({f"c{i}": np.full((5, 5, 3), 10 * (i + 1), np.uint8) for i in range(3)})
    v = ((out[0, 0] + 1) * 127.5).round()
    assert v[0, 0] == 10 and v[0, 7] == 20 and v[7, 0] == 30 and v[7, 7] == 0  # empty cell is black


def _obs(proc, size=(16, 20), state=None):
    return {"observation.images.image": np.full((*size, 3), 40, np.uint8),
            "observation.state": np.zeros(8, np.float32) if state is None else state,
            "prompt": "pick it up"}


def test_processor_observation_and_errors():
    ds = FakeDataset(lengths=(5, 5))
    inp = InputConfig(cameras=("image",), camera_layout="single", image_size=(8, 8), num_cond_frames=1,
                      num_future_frames=2)
    proc = make_processor(ds, inputs=inp)
    out = proc.observation(_obs(proc))
    assert out["video"].shape == (1, 3, 1, 8, 8) and out["state"].shape == (1, 64)
    assert out["state_mask"].shape == (1, 64) and out["state_mask"][0, :8].all() and not out["state_mask"][0, 8:].any()
    assert out["instruction"] == ["pick it up"]
    # openpi-style spellings
    alt = {"observation/image": np.full((16, 20, 3), 40, np.uint8), "observation/state": np.zeros(8),
           "instruction": b"pick it up"}
    torch.testing.assert_close(proc.observation(alt)["video"], out["video"])

    def err(obs, pattern):
        with pytest.raises(ProcessorError, match=pattern):
            proc.observation(obs)

    o = _obs(proc)
    del o["observation.images.image"]
    err(o, "lacks camera 'observation.images.image'")
    o = _obs(proc)
    o["observation.images.image"] = np.zeros((3, 16, 20), np.uint8)
    err(o, "channel-first")
    o = _obs(proc)
    o["observation.images.image"] = np.zeros((16, 20, 3), np.float32)
    err(o, "uint8")
    err(_obs(proc, size=(32, 32)), r"32x32 .* trained on 16x20")
    o = _obs(proc)
    o["observation.images.image"] = np.zeros((2, 16, 20, 3), np.uint8)
    err(o, "conditions on 1 frame")
    err(_obs(proc, state=np.array([0, 1, np.nan, 0, 0, 0, 0, 0])), "NaN")
    err(_obs(proc, state=np.zeros(5)), r"expected a 1-D vector of 8 values .*shape \[5\]")
    err(_obs(proc, state=np.zeros((2, 8))), "1-D")
    o = _obs(proc)
    del o["observation.state"]
    err(o, "state key 'observation.state'")
    o = _obs(proc)
    del o["prompt"]
    err(o, "instruction")
    err([1, 2], "must be a dict")
    # lenient size when asked for
    loose = Processor.from_dict({**proc.to_dict(), "strict_image_size": False})
    assert loose.observation(_obs(loose, size=(32, 32)))["video"].shape == (1, 3, 1, 8, 8)


def test_processor_camera_resolution_errors():
    ds = FakeDataset(lengths=(3,))
    with pytest.raises(ProcessorError, match="not a camera of schema"):
        make_processor(ds, inputs=InputConfig(cameras=("ego_view",), image_size=(8, 8)))
    ds2 = FakeDataset(lengths=(3,), cameras=(CAM0, CAM1))
    with pytest.raises(ProcessorError, match="single"):
        make_processor(ds2, inputs=InputConfig(cameras=("image", "wrist_image"), camera_layout="single",
                                               image_size=(8, 16)))
    with pytest.raises(ProcessorError, match="equal cells"):
        make_processor(ds2, inputs=InputConfig(cameras=("image", "wrist_image"), camera_layout="side_by_side",
                                               image_size=(8, 15)))


def test_processor_actions_and_unnormalize():
    ds = FakeDataset(lengths=(6, 6))
    proc = make_processor(ds)
    raw = ds.episode_data(1)["action"][:4]
    norm, mask = proc.actions(raw)
    assert norm.shape == (4, 32) and mask[:, :7].all() and not mask[:, 7:].any()
    np.testing.assert_array_equal(norm[:, 6].numpy(), raw[:, 6])  # gripper identity
    back = proc.unnormalize_actions(norm)
    np.testing.assert_allclose(back, raw, atol=1e-3)
    noisy = norm.clone()
    noisy[:, 6] = torch.tensor([0.3, -0.2, 0.9, -0.99])
    snapped = proc.unnormalize_actions(noisy[None])  # batch dim
    assert snapped.shape == (1, 4, 7) and snapped[0, :, 6].tolist() == [1, -1, 1, -1]
    with pytest.raises(ProcessorError, match=r"\(H, 7\)"):
        proc.actions(raw[:, :5])
    with pytest.raises(ProcessorError, match="NaN"):
        proc.actions(np.full((2, 7), np.nan))


@pytest.mark.parametrize("mode", ["min_max", "quantile"])
def test_processor_json_round_trip(mode, tmp_path):
    ds = FakeDataset(lengths=(6, 6))
    proc = make_processor(ds, mode=mode)
    path = proc.save(tmp_path / "ckpt")
    assert path.name == "processor.json"
    text = path.read_text()
    d = json.loads(text)  # plain JSON
    assert d["format"] == "dit4dit.processor" and d["camera_sizes"] == {CAM0: [16, 20]}
    back = Processor.load(tmp_path / "ckpt")
    assert back.to_dict() == proc.to_dict()
    obs = _obs(proc, state=np.arange(8, dtype=np.float32) * 3)
    obs["observation.images.image"] = np.stack([obs["observation.images.image"], ds.frames(CAM0, 0, [2])[0]])
    a, b = proc.observation(obs), back.observation(obs)
    torch.testing.assert_close(a["video"], b["video"])
    torch.testing.assert_close(a["state"], b["state"])
    y = torch.randn(2, 4, 32)
    np.testing.assert_array_equal(proc.unnormalize_actions(y), back.unnormalize_actions(y))
    assert back.protocol()["cameras"] == [CAM0] and back.protocol()["action_horizon"] == 4
    with pytest.raises(ProcessorError, match="no processor.json"):
        Processor.load(tmp_path)


def test_training_and_serving_agree():
    """The first conditioning frame of a training sample equals the served observation's video."""
    ds = FakeDataset(lengths=(6,))
    inp = InputConfig(cameras=("image",), camera_layout="single", image_size=(8, 8), num_cond_frames=1,
                      num_future_frames=2)
    proc = make_processor(ds, inputs=inp)
    samples = TrainingSamples(ds, processor=proc)
    item = samples[3]
    obs = {"image": ds.frames(CAM0, 0, [3])[0], "state": ds.episode_data(0)["observation.state"][3], "prompt": "x"}
    served = proc.observation(obs)
    torch.testing.assert_close(served["video"][0, :, 0], item["video"][:, 0])
    torch.testing.assert_close(served["state"][0], item["state"])


# ---------------------------------------------------------------------------------------------
# loader
# ---------------------------------------------------------------------------------------------


def _ids(batch):
    return list(zip(batch["episode_index"].tolist(), batch["frame_index"].tolist()))


def test_loader_determinism_and_resume():
    ds = FakeDataset(lengths=(7, 3, 12))
    proc = make_processor(ds)
    samples = TrainingSamples(ds, processor=proc)
    run = lambda seed: [_ids(b) for b in make_loader(samples, 4, num_workers=0, shuffle=True, seed=seed).batches(12)]
    a, b, c = run(1), run(1), run(2)
    assert a == b and a != c
    loader = make_loader(samples, 4, num_workers=0, shuffle=True, seed=1)
    assert len(loader) == 5  # 22 samples, drop_last
    # every epoch is a permutation (without the dropped tail), different across epochs
    ep0 = sum(a[:5], [])
    ep1 = sum(a[5:10], [])
    assert len(set(ep0)) == 20 and ep0 != ep1
    assert [samples.locate(i) for i in sum(batch_order(22, 4, 1, 0), [])] == ep0
    # resume after 7 batches (epoch 1, batch 2): the continuation is identical
    first = make_loader(samples, 4, num_workers=0, shuffle=True, seed=1)
    got = []
    for batch in first.batches(7):
        got.append(_ids(batch))
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batch_index"] == 2
    second = make_loader(samples, 4, num_workers=0, shuffle=True, seed=1)
    second.load_state_dict(json.loads(json.dumps(state)))
    rest = [_ids(b) for b in second.batches(5)]
    assert got + rest == a
    with pytest.raises(ValueError, match="seed"):
        make_loader(samples, 4, seed=3).load_state_dict(state)


def test_loader_workers_match_single_process():
    ds = FakeDataset(lengths=(7, 3, 12))
    proc = make_processor(ds)
    samples = TrainingSamples(ds, processor=proc)
    ref = [_ids(b) for b in make_loader(samples, 4, num_workers=0, seed=5).batches(8)]
    loader = make_loader(samples, 4, num_workers=2, seed=5)
    try:
        got = [_ids(b) for b in loader.batches(8)]  # crosses an epoch with persistent workers
        assert got == ref
        vids = [b["video"] for b in make_loader(samples, 4, num_workers=0, seed=5).batches(1)]
        torch.testing.assert_close(next(iter(loader))["video"].shape, vids[0].shape)
    finally:
        loader.close()


# ---------------------------------------------------------------------------------------------
# integration: real LeRobot folders (v3.0 written by the project's writer, v2.1 by hand)
# ---------------------------------------------------------------------------------------------

from lerobot_fixtures import action_row, camera_salt, make_v21_dataset, make_v30_dataset, read_code, state_row  # noqa: E402

from dit4dit.data.lerobot import LeRobotDataset  # noqa: E402
from dit4dit.data.schema import infer_schema  # noqa: E402

LENGTHS = (5, 9, 3)


@pytest.fixture(scope="module")
def v30_root(tmp_path_factory):
    return make_v30_dataset(tmp_path_factory.mktemp("v30") / "ds", episodes=3, length=LENGTHS, size=(48, 64),
                            state_dim=4, action_dim=4)


@pytest.fixture(scope="module")
def v21_root(tmp_path_factory):
    return make_v21_dataset(tmp_path_factory.mktemp("v21") / "ds", episodes=3, length=LENGTHS, size=(48, 64),
                            cameras=(CAM0, CAM1), state_dim=4, action_dim=4)


def _to_uint8(frame: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> uint8 (H, W, 3)."""
    return ((frame + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _fixture_processor(ds, cameras, layout, image_size, nc=2, nf=3, stride=2, horizon=4):
    schema = infer_schema(ds, name="fixture_bot", cameras=cameras)
    inp = InputConfig(cameras=tuple(c.rsplit(".", 1)[-1] for c in cameras), camera_layout=layout,
                      image_size=image_size, num_cond_frames=nc, num_future_frames=nf, frame_stride=stride)
    return Processor.for_dataset(ds, schema, inp, action_horizon=horizon, progress=False)


def _check_real_sample(item, proc, samples, cams):
    ep, t = item["episode_index"], item["frame_index"]
    L = LENGTHS[ep]
    plan = samples.index.plan(L, t)
    ncam = len(cams)
    w = proc.image_size[1] // ncam
    for k, f in enumerate(plan.video):
        img = _to_uint8(item["video"][:, k])
        for c in range(ncam):
            assert read_code(img[:, c * w:(c + 1) * w], salt=camera_salt(c)) == (ep, f), (ep, t, k, c)
    assert item["future_mask"].tolist() == list(plan.future_mask)
    st = proc.normalizer.unnormalize("state", item["state"][:4].numpy())
    np.testing.assert_allclose(st, state_row(ep, t, 4), atol=1e-3)
    n = plan.action_steps
    raw = proc.unnormalize_actions(item["actions"][:n])
    np.testing.assert_allclose(raw, np.stack([action_row(ep, t + j, 4) for j in range(n)]), atol=1e-3)
    assert item["action_mask"][:n, :4].all() and not item["action_mask"][n:].any()
    assert not item["action_mask"][:, 4:].any()


def test_samples_v30_frame_codes(v30_root):
    ds = LeRobotDataset(v30_root)
    proc = _fixture_processor(ds, [CAM0], "single", (32, 32))
    samples = TrainingSamples(ds, processor=proc)
    assert len(samples) == sum(LENGTHS)
    for i in range(len(samples)):
        item = samples[i]
        assert item["instruction"] == ds.task(item["episode_index"], item["frame_index"])
        _check_real_sample(item, proc, samples, [CAM0])


def test_samples_v21_two_cameras_side_by_side(v21_root):
    ds = LeRobotDataset(v21_root)
    proc = _fixture_processor(ds, [CAM0, CAM1], "side_by_side", (32, 64), nc=1, nf=2, stride=3, horizon=6)
    samples = TrainingSamples(ds, processor=proc)
    for i in list(range(0, len(samples), 2)) + [4, 13, 16]:
        _check_real_sample(samples[i], proc, samples, [CAM0, CAM1])


def test_loader_workers_on_real_dataset(v30_root):
    ds = LeRobotDataset(v30_root)
    proc = _fixture_processor(ds, [CAM0], "single", (32, 32))
    samples = TrainingSamples(ds, processor=proc)
    loader = make_loader(samples, 4, num_workers=2, seed=11)
    try:
        got = list(loader.batches(6))  # 4 batches an epoch: crosses into epoch 1
    finally:
        loader.close()
    ref = list(make_loader(samples, 4, num_workers=0, seed=11).batches(6))
    for a, b in zip(got, ref):
        assert _ids(a) == _ids(b)
        torch.testing.assert_close(a["video"], b["video"])
        torch.testing.assert_close(a["actions"], b["actions"])


# ---------------------------------------------------------------------------------------------
# CLI functions
# ---------------------------------------------------------------------------------------------


def test_commands_info_show_stats_bench(v21_root, tmp_path):
    from dit4dit.bench.data import bench_data
    from dit4dit.data.inspect import compute_stats, dataset_info, dataset_show

    info = dataset_info(v21_root)
    json.dumps(info)
    assert (info["version"], info["episodes"], info["frames"], info["fps"]) == ("v2.1", 3, 17, 10.0)
    assert info["features"]["observation.state"]["shape"] == [4]
    assert info["video_keys"] == [CAM0, CAM1] and len(info["tasks"]) == 3

    shown = dataset_show(v21_root, episode=1, frame=4, out_png=tmp_path / "f.png")
    json.dumps(shown)
    from PIL import Image

    png = np.asarray(Image.open(tmp_path / "f.png"))
    assert png.shape == (48, 128, 3)
    assert read_code(png[:, :64], camera_salt(0)) == (1, 4) and read_code(png[:, 64:], camera_salt(1)) == (1, 4)
    np.testing.assert_allclose(shown["state"], state_row(1, 4, 4))
    np.testing.assert_allclose(shown["action"], action_row(1, 4, 4))

    stats = compute_stats(v21_root, None, tmp_path / "stats.json", progress=False)
    allstate = np.stack([state_row(e, t, 4) for e, n in enumerate(LENGTHS) for t in range(n)]).astype(np.float64)
    np.testing.assert_allclose(stats["keys"]["observation.state"]["mean"], allstate.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["keys"]["observation.state"]["q99"], np.quantile(allstate, 0.99, axis=0), rtol=1e-6)
    assert json.loads((tmp_path / "stats.json").read_text())["num_frames"] == 17

    from dit4dit.data.schema import SCHEMAS, register_schema

    register_schema(infer_schema(LeRobotDataset(v21_root), name="fixture_bot_test"), overwrite=True)
    try:
        bench = bench_data(v21_root, "fixture_bot_test", image_size=32, batch_size=2, num_workers=0,
                           num_batches=2, num_future_frames=2, action_horizon=4, progress=False)
    finally:
        SCHEMAS.pop("fixture_bot_test")
    json.dumps(bench)
    assert bench["samples_per_s"] > 0 and bench["image_size"] == [32, 64] and bench["machine"]["cpu_count"] >= 1


def test_fork_safe_iter_unfreezes_the_collector(v30_root):
    """Workers fork with the collector frozen (inherited FFmpeg decoders must never be freed in a
    worker); the parent is unfrozen again afterwards."""
    import gc

    from dit4dit.data.loader import fork_safe_iter

    ds = LeRobotDataset(v30_root)
    proc = _fixture_processor(ds, [CAM0], "single", (32, 32))
    loader = make_loader(TrainingSamples(ds, processor=proc), 4, num_workers=1, seed=3)
    try:
        it = fork_safe_iter(loader.loader)
        assert gc.get_freeze_count() == 0
        assert next(it)["video"].shape[0] == 4
    finally:
        loader.close()
