"""The joint model: losses, gradient routing, inference determinism, presets."""

import pytest
import torch

from dit4dit.config import get_preset
from dit4dit.models.dit4dit import DiT4DiT, parameter_counts

SMALL = ["video.num_layers=3", "feature_blocks=2", "action.num_layers=2", "inputs.image_size=[32,32]",
         "action.dropout=0.0", "repeated_diffusion_steps=2"]


def small_cfg(*extra):
    return get_preset("tiny", SMALL + list(extra))


def make_batch(cfg, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.inputs.image_size
    t = cfg.inputs.num_frames
    a = cfg.action
    actions = torch.rand(b, a.action_horizon, a.action_dim, generator=g) * 2 - 1
    mask = torch.zeros(b, a.action_horizon, a.action_dim, dtype=torch.bool)
    mask[..., :4] = True
    actions[~mask] = 0
    state = torch.zeros(b, a.state_dim)
    state[:, :4] = torch.rand(b, 4, generator=g)
    smask = torch.zeros(b, a.state_dim, dtype=torch.bool)
    smask[:, :4] = True
    return {"video": torch.rand(b, 3, t, h, w, generator=g) * 2 - 1, "state": state, "state_mask": smask,
            "actions": actions, "action_mask": mask,
            "instruction": ["push the button", "open the drawer"] * (b // 2)}


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return DiT4DiT.from_config(cfg, random_weights=True)


def test_loss_parts_and_modes():
    cfg = small_cfg()
    m = build(cfg)
    batch = make_batch(cfg)
    total, logs = m.loss(batch, torch.Generator().manual_seed(0))
    assert set(logs) == {"loss", "loss_action", "loss_video"}
    assert abs(logs["loss"] - (logs["loss_action"] + cfg.lambda_video * logs["loss_video"])) < 1e-5
    _, logs = build(small_cfg("mode=action_only")).loss(batch)
    assert set(logs) == {"loss", "loss_action"} and logs["loss"] == logs["loss_action"]
    _, logs = build(small_cfg("mode=video_only")).loss(batch)
    assert set(logs) == {"loss", "loss_video"}


def test_shared_pass_equals_separate_passes():
    batch = make_batch(small_cfg())
    out = {}
    for share in (True, False):
        m = build(small_cfg(f"share_video_passes={str(share).lower()}")).eval()
        total, logs = m.loss(batch, torch.Generator().manual_seed(3))
        out[share] = logs
    for k in out[True]:
        assert abs(out[True][k] - out[False][k]) < 1e-5 * max(1.0, abs(out[False][k])), k


def _grad_norm(module):
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_feature_grad_end_to_end_vs_detached():
    batch = make_batch(small_cfg())
    for grad, expect in (("end_to_end", True), ("detached", False)):
        m = build(small_cfg("mode=action_only", f"feature_grad={grad}"))
        m.loss(batch)[0].backward()
        # the action loss reaches the video DiT's feature blocks only end to end
        assert (_grad_norm(m.video_dit.transformer.transformer_blocks[0]) > 0) is expect
        assert _grad_norm(m.action_dit) > 0
        # blocks past the exit and the output head never get a gradient from the action loss
        assert _grad_norm(m.video_dit.transformer.transformer_blocks[2]) == 0
        assert _grad_norm(m.video_dit.transformer.proj_out) == 0


def test_joint_video_loss_trains_all_blocks_but_detached_features_do_not_leak():
    m = build(small_cfg("feature_grad=detached", "lambda_video=1.0"))
    m.loss(make_batch(small_cfg()))[0].backward()
    assert _grad_norm(m.video_dit.transformer.transformer_blocks[2]) > 0  # via the video loss
    assert _grad_norm(m.video_dit.transformer.proj_out) > 0


def test_masked_action_loss_ignores_padded_dims_and_steps():
    cfg = small_cfg("mode=action_only")
    batch = make_batch(cfg)
    batch["action_mask"][:, -2:, :] = False  # last steps are padding
    m = build(cfg)
    base = m.loss(batch, torch.Generator().manual_seed(1))[1]["loss_action"]
    garbage = dict(batch)
    acts = batch["actions"].clone()
    acts[~batch["action_mask"]] = 1e3  # whatever sits in padded slots must not matter
    garbage["actions"] = acts
    again = m.loss(garbage, torch.Generator().manual_seed(1))[1]["loss_action"]
    assert again == pytest.approx(base, rel=1e-6)


def test_overfits_one_small_batch():
    # A fixed batch with fixed noise and timesteps (the generator is reseeded every step), so the
    # dual flow-matching loss has no irreducible variance and must fall at least tenfold.
    cfg = small_cfg("video.timestep_scale=1000.0", "codec.kind=pixel", "codec.pixel_factor=4", "video.in_channels=49",
                    "video.out_channels=48")
    m = build(cfg)
    batch = make_batch(cfg, b=2)
    # lr 2e-3 converges by orders of magnitude; 3e-3 oscillates (falls only ~5-10x in 120 steps).
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    losses = []
    for step in range(120):
        loss, logs = m.loss(batch, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(logs["loss"])
    assert min(losses[-5:]) < losses[0] / 10, (losses[0], losses[-5:])


def test_inference_deterministic_under_seed_and_shapes():
    cfg = small_cfg()
    m = build(cfg).eval()
    batch = make_batch(cfg, b=2)
    cond = batch["video"][:, :, : cfg.inputs.num_cond_frames]
    a1 = m.predict_action(cond, batch["state"], batch["instruction"], generator=torch.Generator().manual_seed(5))
    a2 = m.predict_action(cond, batch["state"], batch["instruction"], generator=torch.Generator().manual_seed(5))
    a3 = m.predict_action(cond, batch["state"], batch["instruction"], generator=torch.Generator().manual_seed(6))
    assert a1.shape == (2, cfg.action.action_horizon, cfg.action.action_dim)
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)
    v1 = m.predict_video(cond, batch["instruction"], generator=torch.Generator().manual_seed(5), num_steps=2)
    v2 = m.predict_video(cond, batch["instruction"], generator=torch.Generator().manual_seed(5), num_steps=2)
    assert v1.shape == (2, 3, cfg.inputs.num_future_frames, *cfg.inputs.image_size)
    assert torch.equal(v1, v2)


def test_multi_step_feature_denoising_runs():
    cfg = small_cfg("feature_denoise_steps=3")
    m = build(cfg)
    batch = make_batch(cfg, b=2)
    loss, _ = m.loss(batch)
    loss.backward()
    cond = batch["video"][:, :, :1]
    assert m.eval().predict_action(cond, batch["state"], batch["instruction"]).isfinite().all()


def test_tau_f_buckets_training():
    cfg = small_cfg("tau_f_buckets=4")
    loss, logs = build(cfg).loss(make_batch(cfg))
    assert torch.isfinite(loss)


def test_cosmos_2b_parameter_count_on_meta():
    counts = parameter_counts(get_preset("cosmos-2b"))
    assert 2.0e9 <= counts["video_dit"] <= 2.1e9, counts
    assert 60e6 <= counts["video_dit_per_block"] <= 75e6
    assert 95e6 <= counts["text_projection"] <= 110e6
    assert counts["video_dit_feature_path"] < counts["video_dit"]
    assert counts["trainable_total"] == counts["video_dit"] + counts["action_dit"]


def test_text_encoded_once_per_distinct_prompt_same_values_and_gradients():
    cfg = small_cfg()
    model = build(cfg)
    prompts = ["push the button", "open the drawer", "push the button", "push the button"]
    calls = []
    enc = model.text_encoder
    orig = enc.forward
    enc.forward = lambda p: (calls.append(list(p)), orig(p))[1]
    try:
        emb = model.encode_text(prompts)
    finally:
        del enc.forward
    assert calls == [["push the button", "open the drawer"]]
    ref = torch.stack([orig([p])[0] for p in prompts])
    torch.testing.assert_close(emb, ref, rtol=1e-5, atol=1e-6)
    w = torch.randn_like(emb)
    grads = [torch.autograd.grad((e * w).sum(), enc.parameters()) for e in (emb, ref)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


GEN = ["codec.pca_channels=48", "video.in_channels=49", "video.out_channels=48", "codec.generated_channels=8"]


def test_generated_channels_config_checks():
    from dit4dit.config import ConfigError

    assert small_cfg(*GEN).codec.generated_channels == 8
    with pytest.raises(ConfigError, match="generated_channels=49 must be an int in"):
        small_cfg(*GEN[:3], "codec.generated_channels=49")
    with pytest.raises(ConfigError, match="needs the pca codec"):
        small_cfg("codec.kind=pixel", "video.in_channels=193", "video.out_channels=192", "codec.generated_channels=8")
    with pytest.raises(ConfigError, match="out_channels=16 must be video.in_channels - 1"):
        small_cfg("video.out_channels=16")


def test_generated_channels_future_frames_carry_the_leading_channels_only():
    cfg = small_cfg(*GEN)
    m = build(cfg)
    batch = make_batch(cfg)
    latents = m.encode_video(batch["video"])
    n_cond, g = m.num_cond_latents, 8
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    x, _, _ = m.video_dit.video2world_inputs(latents, noise, torch.full((4,), 0.5), n_cond)
    assert torch.equal(x[:, :, :n_cond], latents[:, :, :n_cond])  # conditioning frames keep all 48
    assert x[:, g:, n_cond:].abs().max() == 0 and x[:, :g, n_cond:].abs().min() > 0

    # The video loss reads only the generated channels of the velocity: changing the output
    # weights of the other channels leaves it unchanged, changing a generated one does not.
    def video_loss():
        return m.loss(batch, torch.Generator().manual_seed(0))[1]["loss_video"]

    base = video_loss()
    proj = m.video_dit.transformer.proj_out
    c_out = cfg.video.out_channels
    with torch.no_grad():  # proj_out rows are ordered (patch positions..., channel): channel = row % c_out
        rows = torch.arange(proj.weight.shape[0])
        proj.weight[rows % c_out >= g] += 1.0
    assert video_loss() == base
    with torch.no_grad():
        proj.weight[rows % c_out == 0] += 1.0
    assert video_loss() != base

    # At inference the future noise of the other channels does not reach the features, and the
    # predicted frames decode from the generated channels only.
    cond = batch["video"][:, :, :n_cond]
    text = m.encode_text(batch["instruction"])
    c = m.encode_video(cond)
    fut = torch.randn((4, 48, m.num_future_latents, *c.shape[3:]), generator=torch.Generator().manual_seed(2))
    fut2 = fut.clone()
    fut2[:, g:] += 5.0
    tau = torch.full((4,), cfg.tau_f)
    f1 = m.video_dit.features(*m.video_dit.assemble(c, fut, tau), text, cfg.feature_blocks)
    f2 = m.video_dit.features(*m.video_dit.assemble(c, fut2, tau), text, cfg.feature_blocks)
    assert torch.equal(f1, f2)
    decoded = []
    decode = m.codec.decode
    m.codec.decode = lambda z: decoded.append(z) or decode(z)
    video = m.eval().predict_video(cond, batch["instruction"], generator=torch.Generator().manual_seed(3), num_steps=2)
    assert video.shape == (4, 3, cfg.inputs.num_future_frames, *cfg.inputs.image_size) and video.isfinite().all()
    (z,) = decoded
    assert z[:, g:, n_cond:].abs().max() == 0 and z[:, :g, n_cond:].abs().min() > 0
    assert torch.equal(z[:, :, :n_cond], c)


def _captured_features(m, batch, seed):
    """(feature-pass input x, features) of one training loss call (Algorithm 1, line 14)."""
    seen = {}
    feature_inputs, action_loss = m._feature_inputs, m._action_loss

    def spy_inputs(*args, **kw):
        out = feature_inputs(*args, **kw)
        seen["x"] = out[0].detach().clone()
        return out

    def spy_loss(features, labelled, generator):
        seen["features"] = features.detach().clone()
        return action_loss(features, labelled, generator)

    m._feature_inputs, m._action_loss = spy_inputs, spy_loss
    try:
        m.loss(batch, torch.Generator().manual_seed(seed))
    finally:
        del m._feature_inputs, m._action_loss
    return seen["x"], seen["features"]


@pytest.mark.parametrize("extra", [["tau_f=0.25"], ["tau_f_buckets=10"], ["feature_denoise_steps=3"],
                                   ["share_video_passes=false"]])
def test_training_features_never_read_the_true_future(extra):
    """The feature pass takes pure noise for the future latents at tau_f, exactly as at inference:
    changing the future frames of a batch changes neither its input nor the features."""
    cfg = small_cfg(*extra)
    m = build(cfg).eval()  # no dropout: the two calls must differ only by their future frames
    batch = make_batch(cfg)
    other = dict(batch, video=batch["video"].clone())
    other["video"][:, :, cfg.inputs.num_cond_frames:] = torch.rand_like(other["video"][:, :, 1:]) * 2 - 1
    x1, f1 = _captured_features(m, batch, seed=5)
    x2, f2 = _captured_features(m, other, seed=5)
    assert torch.equal(x1, x2) and torch.equal(f1, f2)
    # ... and the future part of that input is the noise inference draws, not a noised true future:
    nc = m.num_cond_latents
    fut = m.encode_video(batch["video"])[:, :, nc:]
    corr = torch.corrcoef(torch.stack([x1[:, :fut.shape[1], nc:].flatten(), fut.flatten()]))[0, 1]
    assert abs(float(corr)) < 0.1


def test_training_feature_pass_equals_inference_feature_pass():
    """Same conditioning, same generator state: the training feature input is what
    extract_features builds at inference (Algorithm 1 line 14 = Algorithm 2)."""
    cfg = small_cfg("feature_denoise_steps=2")
    m = build(cfg).eval()
    batch = make_batch(cfg, b=2)
    nc = cfg.inputs.num_cond_frames
    cond = m.encode_video(batch["video"][:, :, :nc])
    text = m.encode_text(batch["instruction"])
    tau = torch.full((2,), cfg.tau_f)
    x_train, ts_train, _ = m._feature_inputs(cond, text, tau, torch.Generator().manual_seed(1))
    seen = {}
    features = m.video_dit.features

    def spy(x, ts, *args, **kw):
        seen["x"], seen["ts"] = x.clone(), ts.clone()
        return features(x, ts, *args, **kw)

    m.video_dit.features = spy
    try:
        m.extract_features(batch["video"][:, :, :nc], text, torch.Generator().manual_seed(1))
    finally:
        del m.video_dit.features
    assert torch.equal(seen["x"], x_train) and torch.equal(seen["ts"], ts_train)


def test_feature_denoise_schedule_points():
    """k denoising steps: k - 1 Euler steps on tau_f * (1 - i / k), features at tau_f / k."""
    cfg = small_cfg("feature_denoise_steps=3", "tau_f=0.9")
    m = build(cfg).eval()
    batch = make_batch(cfg, b=2)
    cond = m.encode_video(batch["video"][:, :, :1])
    text = m.encode_text(batch["instruction"])
    calls = []
    forward = m.video_dit.forward

    def spy(x, ts, *args, **kw):
        calls.append(float(ts[0, 0, -1, 0, 0]))
        return forward(x, ts, *args, **kw)

    m.video_dit.forward = spy
    try:
        _, ts, _ = m._feature_inputs(cond, text, torch.full((2,), 0.9), None)
    finally:
        del m.video_dit.forward
    assert calls == pytest.approx([0.9, 0.6])
    assert float(ts[0, 0, -1, 0, 0]) == pytest.approx(0.3)


def test_action_free_rows_feed_the_video_loss_only():
    """Rows with has_actions False never reach the feature pass, the action loss or its mask:
    the action loss equals that of the labelled rows alone, whatever the free rows' actions hold."""
    cfg = small_cfg("video_loss_fraction=0.5")
    m = build(cfg).eval()
    lab = make_batch(cfg, b=4, seed=1)
    free = make_batch(cfg, b=2, seed=2)
    free["actions"] = torch.full_like(free["actions"], 1e6)  # poison: would dominate any loss it entered
    free["action_mask"] = torch.ones_like(free["action_mask"])
    mixed = {k: (torch.cat([free[k], lab[k]]) if torch.is_tensor(lab[k]) else free[k] + lab[k]) for k in lab}
    mixed["has_actions"] = torch.tensor([False, False, True, True, True, True])
    seen = {}
    action_loss = m._action_loss

    def spy(features, labelled, generator):
        seen["rows"] = features.shape[0]
        seen["actions"] = labelled["actions"].clone()
        return action_loss(features, labelled, generator)

    m._action_loss = spy
    try:
        _, logs = m.loss(mixed, torch.Generator().manual_seed(0))
    finally:
        del m._action_loss
    assert seen["rows"] == 4 and torch.equal(seen["actions"], lab["actions"])
    assert logs["loss_action"] < 10 and torch.isfinite(torch.tensor(logs["loss"]))
    # the video loss covers the two free rows and ceil(0.5 * 4) = 2 labelled rows
    nv = {}
    video_forward = m.video_dit.features_and_velocity

    def spy_v(*args, num_velocity, **kw):
        nv["n"] = num_velocity
        return video_forward(*args, num_velocity=num_velocity, **kw)

    m.video_dit.features_and_velocity = spy_v
    try:
        m.loss(mixed, torch.Generator().manual_seed(0))
    finally:
        del m.video_dit.features_and_velocity
    assert nv["n"] == 4
    # all rows free: a video-only model trains on them; a joint model refuses the batch
    only_free = dict(free, has_actions=torch.zeros(2, dtype=torch.bool))
    _, logs = build(small_cfg("mode=video_only")).loss(only_free)
    assert set(logs) == {"loss", "loss_video"}
    with pytest.raises(ValueError, match="action-free"):
        m.loss(only_free)
    with pytest.raises(ValueError, match="action-free"):
        build(small_cfg("mode=action_only")).loss(mixed)


def test_all_labelled_has_actions_changes_nothing():
    cfg = small_cfg()
    m = build(cfg).eval()
    batch = make_batch(cfg)
    _, a = m.loss(batch, torch.Generator().manual_seed(4))
    _, b = m.loss(dict(batch, has_actions=torch.ones(4, dtype=torch.bool)), torch.Generator().manual_seed(4))
    assert a == b
