"""What a bench run measures: the preset's model sizes (read from the packaged training configs) and the mode."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from ..registry import TOKENIZER, model_kinds

# The generator sizes every kind of a preset must share: the bench times one body (width, depth, token grid, text).
BODY_FIELDS = frozenset(("num_bits", "num_tokens", "num_layers", "num_heads", "head_dim", "text_dim", "mlp_ratio"))
QUICK_THROUGHPUT_STEPS = 4  # --quick: table 8 times this many diffusion steps of the 20
PAPER_TOKENS = 128  # the paper's token count at 512 px (comparisons 2-4 use it with the preset's width)
TEXT_LENGTH = 32  # the fixed text: 32 positions, left-padded
TEXT_REAL, UNCOND_REAL = 12, 2  # real (unmasked) tokens of the prompt and of the empty prompt
# The families whose sizes make_plan knows how to fit to a CPU; each is a name under configs/<kind>/.
PRESET_NAMES = ("shapes-64", "paper-512")

SD_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
)


# --- presets ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    """Model sizes and training settings of one family of configs (configs/{tokenizer,diffusion,ar}/<name>.json)."""

    name: str
    tokenizer: dict[str, Any]  # TokenizerConfig fields (image_size included)
    generator: dict[str, Any]  # the generators' body (BODY_FIELDS) at the preset's own token count
    image_size: int
    tokenizer_batch: int
    generator_batch: int
    mixed_precision: bool = False  # training configs ask for bf16 autocast
    grad_checkpointing: bool = False
    training: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> its whole training config (JSON)
    # kind -> the options of its own config class the preset sets (e.g. the AR head's bit_groups)
    generator_options: dict[str, dict[str, Any]] = field(default_factory=dict)


def preset_root():
    """The packaged training configs: binlat/presets is the repository's configs/ folder (a symlink in a checkout,
    copied files in a wheel), so the bench and `binlat train --config configs/...` read one copy."""
    return resources.files("binlat").joinpath("presets")


# The trainers the bench times: every model kind with packaged presets (configs/<kind>/), the tokenizer first.
TRAIN_KINDS = tuple(k for k in model_kinds() if preset_root().joinpath(k).is_dir())
GENERATOR_KINDS = tuple(k for k in TRAIN_KINDS if k != TOKENIZER)


def train_batches(tokenizer: int, generator: int) -> dict[str, int]:
    return {k: tokenizer if k == TOKENIZER else generator for k in TRAIN_KINDS}


def _tuples(model: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in model.items()}


@functools.cache
def load_preset(name: str) -> Preset:
    """The preset `name`, read from the packaged configs (validated as TrainConfig, as `binlat train` reads them)."""
    from ..config import ConfigError, config_from_dict
    from ..tokenizer import TokenizerConfig
    from ..train.config import TrainConfig

    if name not in PRESET_NAMES:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESET_NAMES)}")
    configs: dict[str, dict[str, Any]] = {}
    for kind in TRAIN_KINDS:
        path = preset_root().joinpath(kind, f"{name}.json")
        try:
            configs[kind] = json.loads(path.read_text(encoding="utf-8"))
            config_from_dict(TrainConfig, configs[kind], f"presets/{kind}/{name}.json")
        except FileNotFoundError:
            raise ValueError(
                f"preset {name}: presets/{kind}/{name}.json is missing from the installed binlat "
                f"package; reinstall binlat"
            ) from None
        except (json.JSONDecodeError, ConfigError) as e:
            raise ValueError(
                f"preset {name}: presets/{kind}/{name}.json is not a valid training config ({e}); "
                f"fix configs/{kind}/{name}.json"
            ) from None
    tok = configs[TOKENIZER]
    image_size = tok.get("image_size", TrainConfig.image_size)
    tokenizer = _tuples({**tok.get("model", {}), "image_size": image_size})
    # A generator config may leave its token grid to the tokenizer it trains on (as binlat train does).
    try:
        tok_cfg = config_from_dict(TokenizerConfig, tokenizer, "model")
    except ValueError as e:
        raise ValueError(
            f"preset {name}: presets/tokenizer/{name}.json: {e}; fix configs/tokenizer/{name}.json"
        ) from None
    grid = {"num_tokens": tok_cfg.num_tokens, "num_bits": tok_cfg.num_bits}
    # The bench times one generator body: the kinds must agree on its sizes; each keeps its other options (the AR
    # head's bit_groups, a text refiner, ...), which every network of that kind is built with.
    models = {k: _tuples({**grid, **configs[k].get("model", {})}) for k in GENERATOR_KINDS}
    generators = [{n: v for n, v in m.items() if n in BODY_FIELDS} for m in models.values()]
    options = {k: {n: v for n, v in m.items() if n not in BODY_FIELDS} for k, m in models.items()}
    if any(g != generators[0] for g in generators):
        raise ValueError(
            f"preset {name}: {' and '.join(f'configs/{k}/{name}.json' for k in GENERATOR_KINDS)} give "
            f"the generators different sizes; the bench times one generator width, so make them agree"
        )
    return Preset(
        name=name,
        tokenizer=tokenizer,
        generator=generators[0],
        image_size=image_size,
        tokenizer_batch=tok.get("batch_size", TrainConfig.batch_size),
        generator_batch=configs[GENERATOR_KINDS[0]].get("batch_size", TrainConfig.batch_size),
        mixed_precision=any(c.get("mixed_precision", "no") == "bf16" for c in configs.values()),
        grad_checkpointing=any(c.get("grad_checkpointing", False) for c in configs.values()),
        training=configs,
        generator_options={k: o for k, o in options.items() if o},
    )


# The shipped model's recipe: stage 1 of its tokenizer, then both generators of the preset on that token grid.
SHIPPED_TOKENIZER = {"shapes-64": "shapes-64-stage1"}


def shipped_recipe(p: Preset) -> tuple[str, dict[str, Any], dict[str, Any], dict[str, dict[str, Any]]]:
    """(description, tokenizer fields, generator fields, training configs by kind) of the preset's shipped recipe:
    for shapes-64 the stage-1 tokenizer config and the generators on its token grid (what models/default is being
    trained from); for other presets the preset itself."""
    configs = dict(p.training)
    name = SHIPPED_TOKENIZER.get(p.name)
    path = preset_root().joinpath(TOKENIZER, f"{name}.json") if name else None
    if path is None or not path.is_file():
        return f"the {p.name} preset", dict(p.tokenizer), dict(p.generator), configs
    tok = json.loads(path.read_text(encoding="utf-8"))
    tokenizer = _tuples({**tok["model"], "image_size": tok.get("image_size", p.image_size)})
    generator = dict(p.generator, num_tokens=tokenizer["num_tokens"], num_bits=tokenizer["num_bits"])
    configs[TOKENIZER] = tok
    return (
        f"the shipped recipe (presets/tokenizer/{name}.json, then the {p.name} generators on its "
        f"{tokenizer['num_tokens']} x {tokenizer['num_bits']} bits)",
        tokenizer,
        generator,
        configs,
    )


def release_tokenizer() -> dict[str, Any]:
    """TokenizerConfig fields of the Instella-T2I release's tokenizer (presets/tokenizer/release.json)."""
    path = preset_root().joinpath(TOKENIZER, "release.json")
    if not path.is_file():
        raise ValueError(
            "presets/tokenizer/release.json is missing from the installed binlat package; reinstall binlat"
        )
    cfg = json.loads(path.read_text(encoding="utf-8"))
    return _tuples({**cfg["model"], "image_size": cfg.get("image_size", 1024)})


# --tiny: widths small enough that every code path runs in seconds (the test suite's mode).
_TINY_TOKENIZER = dict(
    patch_size=8,
    num_tokens=16,
    num_bits=8,
    encoder_layers=1,
    encoder_heads=1,
    encoder_head_dim=16,
    decoder_layers=1,
    decoder_heads=1,
    decoder_head_dim=16,
    rope_axes_dims=(4, 6, 6),
    downsample_after=(),
    upsample_after=(),
    image_size=32,
)
_TINY_GENERATOR = dict(num_tokens=16, num_bits=8, text_dim=24, num_layers=2, num_heads=2, head_dim=16)


# --- modes ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """How hard to time: warm-up calls, then repeat until max_runs, or stop after min_runs once budget_s is spent."""

    warmup: int
    min_runs: int
    max_runs: int
    budget_s: float


@dataclass
class Plan:
    """Everything a run measures, resolved from a preset and a mode; `notes` record every reduction made."""

    preset: Preset
    mode: str  # full | quick | tiny
    timing: Timing
    tokenizer: dict[str, Any]
    generator: dict[str, Any]  # preset's token count
    e2e_tokenizer: dict[str, Any] | None = None  # the decoder of table 3, when it differs from `tokenizer`
    e2e_tokenizer_name: str = "preset"  # which one it is, as the output names it
    text_length: int = TEXT_LENGTH
    paper_tokens: int = PAPER_TOKENS
    ar_tokens: tuple[int, ...] = (PAPER_TOKENS,)
    ar_batches: tuple[int, int] = (1, 8)
    ar_compiled: bool = False  # also time ARDecoding(decode="compiled") at the first batch (compiles once)
    token_counts: tuple[int, int, int] = (128, 1024, 4096)
    e2e_sizes: tuple[int, int] = (512, 1024)
    steps: int = 20
    guidance: float = 7.5
    e2e_composed: tuple[int, ...] = ()  # sizes whose baseline image = steps x median step + one decode
    e2e_scaled: tuple[int, ...] = ()  # sizes whose decode times (both sides) = the base size's x FLOP ratio
    e2e_base: int | None = None  # the size those are measured at (else the first size measured)
    small_warmup: bool = False  # expensive single runs warm up on a smaller input of the same code path
    vae: dict[str, Any] = field(default_factory=dict)
    efficiency_batch: int = 64
    efficiency_compiled: bool = False  # also time the torch.compile'd step (compiles once)
    wide_check: dict[str, int] | None = None  # the step again at another width (generator overrides + batch)
    peak_size: int = 2048
    train_batches: dict[str, int] = field(default_factory=dict)
    train_steps: int = 3
    train_bf16: bool = False
    train_checkpointing: bool = False
    train_compiled: bool = False  # the training configs' compiled forward as they set it (else eager)
    codec_batch: int = 32
    # Table 8 and the training stages of table 5: the shipped recipe's sizes (see shipped_recipe).
    shipped_name: str = ""
    shipped_tokenizer: dict[str, Any] = field(default_factory=dict)
    shipped_generator: dict[str, Any] = field(default_factory=dict)
    train_configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> training config (JSON)
    generator_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> its own config options
    throughput_batch: int = 64
    throughput_steps: int | None = None  # diffusion steps timed in table 8 (the rest scaled); None: all
    bf16_batch: int = 8
    notes: list[str] = field(default_factory=list)

    def generator_fields(self, kind: str, shared: dict[str, Any] | None = None) -> dict[str, Any]:
        """Generator `kind`'s config fields: the shared ones (`shared`, else the plan's) and the kind's own options."""
        return {**(self.generator if shared is None else shared), **self.generator_options.get(kind, {})}

    @property
    def width(self) -> str:
        g = self.generator
        return f"{g['num_layers']}L x {g['num_heads']}H x {g['head_dim']} (dim {g['num_heads'] * g['head_dim']})"


def make_plan(preset: str = "shapes-64", quick: bool = False, tiny: bool = False) -> Plan:
    p = load_preset(preset)
    if quick and tiny:
        raise ValueError("--quick and --tiny are different modes; give one")
    if tiny:
        return Plan(
            preset=p,
            mode="tiny",
            timing=Timing(1, 1, 1, 0.0),
            tokenizer=dict(_TINY_TOKENIZER),
            generator=dict(_TINY_GENERATOR),
            ar_tokens=(16,),
            ar_batches=(1, 2),
            steps=2,
            e2e_composed=(512,),
            e2e_scaled=(1024,),
            e2e_base=64,
            small_warmup=True,
            vae=dict(SD_VAE, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4),
            efficiency_batch=4,
            peak_size=256,
            wide_check=dict(num_layers=1, num_heads=4, head_dim=16, batch=2),
            train_batches=train_batches(tokenizer=2, generator=4),
            train_steps=1,
            codec_batch=2,
            bf16_batch=2,
            shipped_name="tiny sizes",
            shipped_tokenizer=dict(_TINY_TOKENIZER),
            shipped_generator=dict(_TINY_GENERATOR),
            train_configs=dict(p.training),
            throughput_batch=4,
            notes=[
                "TINY mode: tiny widths (generator 2L x 2H x 16, tokenizer 1+1 blocks of 16, VAE 8 "
                "channels), 2 diffusion steps, 1 run each; exercises every code path, figures mean "
                "nothing"
            ],
        )
    plan = Plan(
        preset=p,
        mode="quick" if quick else "full",
        timing=Timing(1, 1, 3, 3.0) if quick else Timing(1, 3, 10, 30.0),
        tokenizer=dict(p.tokenizer),
        generator=dict(p.generator),
        vae=dict(SD_VAE),
        efficiency_batch=min(p.generator_batch, 64),
        train_batches=train_batches(p.tokenizer_batch, p.generator_batch),
        train_bf16=p.mixed_precision,
        train_checkpointing=p.grad_checkpointing,
        codec_batch=min(p.tokenizer_batch, 32),
        e2e_composed=(512, 1024) if quick else (),
        small_warmup=quick,
        ar_compiled=not quick,
        efficiency_compiled=not quick,
        train_compiled=not quick,
        train_steps=2 if quick else 5,
        generator_options={k: dict(o) for k, o in p.generator_options.items()},
    )
    plan.shipped_name, plan.shipped_tokenizer, plan.shipped_generator, plan.train_configs = shipped_recipe(p)
    plan.train_batches = {k: plan.train_configs[k].get("batch_size", v) for k, v in plan.train_batches.items()}
    # Table 3 decodes with the release's own tokenizer at every size (patch 16, 2x2 stage after block 7).
    plan.e2e_tokenizer, plan.e2e_tokenizer_name = release_tokenizer(), "release"
    if quick:  # the decoders at 512 and 1024 px take minutes on a 2-core CPU: measure them at 256 px and scale
        plan.e2e_scaled, plan.e2e_base, plan.e2e_composed = plan.e2e_sizes, 256, ()
        plan.throughput_steps = QUICK_THROUGHPUT_STEPS
    paper_width = load_preset("paper-512").generator
    if p.generator["num_heads"] * p.generator["head_dim"] != paper_width["num_heads"] * paper_width["head_dim"]:
        plan.wide_check = dict(
            num_layers=1,
            num_heads=paper_width["num_heads"],
            head_dim=paper_width["head_dim"],
            text_dim=paper_width["text_dim"],
            batch=16,
        )
    if p.generator["num_tokens"] != PAPER_TOKENS and not quick:
        plan.ar_tokens = (p.generator["num_tokens"], PAPER_TOKENS)
    if quick:
        plan.notes.append(
            f"QUICK mode: up to 3 timed runs per figure (1 for runs over 3 s); expensive single runs "
            f"warm up on a smaller input; the latent-diffusion baseline image is composed as "
            f"20 x (median guided step) + one VAE decode; at {plan.e2e_sizes[0]} and "
            f"{plan.e2e_sizes[1]} px both decoders' times are their 256 px times x their FLOP ratio; "
            f"diffusion throughput times {QUICK_THROUGHPUT_STEPS} of its {plan.steps} steps and scales; "
            f"compiled AR decoding and the compiled step are not timed"
        )
    if preset == "paper-512":
        # The paper's sizes do not fit this machine's memory for training, nor its time budget for generation.
        plan.train_batches = train_batches(tokenizer=4, generator=16)
        plan.notes.append(
            "paper-512: training runs micro-batches (tokenizer 4, generators 16 of the preset's "
            f"{p.tokenizer_batch} / {p.generator_batch}); images/s is per micro-batch step"
        )
        plan.efficiency_batch, plan.codec_batch, plan.bf16_batch = 16, 4, 2
        plan.throughput_batch = 4
        if quick:
            plan.generator.update(num_layers=2)
            plan.tokenizer.update(encoder_layers=2, decoder_layers=2, downsample_after=(0,), upsample_after=(0,))
            plan.notes.append(
                "paper-512 QUICK: depth reduced to 2 of 16 blocks for the generators (and the PixArt "
                "baseline), to 2+2 of 12+16 blocks for the tokenizer in tables 5-7 (widths as in the "
                "paper); table 3 decodes with the full release tokenizer, against the full SD VAE"
            )
    if preset == "paper-512":
        plan.shipped_tokenizer, plan.shipped_generator = dict(plan.tokenizer), dict(plan.generator)
    return plan
