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
