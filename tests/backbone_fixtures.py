"""A tiny Cosmos-Predict2.5 backbone folder in the official diffusers layout, and a matching config.

The folder is written by `write_tiny_backbone` with diffusers' and transformers' own
`save_pretrained` (so the production loaders in `dit4dit.models.backbone` read it as they read the
2B checkpoint): `model_index.json` (Cosmos2_5_PredictBasePipeline),
`transformer/` (CosmosTransformer3DModel, 4 blocks of 2 x 16), `vae/` (AutoencoderKLWan, base_dim 8,
non-trivial latent statistics), `scheduler/` (UniPCMultistepScheduler), `text_encoder/` (a 3-layer
Qwen2.5-VL of width 32) and `tokenizer/` (a byte-level BPE trained offline).

    from backbone_fixtures import make_backbone, tiny_cfg, TINY_SETS
    root = make_backbone(tmp_path / "bb")
    cfg = tiny_cfg("train.steps=2")           # cosmos-2b + TINY_OVERRIDES (+ extra overrides)
    main(["train", "--preset", "cosmos-2b", *TINY_SETS, ...])
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from dit4dit.config import get_preset
from dit4dit.jsonio import write_json
from dit4dit.models.backbone import MODEL_INDEX

__all__ = ["TINY_OVERRIDES", "TINY_SETS", "TINY_TRANSFORMER", "TINY_VAE", "TRAIN_OVERRIDES", "make_backbone",
           "nearest_resize_shim", "tiny_cfg", "tiny_qwen", "tiny_tokenizer", "write_tiny_backbone"]


TINY_TEXT_LAYERS, TINY_TEXT_HIDDEN = 3, 32
TINY_TRANSFORMER: dict[str, Any] = dict(
    in_channels=17, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=4, mlp_ratio=4.0,
    text_embed_dim=32, adaln_lora_dim=8, max_size=(8, 16, 16), patch_size=(1, 2, 2), rope_scale=(1.0, 3.0, 3.0),
    concat_padding_mask=True, extra_pos_embed_type=None, use_crossattn_projection=True,
    crossattn_proj_in_channels=TINY_TEXT_LAYERS * TINY_TEXT_HIDDEN, encoder_hidden_states_channels=32,
)
TINY_VAE: dict[str, Any] = dict(
    base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
    temperal_downsample=[False, True, True],
    # non-trivial statistics: dividing and multiplying by std differ clearly
    latents_mean=[0.1 * i - 0.7 for i in range(16)], latents_std=[0.4 + 0.3 * i for i in range(16)],
)


def _override_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_override_value(x) for x in v) + "]"
    return json.dumps(v)


# Overrides of the `cosmos-2b` preset (or any preset built on it) that match `write_tiny_backbone`:
# 32 x 32 frames, 1 + 4 frames (2 latent frames for the causal VAE), a small action DiT.
TINY_OVERRIDES: tuple[str, ...] = tuple(
    [f"video.{k}={_override_value(v)}" for k, v in TINY_TRANSFORMER.items()]
    + ["feature_blocks=2", "codec.kind=wan_vae", "text.kind=cosmos_reason1",
       "action.num_layers=2", "action.num_attention_heads=2", "action.attention_head_dim=16",
       f"action.cross_attention_dim={TINY_TRANSFORMER['num_attention_heads'] * TINY_TRANSFORMER['attention_head_dim']}",
       "action.mlp_hidden=64", "action.action_horizon=4", "action.num_future_tokens=4", "action.max_seq_len=64",
       "action.dropout=0.0", "action.max_feature_tokens=256",
       "inputs.image_size=[32,32]", "inputs.num_cond_frames=1", "inputs.num_future_frames=4", "inputs.frame_stride=1",
       "gradient_checkpointing=false", "repeated_diffusion_steps=2", "schema=metaworld_sawyer"]
)

_TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


def tiny_tokenizer(corpus: Sequence[str] = (), chat_template: str | None = None) -> Any:
    """A Qwen2 tokenizer with a byte-level BPE vocabulary trained offline on `corpus` (any text
    tokenizes: the byte alphabet is always in the vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    from dit4dit.models.text import COSMOS_SYSTEM_PROMPT, QWEN2_5_VL_CHAT_TEMPLATE

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=_TINY_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(corpus) + [COSMOS_SYSTEM_PROMPT, "system user assistant"], trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]
    tok = Qwen2Tokenizer(vocab=bpe.get_vocab(), merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         additional_special_tokens=_TINY_SPECIALS[1:])
    tok.chat_template = chat_template if chat_template is not None else QWEN2_5_VL_CHAT_TEMPLATE
    return tok


def tiny_qwen(tokenizer: Any, num_layers: int = TINY_TEXT_LAYERS, hidden: int = TINY_TEXT_HIDDEN, seed: int = 0) -> Any:
    """A tiny `Qwen2_5_VLForConditionalGeneration` for `tokenizer` (weights perturbed away from the init)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
            bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden,
                           fullatt_block_indexes=[0]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # norm weights are all ones at init: make the layers differ clearly
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def write_tiny_backbone(root: str | os.PathLike, *, seed: int = 0, corpus: Sequence[str] = (),
                        text_encoder: bool = True, transformer: Mapping[str, Any] | None = None,
                        vae: Mapping[str, Any] | None = None) -> Path:
    """Write a complete tiny Cosmos-Predict2.5 folder (official layout, each component written by
    its library's own `save_pretrained`) to `root`; returns `root`. Matches `TINY_OVERRIDES`.

    `corpus`: text the tokenizer's BPE merges are trained on (any text tokenizes anyway).
    `text_encoder=False` leaves out `text_encoder/` and `tokenizer/`. `transformer` / `vae`
    override entries of `TINY_TRANSFORMER` / `TINY_VAE`.
    """
    import diffusers
    from diffusers import AutoencoderKLWan, CosmosTransformer3DModel, UniPCMultistepScheduler

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        tcfg = {**TINY_TRANSFORMER, **(transformer or {})}
        CosmosTransformer3DModel(**tcfg).save_pretrained(root / "transformer")
        AutoencoderKLWan(**{**TINY_VAE, **(vae or {})}).save_pretrained(root / "vae")
    UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0).save_pretrained(
        root / "scheduler")
    index: dict[str, Any] = {
        "_class_name": "Cosmos2_5_PredictBasePipeline",
        "_diffusers_version": diffusers.__version__,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "transformer": ["diffusers", "CosmosTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    if text_encoder:
        tok = tiny_tokenizer(corpus)
        tiny_qwen(tok, seed=seed).save_pretrained(root / "text_encoder")
        tok.save_pretrained(root / "tokenizer")
        index["text_encoder"] = ["transformers", "Qwen2_5_VLForConditionalGeneration"]
        index["tokenizer"] = ["transformers", "Qwen2Tokenizer"]
    write_json(root / MODEL_INDEX, index, indent=2, sort_keys=True)
    return root


# Small, fast training settings for the tiny backbone config.
TRAIN_OVERRIDES = ("train.steps=1", "train.batch_size=2", "train.num_workers=0", "train.log_every=1",
                   "train.warmup_steps=1", "train.save_every=1", "train.tensorboard=false")
# The same overrides as `--set` arguments of the command line.
TINY_SETS = [a for o in TINY_OVERRIDES for a in ("--set", o)]


def tiny_cfg(*extra: str):
    """`cosmos-2b` with `TINY_OVERRIDES` (matches `make_backbone`) and `extra` overrides."""
    return get_preset("cosmos-2b", list(TINY_OVERRIDES) + list(extra))


def make_backbone(root: str | Path, *, seed: int = 0, corpus=(), **kwargs) -> Path:
    """Write the tiny backbone folder to `root` (see the module docstring)."""
    return write_tiny_backbone(root, seed=seed, corpus=corpus, **kwargs)


def nearest_resize_shim():
    """The diffusers Cosmos forward resizes `padding_mask` with torchvision, which has no CPU wheel
    for our torch; an equivalent nearest-neighbour resize lets the reference forward run."""

    def resize(img, size, interpolation=None):
        return F.interpolate(img, size=tuple(size), mode="nearest")

    functional = types.SimpleNamespace(resize=resize)
    return types.SimpleNamespace(functional=functional, InterpolationMode=types.SimpleNamespace(NEAREST="nearest"))


def frames(b: int, t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1
