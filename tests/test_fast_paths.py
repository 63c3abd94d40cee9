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
    model = DiT4DiT.from_config(cfg).eval()
    cond, state, prompts = _inputs(cfg)
    eager = _act(model, cond, state, prompts)
    model.compile_for_inference()
    compiled = _act(model, cond, state, prompts)
    assert model._compiled_features is not None
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_bf16_video_dit_agrees_with_fp32_within_bf16_tolerance():
    cfg = get_preset("tiny", SMALL)
    torch.manual_seed(0)
    ref = DiT4DiT.from_config(cfg).eval()
    fast = DiT4DiT.from_config(cfg).eval()
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
