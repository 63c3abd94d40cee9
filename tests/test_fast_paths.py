"""Fast inference paths agree with the plain one: torch.compile and bf16 weights."""

import pytest
import torch

from dit4dit.config import get_preset
from dit4dit.models.dit4dit import DiT4DiT

SMALL = ["video.num_layers=2", "feature_blocks=1", "action.num_layers=2", "inputs.image_size=[32,32]",
         "action.dropout=0.0"]


def _inputs(cfg, b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.inputs.image_size
    cond = torch.rand(b, 3, cfg.inputs.num_cond_frames, h, w, generator=g) * 2 - 1
    state = torch.randn(b, cfg.action.state_dim, generator=g)
    return cond, state, ["push the button"] * b


def _act(model, cond, state, prompts, seed=3):
    return model.predict_action(cond, state, prompts, generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
def test_compiled_inference_matches_eager():
    cfg = get_preset("tiny", SMALL)
    torch.manual_seed(0)
    model = DiT4DiT.from_config(cfg, random_weights=True).eval()
    cond, state, prompts = _inputs(cfg)
    eager = _act(model, cond, state, prompts)
    model.compile_for_inference()
    compiled = _act(model, cond, state, prompts)
    assert model._compiled_features is not None
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_bf16_video_dit_agrees_with_fp32_within_bf16_tolerance():
    cfg = get_preset("tiny", SMALL)
    torch.manual_seed(0)
    ref = DiT4DiT.from_config(cfg, random_weights=True).eval()
    fast = DiT4DiT.from_config(cfg, random_weights=True).eval()
    fast.load_state_dict(ref.state_dict())
    fast.video_dit.to(torch.bfloat16)
    cond, state, prompts = _inputs(cfg, b=2)
    g = torch.Generator()
    text = ref.encode_text(prompts)
    f32 = ref.extract_features(cond, text, g.manual_seed(1))
    f16 = fast.extract_features(cond, text.to(torch.bfloat16), g.manual_seed(1))
    assert f16.dtype == torch.bfloat16
    rel = (f16.float() - f32).norm() / f32.norm()
    assert rel < 2e-2, rel  # bf16 has ~3 significant digits; a wrong path would be O(1)
    a32 = _act(ref, cond, state, prompts)
    a16 = _act(fast, cond, state, prompts)
    assert (a16 - a32).abs().max() < 0.1 * a32.abs().max()


def test_fast_bf16_path_agrees_with_plain_fp32_autocast_path():
    """`bench inference --dtype bfloat16`: ours (bf16 weights, truncated pass) against the plain
    path (float32-weight copy under bf16 autocast, all blocks, forward hook)."""
    from dit4dit.bench.inference import bench_inference, naive_policy_step, plain_copy

    cfg = get_preset("tiny", SMALL + ["video.num_layers=3", "feature_blocks=2"])
    torch.manual_seed(0)
    fast = DiT4DiT.from_config(cfg, random_weights=True).eval()
    fast.video_dit.to(torch.bfloat16)
    plain = plain_copy(fast)
    assert next(plain.video_dit.parameters()).dtype == torch.float32
    assert next(fast.video_dit.parameters()).dtype == torch.bfloat16
    cond, state, prompts = _inputs(cfg, b=2)
    a_fast = _act(fast, cond, state, prompts)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a_plain = naive_policy_step(plain, cond, state, prompts, generator=torch.Generator().manual_seed(3)).float()
    assert (a_fast - a_plain).abs().max() < 0.1 * a_plain.abs().max()
    r = bench_inference(fast, iters=1, warmup=0, plain_model=plain, plain_autocast=torch.bfloat16)
    assert r["naive_precision"] == "float32 weights under bfloat16 autocast"
    assert r["precision"] == "bfloat16"
    assert r["max_rel_diff_ours_vs_naive"] < 0.1
