"""Tests of the action DiT (src/dit4dit/models/action_dit.py)."""

from __future__ import annotations

import pytest
import torch

from dit4dit.config import ActionDiTConfig
from dit4dit.flow import interpolate, target_velocity
from dit4dit.models.action_dit import ActionDiT, timestep_sinusoid

B, N = 3, 10


def tiny_cfg(**kw) -> ActionDiTConfig:
    base = dict(
        num_layers=2,
        num_attention_heads=4,
        attention_head_dim=16,  # width 64
        cross_attention_dim=48,
        mlp_hidden=96,
        action_dim=5,
        state_dim=7,
        action_horizon=6,
        num_future_tokens=3,
        max_seq_len=16,
        dropout=0.0,
        feature_pos_embed=True,
        max_feature_tokens=32,
    )
    base.update(kw)
    return ActionDiTConfig(**base)


def inputs(cfg: ActionDiTConfig, b: int = B, n: int = N, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        noisy_actions=torch.randn(b, cfg.action_horizon, cfg.action_dim, generator=g),
        tau_a=torch.rand(b, generator=g),
        state=torch.randn(b, cfg.state_dim, generator=g),
        features=torch.randn(b, n, cfg.cross_attention_dim, generator=g),
    )


def perturb_modulation(model: ActionDiT) -> None:
    """Give the zero-initialised AdaLN modulations non-zero weights (as after some training)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modulation" in name:
                p.normal_(0.0, 0.05)


# --------------------------------------------------------------------------------------------


def test_output_shape_and_dtype():
    cfg = tiny_cfg()
    model = ActionDiT(cfg).eval()
    x = inputs(cfg)
    out = model(**x)
    assert out.shape == (B, cfg.action_horizon, cfg.action_dim)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # without the feature position embedding, without future tokens, with a mask
    for kw in (dict(feature_pos_embed=False), dict(num_future_tokens=0)):
        c = tiny_cfg(**kw)
        assert ActionDiT(c)(**inputs(c)).shape == (B, c.action_horizon, c.action_dim)
    mask = torch.ones(B, N, dtype=torch.bool)
    assert model(**x, feature_mask=mask).shape == out.shape
    torch.testing.assert_close(model(**x, feature_mask=mask), out)


def test_bf16_model():
    cfg = tiny_cfg()
    model = ActionDiT(cfg).to(torch.bfloat16).eval()
    out = model(**inputs(cfg))  # float32 inputs are cast to the parameter dtype
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize(
    "arg, bad",
    [
        ("noisy_actions", lambda c: torch.randn(B, c.action_horizon + 1, c.action_dim)),
        ("noisy_actions", lambda c: torch.randn(B, c.action_horizon, c.action_dim + 1)),
        ("noisy_actions", lambda c: torch.randn(B, c.action_horizon * c.action_dim)),
        ("tau_a", lambda c: torch.rand(B, 1)),
        ("tau_a", lambda c: torch.rand(B + 1)),
        ("state", lambda c: torch.randn(B, c.state_dim + 1)),
        ("state", lambda c: torch.randn(B + 1, c.state_dim)),
        ("features", lambda c: torch.randn(B, N, c.cross_attention_dim + 1)),
        ("features", lambda c: torch.randn(B, N)),
        ("features", lambda c: torch.randn(B, c.max_feature_tokens + 1, c.cross_attention_dim)),
        ("features", lambda c: torch.randn(B, 0, c.cross_attention_dim)),
        ("feature_mask", lambda c: torch.ones(B, N + 1, dtype=torch.bool)),
        ("feature_mask", lambda c: torch.ones(B, N)),
    ],
)
def test_bad_shapes_raise(arg, bad):
    cfg = tiny_cfg()
    model = ActionDiT(cfg)
    x = inputs(cfg)
    x[arg] = bad(cfg)
    with pytest.raises(ValueError, match=arg):
        model(**x)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="action_horizon"):
        ActionDiT(tiny_cfg(action_horizon=20, max_seq_len=16))
    with pytest.raises(ValueError, match="num_layers"):
        ActionDiT(tiny_cfg(num_layers=1))


def test_max_feature_tokens_only_bounds_with_pos_embed():
    cfg = tiny_cfg(feature_pos_embed=False, max_feature_tokens=4)
    assert ActionDiT(cfg)(**inputs(cfg, n=9)).shape == (B, cfg.action_horizon, cfg.action_dim)


def test_every_parameter_gets_gradient_and_features_too():
    cfg = tiny_cfg(num_layers=4, dropout=0.1)
    model = ActionDiT(cfg).train()
    x = inputs(cfg)
    x["features"].requires_grad_(True)
    model(**x).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
    assert x["features"].grad is not None and x["features"].grad.abs().sum() > 0


def test_gradient_checkpointing_matches():
    cfg = tiny_cfg(num_layers=4, dropout=0.0)
    model = ActionDiT(cfg).train()
    perturb_modulation(model)
    x = inputs(cfg)
    ref = model(**x)
    ref.sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing = True
    out = model(**x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], msg=n)


def test_eval_deterministic_train_dropout_not():
    cfg = tiny_cfg(dropout=0.2)
    model = ActionDiT(cfg)
    x = inputs(cfg)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**x), model(**x))
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(**x), model(**x))


def test_masked_feature_tokens_do_not_matter():
    cfg = tiny_cfg(num_layers=4)
    model = ActionDiT(cfg).eval()
    perturb_modulation(model)
    x = inputs(cfg)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, 6:] = False
    mask[1, :3] = False
    mask[2, ::2] = False
    with torch.no_grad():
        ref = model(**x, feature_mask=mask)
        y = dict(x)
        y["features"] = torch.where(mask[..., None], x["features"], 100.0 * torch.randn_like(x["features"]))
        out = model(**y, feature_mask=mask)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
        # ...while perturbing an attended token does change the output
        y["features"] = x["features"].clone()
        y["features"][0, 0] += 1.0
        assert not torch.allclose(model(**y, feature_mask=mask)[0], ref[0])


def test_fully_masked_sample_is_finite_and_ignores_features():
    cfg = tiny_cfg(num_layers=4)
    model = ActionDiT(cfg).eval()
    x = inputs(cfg)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1] = False
    with torch.no_grad():
        ref = model(**x, feature_mask=mask)
        y = dict(x)
        y["features"] = x["features"] + torch.randn_like(x["features"])
        out = model(**y, feature_mask=mask)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(out[1], ref[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("arg", ["tau_a", "state", "features"])
def test_output_depends_on(arg):
    cfg = tiny_cfg()
    model = ActionDiT(cfg).eval()  # fresh init: zero AdaLN modulation; tau_a still enters via the action encoder
    x = inputs(cfg)
    y = dict(x)
    y[arg] = 1.0 - x[arg] if arg == "tau_a" else x[arg] + torch.randn_like(x[arg])
    with torch.no_grad():
        ref, out = model(**x), model(**y)
    # relative to the output scale (small at init: four 0.02-std linears in the head)
    diff = (out - ref).abs().amax(dim=(1, 2)) / ref.abs().mean()
    assert (diff > 1e-2).all(), f"output does not depend on {arg}: relative max diff per sample {diff.tolist()}"


def test_batch_independence():
    cfg = tiny_cfg()
    model = ActionDiT(cfg).eval()
    x = inputs(cfg)
    with torch.no_grad():
        full = model(**x)
        first = model(**{k: v[:1] for k, v in x.items()})
    torch.testing.assert_close(first, full[:1], rtol=1e-5, atol=1e-6)


def test_timestep_sinusoid_separates_flow_times():
    emb = timestep_sinusoid(torch.tensor([0.0, 0.25, 0.5]) * 1000.0)
    assert emb.shape == (3, 256)
    assert (emb[0] - emb[1]).norm() > 1.0 and (emb[1] - emb[2]).norm() > 1.0


def test_dit_b_parameter_count_on_meta():
    cfg = ActionDiTConfig()
    assert cfg.width == 768 and cfg.num_layers == 16
    with torch.device("meta"):
        model = ActionDiT(cfg)
    n = sum(p.numel() for p in model.parameters())
    print(f"DiT-B action DiT parameters: {n:,}")
    assert 150e6 < n < 250e6, n
    # 8 cross-attention blocks read 2048-wide features, 8 self-attention blocks do not
    assert model.blocks[0].attn.to_k.in_features == 2048 and model.blocks[1].attn.to_k.in_features == 768


def test_overfits_one_batch():
    cfg = tiny_cfg(dropout=0.0, num_layers=2)
    model = ActionDiT(cfg)
    g = torch.Generator().manual_seed(1)
    b = 8
    a0 = torch.rand(b, cfg.action_horizon, cfg.action_dim, generator=g) * 2 - 1
    noise = torch.randn(a0.shape, generator=g)
    tau = torch.rand(b, generator=g)
    state = torch.randn(b, cfg.state_dim, generator=g)
    feats = torch.randn(b, N, cfg.cross_attention_dim, generator=g)
    noisy, target = interpolate(a0, noise, tau), target_velocity(a0, noise)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(300):
        loss = (model(noisy, tau, state, feats) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] < losses[0] / 20:
            break
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1], len(losses))


def test_compiles_without_graph_breaks():
    pytest.importorskip("torch._dynamo")
    import torch._dynamo

    cfg = tiny_cfg()
    model = ActionDiT(cfg).eval()
    x = inputs(cfg)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, 5:] = False
    explain = torch._dynamo.explain(model)(**x, feature_mask=mask)
    assert explain.graph_break_count == 0, explain.break_reasons


def test_shared_features_match_repeated_features():
    """`repeats=r` (K/V once per feature row) equals feeding each feature row r times."""
    cfg = tiny_cfg(num_layers=4)
    model = ActionDiT(cfg).eval()
    perturb_modulation(model)
    r = 3
    x = inputs(cfg, b=B * r)
    feats = torch.randn(B, N, cfg.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 4:] = False
    with torch.no_grad():
        ref = model(**{**x, "features": feats.repeat_interleave(r, 0)}, feature_mask=mask.repeat_interleave(r, 0))
        out = model(**{**x, "features": feats}, feature_mask=mask, repeats=r)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="repeats=2 must"):
        model(**{**x, "features": feats}, repeats=2)
    with pytest.raises(ValueError, match=r"features: expected shape \(3, N"):
        model(**x, repeats=r)
