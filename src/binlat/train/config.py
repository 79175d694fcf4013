"""Training configuration: one JSON file per run (presets live in configs/{tokenizer,diffusion,ar}/)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .. import registry
from ..config import check_number, config_from_dict
from ..processes.common import MAX_STEPS
from .optimizers import OPTIMIZERS

MAX_STEP = 10**9  # training steps (and checkpoint steps): far past any run, well inside every counter


@dataclass
class TokenizerTraining:
    l1_weight: float = 1.0  # smooth-L1 reconstruction
    l2_weight: float = 0.0  # optional extra MSE
    gradient_weight: float = 0.0  # L1 on image gradients (edges)
    bit_reg_weight: float = 0.01  # p(1 - p) regulariser
    perceptual_weight: float = 0.0  # needs perceptual_weights (local VGG16 safetensors); off otherwise
    perceptual_weights: str | None = None  # local VGG16 safetensors file for the perceptual loss
    gan_weight: float = 0.0  # adversarial loss (patch discriminator, hinge), adaptive weighting
    gan_start: int = 0  # step at which the adversarial loss switches on
    disc_lr: float = 1e-4  # discriminator learning rate
    tau_start: float = 1.0  # Bernoulli temperature, annealed linearly over tau_steps
    tau_end: float = 1.0  # Bernoulli temperature at the end of tau_steps
    tau_steps: int = 0  # steps over which the temperature anneals (0: tau_end throughout)
    multires_sizes: list[int] = field(default_factory=list)  # random size per batch from this list
    # Soft start: the decoder reads the bit probabilities (a continuous latent) until the training PSNR, averaged
    # over the last soft_window steps, reaches soft_until_psnr dB; sampled bits from then on. A fixed step would
    # switch too early on a slow run (bits slow the escape from the all-white plateau) or too late on a fast one.
    soft_until_psnr: float = 0.0  # 0: bits from the first step
    soft_window: int = 20  # steps averaged for soft_until_psnr
    soft_max_steps: int = 0  # switch at this step at the latest (0: no limit)
    freeze_encoder: bool = False  # decoder-only second stage
    init_from: str | None = None  # start from a tokenizer model directory


@dataclass
class GeneratorTraining:
    tokenizer: str = ""  # trained tokenizer model directory (frozen)
    text_encoder: str = "all-MiniLM-L6-v2"  # frozen text encoder: a local folder or a Hub id (cached)
    text_max_length: int = 128  # caption tokens kept (longer captions are cut)
    prompt_dropout: float = 0.1  # share of captions replaced by "" (classifier-free guidance)
    prediction: str = "flip"  # diffusion: "flip" (epsilon) or "x0"
    time_sampling: str = "logit_normal"  # diffusion: how training times t are drawn (logit_normal | uniform)
    # diffusion, logit_normal: the mean of logit(t). Above 0 trains more on noisy times, where the sampler decides the
    # layout (SD3 shifts its times the same way); 0 is the paper's sigmoid(N(0, 1)), median t 0.5.
    time_logit_mean: float = 0.0
    # AR: each bit of the teacher-forced context is flipped with this probability while the targets stay clean
    # (bitwise self-correction, as in Infinity), so the network learns to recover from its own sampling errors.
    context_flip: float = 0.0
    # diffusion: REPA's weight: block model.align_block's rows are aligned (1 - cosine) to the frozen tokenizer
    # encoder's per-token features of the clean image, through a head the network gains for it (0: off)
    repa_weight: float = 0.0
    # Hard-negative captions (NegCLIP's word-order negatives, for a generator): each position caption "A rel B" is
    # also read with its roles swapped ("B rel A"), and the loss adds this weight times -log sigmoid(NLL under the
    # swapped caption - NLL under its own), per image in nats, from the same noise. A generator otherwise reads the
    # caption as a bag of words: the roles are worth about one bit of an image's likelihood. 0: off.
    role_contrast: float = 0.0
    sample_steps: int = 20  # diffusion steps of sample grids and probe scores
    sample_guidance: float = 3.0  # guidance scale of sample grids and probe scores
    init_from: str | None = None  # start from a generator model directory of this kind (fine-tuning)
    # The run is meant to learn from images without captions: silences the warning that data without captions
    # trains an unconditional generator.
    unconditional: bool = False


SHAPES_SAMPLE_PROMPTS = ["a red circle", "two squares", "a blue triangle to the left of a green circle"]


@dataclass
class TrainConfig:
    kind: str = "tokenizer"  # tokenizer | a registered generator kind (binlat.registry): diffusion, ar
    # Fields of the model's own config class (TokenizerConfig, or the generator kind's: DiffusionConfig, ARConfig),
    # checked as such when the config is read. A generator may leave out what its tokenizer and text encoder fix
    # (num_tokens, num_bits, text_dim, text_layers): `model_config` fills those in when the task is built.
    model: dict[str, Any] = field(default_factory=dict)
    data: str = "shapes"  # --data SPEC: shapes[:options], a folder, a manifest, shards, a precompute folder
    image_size: int = 64  # training images are resized and cropped to this side (px)
    batch_size: int = 32  # global batch per optimiser step (all processes, all accumulation steps)
    grad_accum: int = 1  # micro-batches per optimiser step (batch_size is split among them)
    max_steps: int = 1000  # optimiser steps of the run (--max-steps)
    lr: float = 3e-4  # peak learning rate (after warm-up)
    # adamw | muon (Muon for the weight matrices inside the blocks, AdamW for the rest, one lr: train/optimizers.py)
    optimizer: str = "adamw"
    weight_decay: float = 0.0  # AdamW weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])  # AdamW betas
    warmup_steps: int = 100  # linear learning-rate warm-up from 0 (a short --max-steps run shrinks it)
    lr_schedule: str = "constant"  # constant | cosine (after warm-up)
    min_lr_ratio: float = 0.1  # cosine floor, as a share of lr
    grad_clip: float = 1.0  # gradient-norm clip (0: none)
    ema_decay: float = 0.999  # decay of the EMA weights that samples and export use
    # auto | no | bf16. auto: bf16 autocast where bf16 is native (AMX / AVX-512-BF16 CPUs, bf16 GPUs), else float32
    mixed_precision: str = "auto"
    grad_checkpointing: bool = False  # recompute block activations in the backward (less memory, ~30 % more compute)
    # torch.compile of the training forward (dynamic shapes: caption lengths vary). About 1.2x faster steps on
    # a CPU after a compile of a few minutes; fused kernels round differently, so it is off by default.
    compile: bool = False
    seed: int = 0  # initialisation and every random draw of a sample (keyed by sample index)
    num_workers: int = 0  # DataLoader worker processes
    save_every: int = 500  # steps between checkpoints (and one at the end)
    keep_last: int = 3  # checkpoints kept
    log_every: int = 10  # steps between logged metrics (metrics.jsonl, the progress bar)
    sample_every: int = 0  # 0: no sample grids
    # Prompts of the sample grids; empty: the run's own captions (the first three distinct ones of its data; for the
    # shapes data, SHAPES_SAMPLE_PROMPTS).
    sample_prompts: list[str] = field(default_factory=list)
    max_bad_steps: int = 20  # consecutive non-finite losses before the run stops
    # Samples skipped in a row (unreadable, corrupt) before the run stops naming the data: data that is all bad
    # would otherwise loop for ever.
    max_consecutive_skips: int = 1000
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])  # add "wandb" if installed
    tokenizer: TokenizerTraining = field(default_factory=TokenizerTraining)
    generator: GeneratorTraining = field(default_factory=GeneratorTraining)

    def __post_init__(self) -> None:
        kinds = registry.model_kinds()
        if self.kind not in kinds:
            raise ValueError(f"kind must be {', '.join(kinds[:-1])} or {kinds[-1]}, got {self.kind!r}")
        for name in (
            "batch_size",
            "grad_accum",
            "max_steps",
            "save_every",
            "keep_last",
            "log_every",
            "image_size",
            "max_bad_steps",
            "max_consecutive_skips",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self._check_numbers()
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.mixed_precision not in ("auto", "no", "bf16"):
            raise ValueError(f"mixed_precision must be 'auto', 'no' or 'bf16', got {self.mixed_precision!r}")
        if not 0 <= self.generator.prompt_dropout <= 1:
            raise ValueError("generator.prompt_dropout must lie in [0, 1]")
        for option in ("repa_weight", "time_logit_mean"):
            if getattr(self.generator, option) and self.kind != "diffusion":
                raise ValueError(f"generator.{option} is a diffusion option; kind {self.kind} takes 0")
        if self.generator.role_contrast < 0:
            raise ValueError(f"generator.role_contrast must be >= 0, got {self.generator.role_contrast}")
        if not 0 <= self.generator.context_flip < 0.5:
            raise ValueError(f"generator.context_flip must lie in [0, 0.5), got {self.generator.context_flip}")
        self.model_config(image_size=self.image_size)  # a wrong key or value fails here, not at build time

    def _check_numbers(self) -> None:
        """Every number in range and finite (an lr of Infinity would "train" to non-finite weights and save them);
        errors name the key as --set spells it."""
        integers = {
            "max_steps": (1, MAX_STEP),
            "warmup_steps": (0, MAX_STEP),
            "save_every": (1, MAX_STEP),
            "log_every": (1, MAX_STEP),
            "sample_every": (0, MAX_STEP),
            "num_workers": (0, 1024),
            "seed": (0, 2**32 - 1),
            "tokenizer.gan_start": (0, MAX_STEP),
            "tokenizer.tau_steps": (0, MAX_STEP),
            "tokenizer.soft_window": (1, MAX_STEP),
            "tokenizer.soft_max_steps": (0, MAX_STEP),
            "generator.text_max_length": (1, 1 << 20),
            "generator.sample_steps": (1, MAX_STEPS),
        }
        for name, (low, high) in integers.items():
            check_number(name, self._get(name), low, high, integer=True)
        check_number("lr", self.lr, 0, low_open=True)
        check_number("tokenizer.disc_lr", self.tokenizer.disc_lr, 0, low_open=True)
        for name in (
            "weight_decay",
            "grad_clip",
            "tokenizer.l1_weight",
            "tokenizer.l2_weight",
            "tokenizer.gradient_weight",
            "tokenizer.bit_reg_weight",
            "tokenizer.perceptual_weight",
            "tokenizer.gan_weight",
            "tokenizer.soft_until_psnr",
            "generator.sample_guidance",
        ):
            check_number(name, self._get(name), 0)
        check_number("min_lr_ratio", self.min_lr_ratio, 0, 1)
        check_number("generator.time_logit_mean", self.generator.time_logit_mean, -5, 5)  # median t 0.007 to 0.993
        check_number("ema_decay", self.ema_decay, 0, 1, high_open=True)
        for name in ("tokenizer.tau_start", "tokenizer.tau_end"):
            check_number(name, self._get(name), 0, low_open=True)
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers, got {list(self.betas)}")
        for i, beta in enumerate(self.betas):
            check_number(f"betas[{i}]", beta, 0, 1, high_open=True)
        for i, size in enumerate(self.tokenizer.multires_sizes):
            check_number(f"tokenizer.multires_sizes[{i}]", size, 1, 1 << 16, integer=True)

    def _get(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            node = getattr(node, part)
        return node

    def model_config(self, **resolved: Any) -> Any:
        """The model's config (its kind's config class): `model` laid over `resolved`, the values the run fixes
        elsewhere (a tokenizer's image size; a generator's token grid and text width). Resolved values for fields
        the class lacks are left out; fields given nowhere take the class defaults."""
        cls = registry.model_class(self.kind).config_class
        names = {f.name for f in dataclasses.fields(cls)}
        return config_from_dict(cls, {**{k: v for k, v in resolved.items() if k in names}, **self.model}, "model")
