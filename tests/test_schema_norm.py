"""Embodiment schemas, streaming statistics and the normaliser."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dit4dit.data.lerobot import Episode
from dit4dit.data.normalize import NormalizationError, Normalizer, StreamingStats, compute_dataset_stats
from dit4dit.data.schema import (
    SCHEMAS,
    Camera,
    EmbodimentSchema,
    Part,
    SchemaError,
    get_schema,
    infer_schema,
    register_schema,
)


# ---------------------------------------------------------------------------------------------
# a tiny in-memory dataset with the reader's interface (numeric part only)
# ---------------------------------------------------------------------------------------------


class _NumericDataset:
    def __init__(self, arrays_per_episode, cameras=("observation.images.image",), size=(8, 8)):
        self.episodes, self._data, start = [], [], 0
        for i, d in enumerate(arrays_per_episode):
            n = len(next(iter(d.values())))
            self.episodes.append(Episode(i, n, ("task",), start))
            self._data.append(d)
            start += n
        self.features = {}
        for k, v in arrays_per_episode[0].items():
            self.features[k] = {"dtype": "float32", "shape": list(np.asarray(v).shape[1:]) or [1]}
        for c in cameras:
            self.features[c] = {"dtype": "video", "shape": [size[0], size[1], 3], "names": ["height", "width", "channel"]}
        self.features["timestamp"] = {"dtype": "float32", "shape": [1]}
        self.features["frame_index"] = {"dtype": "int64", "shape": [1]}

    def episode_data(self, ep):
        d = dict(self._data[ep])
        n = self.episodes[ep].length
        d["timestamp"] = np.arange(n, dtype=np.float32) / 10
        d["frame_index"] = np.arange(n)
        return d


def _random_dataset(rng, episodes=4, length=50, state_dim=8, action_dim=7):
    eps = []
    for _ in range(episodes):
        eps.append({
            "observation.state": rng.normal(size=(length, state_dim)).astype(np.float32),
            "action": np.concatenate([rng.normal(size=(length, action_dim - 1)),
                                      rng.choice([-1.0, 1.0], size=(length, 1))], axis=1).astype(np.float32),
        })
    return _NumericDataset(eps, cameras=("observation.images.image", "observation.images.wrist_image"))


# ---------------------------------------------------------------------------------------------
# schemas
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_builtin_schemas_valid_and_fit_padding(name):
    s = get_schema(name)
    s.validate(state_pad=64, action_pad=32)
    assert 0 < s.state_dim <= 64 and 0 < s.action_dim <= 32
    assert len(s.state_names) == s.state_dim and len(s.action_names) == s.action_dim
    assert len(s.identity_mask("action")) == s.action_dim
    back = EmbodimentSchema.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s
    assert name in s.describe()


def test_builtin_dimensions():
    mw, lib, gr1, g1 = (get_schema(n) for n in ("metaworld_sawyer", "libero_franka", "robocasa_gr1", "unitree_g1"))
    assert (mw.state_dim, mw.action_dim, mw.action_grippers) == (4, 4, [3])
    assert mw.camera_keys == ["observation.images.image"]
    assert (lib.state_dim, lib.action_dim, lib.action_grippers) == (8, 7, [6])
    assert lib.camera_keys == ["observation.images.image", "observation.images.wrist_image"]
    assert lib.layout == "side_by_side" and lib.grid_shape() == (1, 2)
    assert (gr1.state_dim, gr1.action_dim) == (29, 29)
    assert gr1.camera_keys == ["observation.images.ego_view"]
    assert gr1.action_names[:2] == ["left_shoulder_pitch", "left_shoulder_roll"]
    assert (g1.state_dim, g1.action_dim) == (16, 16)
    assert g1.action_names[-2:] == ["kLeftGripper", "kRightGripper"]
    assert get_schema("libero-franka") is lib  # dashes accepted


def test_unknown_schema_lists_available():
    with pytest.raises(SchemaError, match="libero_franka"):
        get_schema("nope")


def test_schema_padding_overflow():
    s = EmbodimentSchema("big", state=(Part("observation.state", 0, 65),), action=(Part("action", 0, 4),),
                         cameras=(Camera("observation.images.image"),))
    with pytest.raises(SchemaError, match="65 dimensions.*64"):
        s.validate()
    s = EmbodimentSchema("big", state=(Part("observation.state", 0, 4),), action=(Part("action", 0, 33),),
                         cameras=(Camera("observation.images.image"),))
    with pytest.raises(SchemaError, match="33 dimensions.*32"):
        s.validate()


def test_part_validation():
    with pytest.raises(SchemaError, match="names"):
        Part("x", 0, 3, names=("a", "b"))
    with pytest.raises(SchemaError, match="gripper index"):
        Part("x", 0, 3, gripper=(3,))
    with pytest.raises(SchemaError, match="stop"):
        Part("x")
    assert Part("x", 2, names=("a", "b")).stop == 4


def test_check_against_dataset(rng=np.random.default_rng(0)):
    ds = _random_dataset(rng)
    lib = get_schema("libero_franka")
    bound = lib.check(ds)
    assert bound.camera_keys == lib.camera_keys

    # dimension mismatch names the key, the dataset's shape and the slice
    ds.features["observation.state"]["shape"] = [6]
    with pytest.raises(SchemaError) as e:
        lib.check(ds)
    msg = str(e.value)
    assert "observation.state[0:8]" in msg and "[6]" in msg

    # missing keys: every problem reported at once, with what the dataset has
    ds.features["observation.state"]["shape"] = [8]
    del ds.features["observation.images.wrist_image"]
    ds.features["act"] = ds.features.pop("action")
    with pytest.raises(SchemaError) as e:
        lib.check(ds)
    msg = str(e.value)
    assert "'action'" in msg and "observation.images.wrist_image" in msg and "'act'" in msg


def test_check_resolves_aliases():
    rng = np.random.default_rng(1)
    ds = _random_dataset(rng)
    ds.features["actions"] = ds.features.pop("action")
    bound = get_schema("libero_franka").check(ds)
    assert bound.action[0].key == "actions"
    data = {"observation.state": np.zeros((3, 8)), "actions": np.ones((3, 7))}
    assert bound.extract(data, "action").shape == (3, 7)


def test_check_rejects_visual_and_matrix_features():
    rng = np.random.default_rng(2)
    ds = _random_dataset(rng)
    ds.features["observation.state"] = {"dtype": "video", "shape": [8, 8, 3]}
    with pytest.raises(SchemaError, match="numeric"):
        get_schema("libero_franka").check(ds)
    ds.features["observation.state"] = {"dtype": "float32", "shape": [2, 4]}
    with pytest.raises(SchemaError, match="1-D"):
        get_schema("libero_franka").check(ds)


def test_extract_slices_and_order():
    gr1 = get_schema("robocasa_gr1")
    raw = np.arange(44, dtype=np.float32)[None].repeat(2, 0)
    vec = gr1.extract({"observation.state": raw, "action": raw}, "state")
    want = np.concatenate([np.arange(0, 7), np.arange(22, 29), np.arange(7, 13), np.arange(29, 35), np.arange(41, 44)])
    np.testing.assert_array_equal(vec[0], want)
    one = gr1.extract({"observation.state": raw[0], "action": raw[0]}, "action", batched=False)
    np.testing.assert_array_equal(one, want)
    with pytest.raises(SchemaError, match="only 10 entries"):
        gr1.extract({"observation.state": np.zeros((2, 10))}, "state")


def test_register_and_infer():
    rng = np.random.default_rng(3)
    ds = _random_dataset(rng)
    s = infer_schema(ds, name="test_inferred_robot")
    assert (s.state_dim, s.action_dim, len(s.cameras), s.layout) == (8, 7, 2, "side_by_side")
    register_schema(s, overwrite=True)
    try:
        assert get_schema("test_inferred_robot") is s
        with pytest.raises(SchemaError, match="already registered"):
            register_schema(s)
    finally:
        SCHEMAS.pop("test_inferred_robot")


def test_grid_layout():
    s = EmbodimentSchema("g", state=(Part("s", 0, 2),), action=(Part("a", 0, 2),),
                         cameras=tuple(Camera(f"observation.images.c{i}") for i in range(3)), layout="grid",
                         grid=(2, 2))
    assert s.validate().grid_shape() == (2, 2)
    with pytest.raises(SchemaError, match="cannot hold"):
        EmbodimentSchema("g", state=s.state, action=s.action, cameras=s.cameras, layout="grid", grid=(1, 2)).validate()
    with pytest.raises(SchemaError, match="exactly one camera"):
        EmbodimentSchema("g", state=s.state, action=s.action, cameras=s.cameras, layout="single").validate()


# ---------------------------------------------------------------------------------------------
# streaming statistics
# ---------------------------------------------------------------------------------------------


def _rank_band(x, q, delta=0.003):
    return np.quantile(x, max(q - delta, 0), axis=0), np.quantile(x, min(q + delta, 1), axis=0)


@pytest.mark.parametrize("exact_limit", [10**9, 300])
def test_streaming_stats_vs_numpy(exact_limit):
    rng = np.random.default_rng(4)
    # shifting distributions force the histogram range to grow (left and right) after the switch
    x = np.concatenate([
        rng.normal(size=(1500, 6)),
        rng.normal(size=(2000, 6)) * 10 + 5,
        rng.uniform(-40, -30, size=(500, 6)),
        rng.exponential(3.0, size=(2000, 6)),
    ])
    x[:, 5] = 2.5  # a constant dimension
    st = StreamingStats(6, exact_limit=exact_limit)
    for i in range(0, len(x), 333):
        st.update(x[i:i + 333])
    r = st.result()
    assert r["count"] == len(x)
    np.testing.assert_allclose(r["mean"], x.mean(0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(r["std"], x.std(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(r["min"], x.min(0))
    np.testing.assert_array_equal(r["max"], x.max(0))
    for q, key in ((0.01, "q01"), (0.99, "q99")):
        got = np.asarray(r[key])
        if exact_limit > len(x):
            assert r["exact_quantiles"]
            np.testing.assert_allclose(got, np.quantile(x, q, axis=0), rtol=0, atol=1e-12)
        else:
            assert not r["exact_quantiles"]
            lo, hi = _rank_band(x, q)
            span = x.max(0) - x.min(0)
            tol = 2 * span / st.bins + 1e-12
            assert np.all(got >= lo - tol) and np.all(got <= hi + tol), (got, lo, hi)
    assert r["q01"][5] == 2.5 and r["q99"][5] == 2.5


def test_streaming_stats_nan_names_where():
    st = StreamingStats(3)
    bad = np.zeros((4, 3))
    bad[2, 1] = np.nan
    with pytest.raises(NormalizationError, match=r"episode 7, key 'action'.*row 12, dimension 1"):
        st.update(bad, where="episode 7, key 'action'", row_offset=10)
    bad[2, 1] = np.inf
    with pytest.raises(NormalizationError, match="non-finite value inf"):
        st.update(bad)
    with pytest.raises(NormalizationError, match=r"expected \(N, 3\)"):
        st.update(np.zeros((4, 2)))


def test_dataset_stats_vs_numpy():
    rng = np.random.default_rng(5)
    ds = _random_dataset(rng, episodes=5, length=40)
    stats = compute_dataset_stats(ds, "libero_franka", progress=False)
    allstate = np.concatenate([d["observation.state"] for d in ds._data]).astype(np.float64)
    allact = np.concatenate([d["action"] for d in ds._data]).astype(np.float64)
    assert stats["num_frames"] == 200 and stats["num_episodes"] == 5
    for key, ref in (("state", allstate), ("action", allact)):
        s = stats[key]
        np.testing.assert_allclose(s["mean"], ref.mean(0), atol=1e-9)
        np.testing.assert_allclose(s["std"], ref.std(0), atol=1e-9)
        np.testing.assert_allclose(s["q01"], np.quantile(ref, 0.01, axis=0), atol=1e-9)
        np.testing.assert_allclose(s["q99"], np.quantile(ref, 0.99, axis=0), atol=1e-9)
    assert stats["action"]["identity"] == [False] * 6 + [True]
    # raw keys too (bookkeeping columns excluded)
    assert set(stats["keys"]) == {"observation.state", "action"}
    np.testing.assert_allclose(stats["keys"]["action"]["max"], allact.max(0))
    json.dumps(stats)  # JSON-serialisable


def test_dataset_stats_nan_names_episode_and_key():
    rng = np.random.default_rng(6)
    ds = _random_dataset(rng, episodes=4, length=20)
    ds._data[2]["action"][5, 3] = np.nan
    with pytest.raises(NormalizationError) as e:
        compute_dataset_stats(ds, "libero_franka", progress=False)
    assert "episode 2" in str(e.value) and "'action'" in str(e.value)
    with pytest.raises(NormalizationError, match=r"episode 2.*'action'"):
        compute_dataset_stats(ds, None, progress=False)


# ---------------------------------------------------------------------------------------------
# normaliser
# ---------------------------------------------------------------------------------------------


def _normalizer(mode, rng=np.random.default_rng(7)):
    ds = _random_dataset(rng, episodes=3, length=60)
    ds._data[1]["observation.state"][:, 4] = 0.3  # constant everywhere -> near-constant dim
    for d in ds._data:
        d["observation.state"][:, 4] = 0.3
    stats = compute_dataset_stats(ds, "libero_franka", progress=False)
    return ds, Normalizer.from_stats(stats, get_schema("libero_franka"), mode=mode)


@pytest.mark.parametrize("mode", ["min_max", "quantile"])
def test_normalize_round_trip(mode):
    ds, norm = _normalizer(mode)
    x = np.concatenate([d["action"] for d in ds._data]).astype(np.float64)
    y = norm.normalize("action", x)
    assert y.shape == x.shape and np.all(y >= -1 - 1e-9) and np.all(y <= 1 + 1e-9)
    if mode == "min_max":
        assert np.allclose(y[:, :6].min(0), -1) and np.allclose(y[:, :6].max(0), 1)
        np.testing.assert_allclose(norm.unnormalize("action", y), x, atol=1e-9)
    else:
        lo = np.quantile(x, 0.01, axis=0)
        hi = np.quantile(x, 0.99, axis=0)
        inside = np.all((x >= lo) & (x <= hi), axis=1)
        np.testing.assert_allclose(norm.unnormalize("action", y)[inside], x[inside], atol=1e-9)
        # outside the quantiles: clipped to the quantile
        back = norm.unnormalize("action", y)
        assert np.all(back[:, :6] <= hi[:6] + 1e-9) and np.all(back[:, :6] >= lo[:6] - 1e-9)


def test_grippers_identity_and_constant_dims():
    ds, norm = _normalizer("min_max")
    a = np.concatenate([d["action"] for d in ds._data])
    y = norm.normalize("action", a)
    np.testing.assert_array_equal(y[:, 6], a[:, 6])  # gripper untouched
    s = np.concatenate([d["observation.state"] for d in ds._data]).astype(np.float64)
    ys = norm.normalize("state", s)
    assert np.all(ys[:, 4] == 0) and np.isfinite(ys).all()
    back = norm.unnormalize("state", ys)
    np.testing.assert_allclose(back[:, 4], 0.3, atol=1e-6)
    np.testing.assert_allclose(back, s, atol=1e-6)
    # an arbitrary value of a constant dim still maps to 0 and back to the constant
    probe = s[:1].copy()
    probe[0, 4] = 100.0
    assert norm.normalize("state", probe)[0, 4] == 0
    assert np.isclose(norm.unnormalize("state", np.zeros((1, 8)))[0, 4], 0.3, atol=1e-6)


def test_normalizer_torch_matches_numpy():
    _, norm = _normalizer("min_max")
    x = np.random.default_rng(8).normal(size=(5, 3, 7)).astype(np.float32)
    yn = norm.normalize("action", x)
    yt = norm.normalize("action", torch.from_numpy(x))
    assert isinstance(yt, torch.Tensor) and yt.dtype == torch.float32
    np.testing.assert_allclose(yt.numpy(), yn, atol=1e-5)
    np.testing.assert_allclose(norm.unnormalize("action", yt).numpy(), norm.unnormalize("action", yn), atol=1e-5)
    with pytest.raises(NormalizationError, match=r"\(\.\.\., 7\)"):
        norm.normalize("action", x[..., :5])


@pytest.mark.parametrize("mode", ["min_max", "quantile"])
def test_normalizer_json_round_trip(mode, tmp_path):
    _, norm = _normalizer(mode)
    text = json.dumps(norm.to_dict())
    back = Normalizer.from_dict(json.loads(text))
    x = np.random.default_rng(9).normal(size=(10, 7))
    np.testing.assert_array_equal(back.normalize("action", x), norm.normalize("action", x))
    np.testing.assert_array_equal(back.unnormalize("state", np.zeros((2, 8))), norm.unnormalize("state", np.zeros((2, 8))))
    p = norm.save(tmp_path / "norm.json")
    assert Normalizer.load(p).mode == mode
    with pytest.raises(NormalizationError, match="not a normaliser"):
        Normalizer.from_dict({"format": "x"})


def test_normalizer_bad_stats():
    with pytest.raises(NormalizationError, match="mode"):
        Normalizer({"state": {"min": [0], "max": [1]}}, mode="zscore")
    with pytest.raises(NormalizationError, match="NaN"):
        Normalizer({"state": {"min": [float("nan")], "max": [1]}})
    with pytest.raises(NormalizationError, match="q01"):
        Normalizer({"state": {"min": [0], "max": [1]}}, mode="quantile")


def test_schema_json_file(tmp_path):
    s = get_schema("robocasa_gr1")
    p = s.save(tmp_path / "gr1.json")
    assert get_schema(str(p)) == s
    with pytest.raises(SchemaError, match="not found"):
        get_schema(str(tmp_path / "missing.json"))
