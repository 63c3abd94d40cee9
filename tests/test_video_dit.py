"""The video DiT wrapper against the diffusers forward it mirrors."""

import types

import pytest
import torch
import torch.nn.functional as F

from dit4dit.config import VideoDiTConfig
from dit4dit.models.video_dit import COND_TIMESTEP, VideoDiT

import diffusers.models.transformers.transformer_cosmos as cosmos_mod


def _nearest_resize_shim():
    """The diffusers forward resizes padding_mask with torchvision, which has no CPU wheel for our
    torch; give it an equivalent nearest-neighbour resize so the reference forward can run."""

    def resize(img, size, interpolation=None):
        return F.interpolate(img, size=tuple(size), mode="nearest")

    functional = types.SimpleNamespace(resize=resize)
    return types.SimpleNamespace(functional=functional, InterpolationMode=types.SimpleNamespace(NEAREST="nearest"))


@pytest.fixture(autouse=True)
def _shim(monkeypatch):
    if not hasattr(cosmos_mod, "transforms"):
        monkeypatch.setattr(cosmos_mod, "transforms", _nearest_resize_shim(), raising=False)


def tiny_cfg(**kw):
    base = dict(in_channels=9, out_channels=8, num_attention_heads=2, attention_head_dim=16, num_layers=5,
                text_embed_dim=24, adaln_lora_dim=8, max_size=(8, 16, 16), rope_scale=(1.0, 3.0, 3.0),
                extra_pos_embed_type=None, use_crossattn_projection=True, crossattn_proj_in_channels=40,
                encoder_hidden_states_channels=24)
    base.update(kw)
    return VideoDiTConfig(**base)


def inputs(model, b=2, t=3, h=8, w=8, num_cond=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.cfg.latent_channels
    lat = torch.randn(b, c, t, h, w, generator=g)
    noise = torch.randn(b, c, t, h, w, generator=g)
    tau = torch.rand(b, generator=g)
    text = torch.randn(b, 6, model.cfg.text_input_dim, generator=g)
    x, ts, cm = model.video2world_inputs(lat, noise, tau, num_cond)
    return x, ts, cm, text, tau


def test_video2world_inputs_conditioning():
    torch.manual_seed(0)
    m = VideoDiT(tiny_cfg())
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(2, 8, 3, 4, 4, generator=g)
    noise = torch.randn(2, 8, 3, 4, 4, generator=g)
    tau = torch.tensor([0.3, 0.9])
    x, ts, cm = m.video2world_inputs(lat, noise, tau, num_cond=1)
    assert torch.equal(x[:, :, 0], lat[:, :, 0])  # clean conditioning frame
    t5 = tau.view(2, 1, 1, 1, 1)
    torch.testing.assert_close(x[:, :, 1:], (1 - t5) * lat[:, :, 1:] + t5 * noise[:, :, 1:])
    assert ts.shape == (2, 1, 3, 1, 1)
    assert torch.all(ts[:, :, 0] == COND_TIMESTEP)
    assert torch.allclose(ts[:, 0, 1:, 0, 0], tau.view(2, 1).expand(2, 2))
    assert cm.shape == (2, 1, 3, 4, 4)
    assert torch.all(cm[:, :, 0] == 1) and torch.all(cm[:, :, 1:] == 0)


@pytest.mark.parametrize("kw", [{}, {"extra_pos_embed_type": "learnable"},
                                {"use_crossattn_projection": False, "crossattn_proj_in_channels": 24}])
def test_forward_equals_diffusers_forward(kw):
    torch.manual_seed(0)
    m = VideoDiT(tiny_cfg(**kw)).eval()
    x, ts, cm, text, _ = inputs(m)
    ours = m(x, ts, cm, text)
    ref = m.transformer(x, ts, text, condition_mask=cm, padding_mask=torch.zeros(1, 1, 8, 8),
                        return_dict=False)[0]
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("num_blocks", [1, 3, 5])
def test_truncated_features_equal_forward_hook(num_blocks):
    torch.manual_seed(0)
    m = VideoDiT(tiny_cfg()).eval()
    x, ts, cm, text, _ = inputs(m)
    captured = {}
    hook = m.transformer.transformer_blocks[num_blocks - 1].register_forward_hook(
        lambda mod, args, out: captured.__setitem__("h", out))
    m.transformer(x, ts, text, condition_mask=cm, padding_mask=torch.zeros(1, 1, 8, 8))
    hook.remove()
    feats = m.features(x, ts, cm, text, num_blocks)
    assert feats.shape == (2, 3 * 4 * 4, m.cfg.width)
    assert torch.equal(feats, captured["h"])  # bit for bit in float32


def test_blocks_past_exit_get_no_gradient_and_are_not_run():
    torch.manual_seed(0)
    m = VideoDiT(tiny_cfg())
    calls = []
    for i, blk in enumerate(m.transformer.transformer_blocks):
        blk.register_forward_hook(lambda mod, a, o, i=i: calls.append(i))
    x, ts, cm, text, _ = inputs(m)
    m.features(x, ts, cm, text, 3).square().mean().backward()
    assert calls == [0, 1, 2]
    for i, blk in enumerate(m.transformer.transformer_blocks):
        grads = [p.grad for p in blk.parameters()]
        if i < 3:
            assert all(g is not None and g.abs().sum() > 0 for g in grads), f"block {i} should get gradient"
        else:
            assert all(g is None for g in grads), f"block {i} is past the exit"
    assert all(p.grad is None for p in m.transformer.norm_out.parameters())
    assert all(p.grad is None for p in m.transformer.proj_out.parameters())


def test_gradient_checkpointing_same_values_and_grads():
    torch.manual_seed(0)
    m = VideoDiT(tiny_cfg())
    x, ts, cm, text, _ = inputs(m)

    def run():
        m.zero_grad(set_to_none=True)
        f = m.features(x, ts, cm, text, 4)
        f.square().mean().backward()
        return f.detach(), [p.grad.clone() for p in m.transformer.transformer_blocks[0].parameters()]

    f0, g0 = run()
    m.gradient_checkpointing = True
    f1, g1 = run()
    assert torch.equal(f0, f1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_shared_batched_pass_equals_separate_passes():
    torch.manual_seed(0)
    m = VideoDiT(tiny_cfg()).eval()
    x, ts, cm, text, _ = inputs(m, b=4)
    feats, vel = m.features_and_velocity(x, ts, cm, text, num_blocks=3, num_velocity=2)
    torch.testing.assert_close(feats, m.features(x[2:], ts[2:], cm[2:], text[2:], 3), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vel, m(x[:2], ts[:2], cm[:2], text[:2]), rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_named():
    m = VideoDiT(tiny_cfg())
    x, ts, cm, text, _ = inputs(m)
    with pytest.raises(ValueError, match="timestep"):
        m(x, ts[:, :, :2], cm, text)
    with pytest.raises(ValueError, match="channels"):
        m(x[:, :4], ts, cm, text)
    with pytest.raises(ValueError, match="num_blocks"):
        m.features(x, ts, cm, text, 6)


def test_from_pretrained_roundtrip_and_mismatch(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    m = VideoDiT(cfg)
    m.transformer.save_pretrained(tmp_path / "transformer")
    loaded = VideoDiT.from_pretrained(tmp_path, cfg, torch_dtype=torch.float32)
    x, ts, cm, text, _ = inputs(m)
    assert torch.equal(loaded.features(x, ts, cm, text, 2), m.features(x, ts, cm, text, 2))
    with pytest.raises(ValueError, match="num_layers"):
        VideoDiT.from_pretrained(tmp_path, tiny_cfg(num_layers=6), torch_dtype=torch.float32)
    with pytest.raises(FileNotFoundError, match="transformer"):
        VideoDiT.from_pretrained(tmp_path / "nope", cfg)
