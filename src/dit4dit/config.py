"""Typed, frozen configuration for every part of dit4dit, and the named preset registry.

Every config is a frozen dataclass. Presets are plain functions returning a full `DiT4DiTConfig`;
`override(cfg, ["action.num_layers=8", "lambda_video=0.5"])` applies dotted CLI overrides with
type checking, so the same config system serves `train`, `serve`, `info` and `bench`.

Conventions (see docs/conventions.md):
- flow time `tau` in [0, 1], 0 = data, 1 = noise;
- `feature_blocks = L` means blocks 0..L-1 are run (the paper's "layer 18" is `feature_blocks=18`).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Literal

# --------------------------------------------------------------------------------------------
# Part configs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoDiTConfig:
    """Arguments of `diffusers.CosmosTransformer3DModel`, spelled out (never rely on its defaults).

    `in_channels` counts the latent channels plus the condition-mask channel, as in the
    official checkpoints (16 + 1 = 17 for the 2B model).
    """

    in_channels: int = 17
    out_channels: int = 16
    num_attention_heads: int = 16
    attention_head_dim: int = 128
    num_layers: int = 28
    mlp_ratio: float = 4.0
    text_embed_dim: int = 1024
    adaln_lora_dim: int = 256
    max_size: tuple[int, int, int] = (128, 240, 240)
    patch_size: tuple[int, int, int] = (1, 2, 2)
    rope_scale: tuple[float, float, float] = (1.0, 3.0, 3.0)
    concat_padding_mask: bool = True
    extra_pos_embed_type: str | None = None
    use_crossattn_projection: bool = True
    crossattn_proj_in_channels: int = 100352
    encoder_hidden_states_channels: int = 1024
    # Multiplier applied to tau before the sinusoidal timestep embedding. The pretrained Cosmos
    # checkpoints take tau unscaled (1.0); a model trained from scratch separates tau far better
    # with 1000 (the sinusoid barely varies over [0, 1] otherwise).
    timestep_scale: float = 1.0
    # fps handed to the rotary embedding (None = image-style temporal positions).
    rope_fps: float | None = None

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        return self.in_channels - 1

    @property
    def text_input_dim(self) -> int:
        """Width of the text embedding the transformer takes (before its own projection)."""
        return self.crossattn_proj_in_channels if self.use_crossattn_projection else self.text_embed_dim

    def diffusers_kwargs(self) -> dict[str, Any]:
        skip = {"timestep_scale", "rope_fps"}
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        for k in ("max_size", "patch_size", "rope_scale"):
            out[k] = tuple(out[k])
        return out


@dataclass(frozen=True)
class ActionDiTConfig:
    """GR00T-N1-style action DiT (docs/design.md, section 4)."""

    num_layers: int = 16
    num_attention_heads: int = 12
    attention_head_dim: int = 64
    cross_attention_dim: int = 2048  # width of the video features
    mlp_hidden: int = 2560  # state encoder / action decoder MLP width
    action_dim: int = 32  # padded
    state_dim: int = 64  # padded
    action_horizon: int = 16
    num_future_tokens: int = 32
    max_seq_len: int = 1024
    dropout: float = 0.2
    # Learned positions added to the video features before cross-attention (Cosmos hidden
    # states carry no absolute position: RoPE only).
    feature_pos_embed: bool = True
    max_feature_tokens: int = 4096
    # The repeated tau_a draws of a sample share its cross-attention K/V (projected once per sample).
    # False repeats the features for every draw instead: the same numbers at the cost of a model
    # without the sharing (the plain step of `bench train`).
    share_feature_kv: bool = True

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


@dataclass(frozen=True)
class CodecConfig:
    """Latent codec: `pixel` (parameter-free space-to-depth), `pca` (space-to-depth + principal
    components fitted on the training frames) or `wan_vae` (frozen Wan2.1 VAE)."""

    kind: Literal["pixel", "pca", "wan_vae"] = "wan_vae"
    pixel_factor: int = 8  # space-to-depth factor of the pixel and pca codecs
    pca_channels: int = 16  # latent channels of the pca codec (principal components per patch)
    # Leading latent channels the video DiT generates for future frames (pca: the top principal
    # components); the other channels are zero in future frames, so only the clean conditioning
    # frames carry them (fine detail the policy reads but the video loss never has to model).
    # None = all channels.
    generated_channels: int | None = None
    path: str | None = None  # folder holding the VAE (diffusers layout); None = `<backbone>/vae`
    subfolder: str | None = "vae"

    @property
    def per_frame(self) -> bool:
        """True for the weightless per-frame codecs (pixel, pca): each frame is encoded alone,
        space-to-depth by `pixel_factor`; the Wan VAE is causal in time and has frozen weights."""
        return self.kind in ("pixel", "pca")

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell along H and W (the Wan2.1 VAE downsamples 8x)."""
        return self.pixel_factor if self.per_frame else 8


@dataclass(frozen=True)
class TextConfig:
    """Text conditioning: `tiny` (small trainable encoder) or `cosmos_reason1` (frozen Qwen2.5-VL)."""

    kind: Literal["tiny", "cosmos_reason1"] = "cosmos_reason1"
    path: str | None = None  # Qwen2.5-VL folder; None = `<backbone>/text_encoder`
    max_length: int = 512
    # tiny encoder
    width: int = 64
    num_layers: int = 2
    num_heads: int = 4


@dataclass(frozen=True)
class InputConfig:
    """What one training sample / one policy call holds (the evaluation protocol of a model)."""

    cameras: tuple[str, ...] = ("image",)
    camera_layout: Literal["side_by_side", "single"] = "single"
    image_size: tuple[int, int] = (224, 224)  # (H, W) of the combined image
    num_cond_frames: int = 1
    num_future_frames: int = 8
    frame_stride: int = 1  # dataset frames between consecutive future frames
    fps: float = 10.0

    @property
    def num_frames(self) -> int:
        return self.num_cond_frames + self.num_future_frames


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and run settings (the 2B recipe of the paper's appendix: docs/design.md, section 5)."""

    steps: int = 100_000
    batch_size: int = 8  # per process
    grad_accum: int = 1
    lr_video: float = 1e-5
    lr_action: float = 1e-4
    lr_other: float = 1e-4  # trainable text encoder and anything else
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-8
    warmup_steps: int = 5_000
    min_lr: float = 5e-7
    grad_clip: float = 1.0
    ema_decay: float | None = None  # EMA of the trainable weights (used for inference when set)
    precision: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    seed: int = 0
    num_workers: int = 2
    log_every: int = 10
    save_every: int = 1_000
    keep_last: int = 3
    image_every: int = 0  # every N steps log predicted vs real future frames (0 = off)
    eval_every: int = 0  # every N steps a closed-loop evaluation (0 = off)
    fused_adam: bool = True  # fused AdamW (CUDA and CPU)
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"  # auto: FSDP2 for the 2B model, DDP otherwise
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "dit4dit"
    # --- staged training (the `decoupled` baseline) and data subsets ---
    # A run / checkpoint folder (`--init`) that initialises the model before step 1, tensor by
    # tensor (EMA weights when saved): names and shapes that match load, the rest stay fresh; a
    # data-fitted codec comes with it. Optimiser, schedule and step start fresh. Ignored when resuming.
    init_from: str | None = None
    # Only these parts of `init_from` load (e.g. ["video_dit", "text_encoder"]: a pretrained
    # encoder, a fresh action DiT); empty = every part. A fitted codec always loads.
    init_parts: tuple[str, ...] = ()
    # --- action-free video (`--video-dataset`): LeRobot datasets or folders of video files ---
    # Co-training: each batch holds round(video_data_fraction * batch_size) rows of this video,
    # which feed the video loss only (never the action loss); in mode=video_only every source,
    # `--dataset` included, is read as action-free video.
    video_datasets: tuple[str, ...] = ()
    video_data_fraction: float = 0.5
    default_instruction: str | None = None  # for video files that instructions.json does not name
    skip_bad_videos: bool = False  # log and skip unreadable, truncated or too-short videos instead of stopping
    # Freeze the video DiT (and a trainable text encoder, which only conditions it): no gradient,
    # no optimiser state, its weights still saved with the checkpoint. Needs mode=action_only and
    # feature_grad=detached (stage 2 of the decoupled baseline).
    freeze_video: bool = False
    # Train on the first N episodes of each task of the dataset (the demonstrations ablation);
    # None = every episode. Normalisation statistics are computed on the same subset.
    episodes_per_task: int | None = None
    # Oversample tasks: entries "TEXT=K" repeat the episodes of every task whose instruction
    # contains TEXT (case-insensitive) K times per epoch, e.g. ("push=2",). Statistics ignore it.
    task_repeats: tuple[str, ...] = ()
    # Per-task demonstrations: entries "TEXT=N" train on the first N episodes of every task whose
    # instruction contains TEXT (case-insensitive; the first matching entry counts), e.g.
    # ("push=200", "button=80"); tasks no entry matches follow `episodes_per_task`. Statistics too.
    task_episodes: tuple[str, ...] = ()
    # Wall-time budget (minutes) of one `train` invocation: once the step time is known, the run
    # plans as many steps as fit (at most `steps`); the cosine schedule ends, and the run stops with
    # a checkpoint, at the planned step. None = run `steps` steps whatever they take.
    time_budget_minutes: float | None = None


def parse_task_repeat(entry: str, field: str = "train.task_repeats") -> tuple[str, int]:
    """``"TEXT=K"`` (an entry of ``train.task_repeats`` or ``train.task_episodes``) -> (text, K)."""
    text, sep, k = str(entry).rpartition("=")
    if not sep or not text.strip() or not k.strip().isdigit() or int(k) < 1:
        raise ValueError(f"{field} entry {entry!r} must read TEXT=K with K a positive integer, "
                         f"e.g. push=2")
    return text.strip(), int(k)


@dataclass(frozen=True)
class Losses:
    """Which flow-matching losses a training step computes: `DiT4DiTConfig.losses()`, the one rule the
    model's loss and the memory estimate both follow.

    - `video`: the video DiT's loss on the future frames at `tau_v` (mode=video_only, or mode=joint
      with lambda_video > 0, with the video DiT as feature encoder);
    - `action`: the action DiT's loss on features at `tau_f` (mode=joint or action_only), on the
      labelled rows only;
    - `image`: the static image encoder's pretraining loss, denoising the current frame (mode=image_only).

    `video` and `image` are the feature encoder's own generative objective (`generative`). Rows of
    action-free video (`has_actions` False) feed that objective only: a batch holding them needs it,
    and the action loss needs at least one labelled row (`check_rows`).
    """

    video: bool
    action: bool
    image: bool
    lambda_video: float  # weight of the video loss in the total when the action loss runs too
    mode: str  # for messages
    encoder: str

    @property
    def generative(self) -> bool:
        """Whether the feature encoder's own generative loss (video or image) runs."""
        return self.video or self.image

    @property
    def names(self) -> frozenset[str]:
        """The loss terms, as `DiT4DiT.loss` names them in its logs (besides the total "loss")."""
        return frozenset(n for n, on in (("loss_video", self.video), ("loss_action", self.action),
                                          ("loss_image", self.image)) if on)

    def check_rows(self, num_labelled: int, num_free: int) -> None:
        """ValueError when a batch with `num_labelled` labelled and `num_free` action-free rows
        cannot train these losses."""
        if self.action and num_labelled == 0:
            raise ValueError(f"mode={self.mode} needs labelled rows, but every row of this batch is action-free "
                             f"video (has_actions all False)")
        if num_free and not self.generative:
            setting = (f"encoder={self.encoder} (no video loss)" if self.encoder != "video_dit"
                       else f"mode={self.mode} with lambda_video={self.lambda_video}")
            raise ValueError(f"this batch holds {num_free} rows of action-free video, which only the video loss "
                             f"uses, but {setting} has none")

    def total(self, parts: dict[str, Any]) -> Any:
        """The training objective from the terms in `parts`: L_action + lambda * L_video when both run
        (the paper's Eq. 10), else the one term that runs."""
        if self.action and self.video:
            return parts["loss_action"] + self.lambda_video * parts["loss_video"]
        (name,) = self.names
        return parts[name]


@dataclass(frozen=True)
class DiT4DiTConfig:
    name: str = "custom"
    video: VideoDiTConfig = field(default_factory=VideoDiTConfig)
    action: ActionDiTConfig = field(default_factory=ActionDiTConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    text: TextConfig = field(default_factory=TextConfig)
    inputs: InputConfig = field(default_factory=InputConfig)

    # --- feature extraction ---
    feature_blocks: int = 18  # number of video-DiT blocks run for the features (paper: layer 18)
    tau_f: float = 0.995  # fixed feature flow time (first sigma of the Cosmos scheduler, 1 step)
    tau_f_buckets: int | None = None  # Algorithm 1: draw tau_f from {0/T, ..., T/T} during training
    feature_denoise_steps: int = 1  # Euler steps of the video DiT before extraction (ablation)
    feature_grad: Literal["end_to_end", "detached"] = "end_to_end"
    # "last": hidden states after block `feature_blocks`; "mean": the mean of the hidden states
    # after each of blocks 1..feature_blocks (the paper's "all" layers with feature_blocks=num_layers).
    feature_pool: Literal["last", "mean"] = "last"
    # Where the action DiT's features come from: the video DiT (DiT4DiT), or a static image-text
    # transformer of the same width and depth reading the conditioning frame(s) and the
    # instruction only (the paper's parameter-matched Qwen3DiT baseline at our scale; no video loss).
    encoder: Literal["video_dit", "static_image"] = "video_dit"

    # --- losses ---
    # image_only: the static image encoder's pretraining objective (encoder=static_image): denoise the
    # current frame's latents by flow matching; the future is never read (the video-prior study).
    mode: Literal["joint", "action_only", "video_only", "image_only"] = "joint"
    lambda_video: float = 1.0
    tau_a_alpha: float = 1.5
    tau_a_beta: float = 1.0
    tau_a_scale: float = 0.999  # tau_a = Beta(alpha, beta) / scale (clamped to 1)
    repeated_diffusion_steps: int = 4
    # Fraction of the batch that carries the video loss (1.0 = every sample); thinning it is a
    # throughput lever for small CPU runs.
    video_loss_fraction: float = 1.0
    share_video_passes: bool = True  # run tau_v and tau_f passes as one batched forward

    # --- inference ---
    num_action_steps: int = 4
    num_video_steps: int = 10

    # --- memory ---
    gradient_checkpointing: bool = False

    # --- data and training ---
    schema: str = "metaworld_sawyer"  # embodiment schema (dit4dit.data.schema)
    normalization: Literal["min_max", "quantile"] = "min_max"
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiT4DiTConfig":
        return _from_dict(cls, d, "config")

    def validate(self) -> "DiT4DiTConfig":
        errs = []
        if not 1 <= self.feature_blocks <= self.video.num_layers:
            errs.append(f"feature_blocks={self.feature_blocks} must be in [1, video.num_layers={self.video.num_layers}]")
        if not 0.0 <= self.tau_f <= 1.0:
            errs.append(f"tau_f={self.tau_f} must be in [0, 1]")
        if self.tau_f_buckets is not None and self.tau_f_buckets < 1:
            errs.append(f"tau_f_buckets={self.tau_f_buckets} must be >= 1")
        if self.action.cross_attention_dim != self.video.width:
            errs.append(
                f"action.cross_attention_dim={self.action.cross_attention_dim} must equal the video DiT width "
                f"{self.video.width}"
            )
        if self.repeated_diffusion_steps < 1:
            errs.append("repeated_diffusion_steps must be >= 1")
        if not 0.0 < self.video_loss_fraction <= 1.0:
            errs.append(f"video_loss_fraction={self.video_loss_fraction} must be in (0, 1]")
        if self.lambda_video < 0:
            errs.append("lambda_video must be >= 0")
        if self.num_action_steps < 1 or self.num_video_steps < 1 or self.feature_denoise_steps < 1:
            errs.append("step counts must be >= 1")
        if self.codec.per_frame:
            f = self.codec.pixel_factor
            want = (3 * f * f if self.codec.kind == "pixel" else self.codec.pca_channels) + 1
            if self.codec.kind == "pca" and not 1 <= self.codec.pca_channels <= 3 * f * f:
                errs.append(f"codec.pca_channels={self.codec.pca_channels} must be in [1, {3 * f * f}] (3 x {f} x {f})")
            if self.video.in_channels != want:
                errs.append(f"{self.codec.kind} codec with factor {f} gives {want - 1} latent channels; "
                            f"video.in_channels must be {want}")
            h, w = self.inputs.image_size
            ph, pw = self.video.patch_size[1:]
            if h % (f * ph) or w % (f * pw):
                errs.append(f"inputs.image_size={self.inputs.image_size} must be divisible by {f}x patch {ph}")
        g = self.codec.generated_channels
        if g is not None:
            if self.codec.kind != "pca":
                errs.append(f"codec.generated_channels needs the pca codec (ordered components), not {self.codec.kind!r}")
            elif isinstance(g, bool) or not isinstance(g, int) or not 1 <= g <= self.codec.pca_channels:
                errs.append(f"codec.generated_channels={g!r} must be an int in [1, codec.pca_channels="
                            f"{self.codec.pca_channels}]")
        if self.video.out_channels != self.video.in_channels - 1:
            errs.append(f"video.out_channels={self.video.out_channels} must be video.in_channels - 1 = "
                        f"{self.video.in_channels - 1} (the latent channels; the last input is the condition mask)")
        if self.codec.kind == "wan_vae" and self.video.in_channels != 17:
            errs.append("the Wan2.1 VAE has 16 latent channels; video.in_channels must be 17")
        if self.inputs.num_cond_frames < 1 or self.inputs.num_future_frames < 1:
            errs.append("inputs need at least one conditioning and one future frame")
        if self.mode not in ("joint", "action_only", "video_only", "image_only"):
            errs.append(f"mode={self.mode!r} must be joint | action_only | video_only | image_only")
        if self.mode == "image_only" and self.encoder != "static_image":
            errs.append("mode=image_only pretrains the static image encoder (denoising the current frame): it "
                        "needs encoder=static_image; the video DiT's action-free objective is mode=video_only")
        if self.feature_grad not in ("end_to_end", "detached"):
            errs.append(f"feature_grad={self.feature_grad!r} must be end_to_end | detached")
        if self.feature_pool not in ("last", "mean"):
            errs.append(f"feature_pool={self.feature_pool!r} must be last | mean")
        if self.encoder not in ("video_dit", "static_image"):
            errs.append(f"encoder={self.encoder!r} must be video_dit | static_image")
        if self.encoder == "static_image":
            if self.mode == "video_only":
                errs.append("encoder=static_image has no video model: mode must be action_only (or joint, which "
                            "then means the action loss alone), or image_only to pretrain it on frames")
            if self.feature_grad != "end_to_end":
                errs.append("encoder=static_image is trained through the action loss only: feature_grad must be "
                            "end_to_end (detached would leave the image encoder untrained)")
            if self.train.freeze_video:
                errs.append("train.freeze_video freezes the video DiT, which encoder=static_image does not have")
        if self.train.freeze_video and (self.mode != "action_only" or self.feature_grad != "detached"):
            errs.append(f"train.freeze_video=true trains the action DiT alone on a frozen video DiT: it needs "
                        f"mode=action_only and feature_grad=detached (got mode={self.mode}, "
                        f"feature_grad={self.feature_grad})")
        if self.train.time_budget_minutes is not None and not self.train.time_budget_minutes > 0:
            errs.append(f"train.time_budget_minutes={self.train.time_budget_minutes} must be > 0 (or null)")
        for field in ("task_repeats", "task_episodes"):
            for entry in getattr(self.train, field):
                try:
                    parse_task_repeat(entry, f"train.{field}")
                except ValueError as e:
                    errs.append(str(e))
        if not 0.0 < self.train.video_data_fraction < 1.0:
            errs.append(f"train.video_data_fraction={self.train.video_data_fraction} must be in (0, 1): the share "
                        f"of each batch drawn from the action-free video")
        if self.train.video_datasets and self.mode not in ("video_only", "image_only"):
            n_free = round(self.train.video_data_fraction * self.train.batch_size)
            if not 1 <= n_free <= self.train.batch_size - 1:
                errs.append(f"train.video_data_fraction={self.train.video_data_fraction} of train.batch_size="
                            f"{self.train.batch_size} gives {n_free} action-free rows; each batch needs at least "
                            f"one action-free and one labelled row")
            if self.mode != "joint" or self.lambda_video <= 0 or self.encoder != "video_dit":
                errs.append(f"action-free video (train.video_datasets) trains the video loss only: it needs "
                            f"mode=joint with lambda_video > 0 and encoder=video_dit (or mode=video_only), got "
                            f"mode={self.mode}, lambda_video={self.lambda_video}, encoder={self.encoder}")
        if self.train.episodes_per_task is not None and self.train.episodes_per_task < 1:
            errs.append(f"train.episodes_per_task={self.train.episodes_per_task} must be >= 1 (or null for all)")
        t = self.train
        if t.steps < 1 or t.batch_size < 1 or t.grad_accum < 1:
            errs.append("train.steps, train.batch_size and train.grad_accum must be >= 1")
        if min(t.lr_video, t.lr_action, t.lr_other) < 0 or t.min_lr < 0:
            errs.append("learning rates must be >= 0")
        if t.warmup_steps < 0 or t.keep_last < 1 or t.save_every < 1 or t.log_every < 1:
            errs.append("train.warmup_steps >= 0, train.keep_last/save_every/log_every >= 1")
        if t.ema_decay is not None and not 0.0 < t.ema_decay < 1.0:
            errs.append(f"train.ema_decay={t.ema_decay} must be in (0, 1)")
        if errs:
            raise ConfigError(f"invalid config {self.name!r}:\n  - " + "\n  - ".join(errs))
        return self

    def losses(self) -> Losses:
        """Which losses a training step computes (see `Losses`)."""
        video_dit = self.encoder == "video_dit"
        video = video_dit and (self.mode == "video_only" or (self.mode == "joint" and self.lambda_video > 0))
        return Losses(video=video, action=self.mode in ("joint", "action_only"), image=self.mode == "image_only",
                      lambda_video=self.lambda_video, mode=self.mode, encoder=self.encoder)


class ConfigError(ValueError):
    """An invalid configuration value (named in the message)."""


# --------------------------------------------------------------------------------------------
# dict <-> dataclass and CLI overrides
# --------------------------------------------------------------------------------------------


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, where)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        last: Exception | None = None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                last = e
        raise ConfigError(f"{where}: {value!r} does not fit {tp}") from last
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    return value


def _from_dict(cls: Any, d: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; valid keys: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in d.items()}
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        if low in ("none", "null"):
            return None
        if "," in text:
            return [_parse_value(t) for t in text.split(",")]
        return text


def override(cfg: Any, assignments: list[str] | tuple[str, ...]) -> Any:
    """Apply `key.sub=value` assignments (values parsed as JSON where possible)."""
    for item in assignments:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE (for example action.num_layers=8)")
        key, text = item.split("=", 1)
        cfg = _set_path(cfg, key.strip().split("."), _parse_value(text.strip()), key)
    return cfg


def _set_path(obj: Any, path: list[str], value: Any, full: str) -> Any:
    hints = typing.get_type_hints(type(obj))
    head = path[0]
    if head not in hints:
        valid = sorted(f.name for f in fields(obj))
        raise ConfigError(f"override {full!r}: {type(obj).__name__} has no field {head!r}; valid: {valid}")
    if len(path) == 1:
        new = _coerce(hints[head], value, full)
    else:
        new = _set_path(getattr(obj, head), path[1:], value, full)
    return replace(obj, **{head: new})


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

PRESETS: dict[str, Callable[[], DiT4DiTConfig]] = {}


def register_preset(name: str) -> Callable[[Callable[[], DiT4DiTConfig]], Callable[[], DiT4DiTConfig]]:
    def deco(fn: Callable[[], DiT4DiTConfig]) -> Callable[[], DiT4DiTConfig]:
        PRESETS[name] = fn
        return fn

    return deco


def get_preset(name: str, overrides: list[str] | tuple[str, ...] = ()) -> DiT4DiTConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    cfg = override(PRESETS[name](), overrides)
    return cfg.validate()


@register_preset("cosmos-2b")
def _cosmos_2b() -> DiT4DiTConfig:
    """The paper's model: Cosmos-Predict2.5-2B video DiT + DiT-B action DiT, one 224x224 view."""
    return DiT4DiTConfig(
        name="cosmos-2b",
        video=VideoDiTConfig(),
        action=ActionDiTConfig(),
        codec=CodecConfig(kind="wan_vae"),
        text=TextConfig(kind="cosmos_reason1"),
        inputs=InputConfig(cameras=("image",), camera_layout="single", image_size=(224, 224),
                           num_cond_frames=1, num_future_frames=8, fps=16.0),
        feature_blocks=18,
        gradient_checkpointing=True,
    )


@register_preset("libero")
def _libero() -> DiT4DiTConfig:
    """LIBERO input shape: primary + wrist views side by side (224 x 448), 1 + 4 frames every second
    dataset frame (frames 0, 2, 4, 6, 8: the reference's action_video_freq_ratio 2), horizon 8."""
    base = _cosmos_2b()
    return replace(
        base,
        name="libero",
        schema="libero_franka",
        action=replace(base.action, action_horizon=8),
        inputs=InputConfig(cameras=("image", "wrist_image"), camera_layout="side_by_side",
                           image_size=(224, 448), num_cond_frames=1, num_future_frames=4, frame_stride=2,
                           fps=20.0),
    )


@register_preset("robocasa-gr1")
def _robocasa_gr1() -> DiT4DiTConfig:
    """RoboCasa-GR1 input shape: one ego view 224 x 224, 1 + 8 frames every second dataset frame
    (frames 0, 2, ..., 16: the reference's action_video_freq_ratio 2), horizon 16."""
    base = _cosmos_2b()
    return replace(
        base,
        name="robocasa-gr1",
        schema="robocasa_gr1",
        inputs=InputConfig(cameras=("ego_view",), camera_layout="single", image_size=(224, 224),
                           num_cond_frames=1, num_future_frames=8, frame_stride=2, fps=20.0),
    )


@register_preset("tiny")
def _tiny() -> DiT4DiTConfig:
    """A few-million-parameter model trained from scratch on CPU: pca codec (32 channels per 8 x 8
    patch, fitted on the training frames, so a 2 x 2 patch token holds 128 values, the model's
    width), tiny text encoder."""
    video = VideoDiTConfig(
        in_channels=32 + 1,
        out_channels=32,
        num_attention_heads=4,
        attention_head_dim=32,
        num_layers=4,
        mlp_ratio=4.0,
        text_embed_dim=128,
        adaln_lora_dim=32,
        max_size=(32, 64, 64),
        patch_size=(1, 2, 2),
        rope_scale=(1.0, 1.0, 1.0),
        concat_padding_mask=True,
        extra_pos_embed_type=None,
        use_crossattn_projection=False,
        crossattn_proj_in_channels=128,
        encoder_hidden_states_channels=128,
        timestep_scale=1000.0,
    )
    action = ActionDiTConfig(
        num_layers=4,
        num_attention_heads=4,
        attention_head_dim=32,
        cross_attention_dim=video.width,
        mlp_hidden=256,
        action_horizon=8,
        num_future_tokens=8,
        max_seq_len=128,
        dropout=0.1,
        max_feature_tokens=1024,
    )
    return DiT4DiTConfig(
        name="tiny",
        video=video,
        action=action,
        codec=CodecConfig(kind="pca", pixel_factor=8, pca_channels=32),
        text=TextConfig(kind="tiny", max_length=32, width=128, num_layers=1, num_heads=4),
        inputs=InputConfig(cameras=("image",), camera_layout="single", image_size=(64, 64),
                           num_cond_frames=1, num_future_frames=2, frame_stride=4, fps=20.0),
        feature_blocks=3,
        tau_f=0.995,
        lambda_video=1.0,
        repeated_diffusion_steps=4,
        gradient_checkpointing=False,
        schema="metaworld_sawyer",
        train=TrainConfig(steps=2_000, batch_size=32, lr_video=1e-3, lr_action=1e-3, lr_other=1e-3,
                          weight_decay=1e-4, warmup_steps=100, min_lr=1e-5, ema_decay=0.995,
                          num_workers=1, log_every=25, save_every=500, keep_last=2),
    )


def preset_names() -> list[str]:
    return sorted(PRESETS)
