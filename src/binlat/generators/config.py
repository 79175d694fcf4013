"""Generator configurations: the fields every kind shares (GeneratorConfig), and each kind's own class over them
(DiffusionConfig, ARConfig), which a network's `config_class` names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, cast

from ..nn import TextRefiner, sincos_grid_positions, sincos_positions
from ..validators import check_int


@dataclass
class GeneratorConfig:
    """The fields every generator kind shares: a transformer over `num_tokens` binary tokens of `num_bits` bits,
    conditioned on per-layer text states. Each kind adds its own options in its subclass.

    Defaults are the paper's generator (16 blocks x 2048 wide, AMD-OLMo-1B text states of width 2048)."""

    num_bits: int = 64
    num_tokens: int = 128
    num_layers: int = 16
    num_heads: int = 16
    head_dim: int = 128
    text_dim: int = 2048
    mlp_ratio: int = 4
    # Which text-encoder layer feeds each block (None: layer i feeds block i). Recorded here so a trained
    # model always gets the same text states; see binlat.text.text_layer_map for the default mapping.
    text_layers: tuple[int, ...] | None = None
    # Blocks of a trainable text refiner (binlat.nn.TextRefiner) over the last text layer, whose output every block
    # adds to its projected text: word order through RoPE, for binding roles ("A above B"). 0 (the release): none.
    text_refiner_layers: int = 0
    # The token grid (rows, cols) the learned position embeddings start from as a 2D sin/cos table, for tokenizers
    # whose token k is region k of the image (region_shortcut); None (the release): a 1D table.
    position_grid: tuple[int, int] | None = None

    # How errors name the kind ("diffusion"), and the other kind: its name and its options with the values that
    # config.json files from before each kind had its own class hold (one class then carried both kinds' options).
    kind_name: ClassVar[str] = "generator"
    other_kind: ClassVar[str] = ""
    other_kind_options: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        for name in ("num_bits", "num_tokens", "num_layers", "num_heads", "head_dim", "text_dim", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.text_refiner_layers < 0:
            raise ValueError(f"text_refiner_layers must be >= 0, got {self.text_refiner_layers}")
        if self.position_grid is not None:
            self.position_grid = cast(
                "tuple[int, int]", tuple(self.position_grid)
            )  # JSON gives a list; length checked next
            if len(self.position_grid) != 2 or min(self.position_grid) < 1:
                raise ValueError(
                    f"position_grid must be [rows, cols] of positive integers, got {list(self.position_grid)}"
                )
        if self.text_layers is not None:
            self.text_layers = tuple(self.text_layers)
            if len(self.text_layers) != self.num_layers or any(i < 0 for i in self.text_layers):
                raise ValueError(
                    f"text_layers must list {self.num_layers} non-negative layer indices "
                    f"(one per block), got {list(self.text_layers)}"
                )

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @classmethod
    def drop_foreign_keys(cls, data: dict[str, Any]) -> dict[str, Any]:
        """`data` (a config dict about to be read) without the other kind's options where they hold their old
        defaults, which mean nothing to this kind; any other value is refused, naming the option and its kind.
        binlat.config.config_from_dict calls it, so model directories, checkpoints and a training config's `model`
        are all read alike."""
        for key in sorted(data.keys() & cls.other_kind_options.keys()):
            default, value = cls.other_kind_options[key], data[key]
            if type(value) is not type(default) or value != default:  # the type too: True == 1 in Python
                raise ValueError(
                    f"{key} is the {cls.other_kind} generator's option, not the {cls.kind_name} generator's: its "
                    f"config may hold it only at its old default, {default!r} (ignored), got {value!r}"
                )
        return {k: v for k, v in data.items() if k not in cls.other_kind_options}


@dataclass
class DiffusionConfig(GeneratorConfig):
    """The diffusion generator's config (binlat.generators.DiffusionTransformer): the shared fields and its own."""

    # What the network's logits mean ("flip": a bit of x_t is flipped, "x0": x_0 itself).
    prediction: str = "flip"
    # The network also reads its own previous estimate of x_0 (self-conditioning, as in Analog Bits); off in the
    # release.
    self_condition: bool = False
    # The masked mean of the last block's text states also modulates every block (through the time embedding); off
    # in the release, whose text enters by attention alone.
    pooled_text: bool = False
    # The text rows are queries too (SD3's joint attention, without its separate text weights): each block's
    # attention also updates a text stream that the next block adds to its projected text, so a noun can read which
    # image rows already draw it. The update enters through a zero-initialised projection, so a new network starts
    # as one without it. Off in the release.
    joint_text: bool = False
    # An alignment head (REPA) on the output of block `align_block`, `align_dim` wide: training aligns it to a
    # frozen encoder's features of the clean image (generator.repa_weight). Sampling never reads it. 0 (the
    # release): none.
    align_dim: int = 0
    align_block: int = 1

    kind_name: ClassVar[str] = "diffusion"
    other_kind: ClassVar[str] = "AR"
    other_kind_options: ClassVar[dict[str, Any]] = {"bit_groups": 1}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.align_dim < 0 or (self.align_dim and not 0 <= self.align_block < self.num_layers):
            raise ValueError(
                f"align_dim must be >= 0 and align_block a block index below num_layers "
                f"({self.num_layers}), got {self.align_dim} and {self.align_block}"
            )
        if self.prediction not in ("flip", "x0"):
            raise ValueError(f"prediction must be 'flip' or 'x0', got {self.prediction!r}")


@dataclass
class ARConfig(GeneratorConfig):
    """The AR generator's config (binlat.generators.ARTransformer): the shared fields and its own."""

    # The head predicts each token as this many consecutive groups of num_bits / bit_groups bits, group j a
    # categorical over its 2^(bits) values given the drawn groups < j (a token's bits are drawn jointly, not one
    # coin each). 1 (the release): one independent Bernoulli logit per bit.
    bit_groups: int = 1

    kind_name: ClassVar[str] = "AR"
    other_kind: ClassVar[str] = "diffusion"
    other_kind_options: ClassVar[dict[str, Any]] = {
        "prediction": "flip",
        "self_condition": False,
        "pooled_text": False,
        "joint_text": False,
        "align_dim": 0,
        "align_block": 1,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("bit_groups", self.bit_groups, 1)


def check_config_class(network: Any, config: Any) -> None:
    """A TypeError naming the class a network takes, where it is handed another (the shared GeneratorConfig alone,
    or the other kind's), rather than an AttributeError on the first option it lacks."""
    want = type(network).config_class
    if not isinstance(config, want):
        raise TypeError(
            f"{type(network).__name__} takes its own config class, {want.__name__}; got {type(config).__name__}"
        )


MAX_GROUP_BITS = 12  # a group's categorical has at most 2^12 = 4096 values


def group_bits(config: ARConfig) -> int:
    """Bits per group of the AR generator's grouped head (config.bit_groups > 1), checked against num_bits here,
    when a network is built: a training config learns num_bits from its tokenizer."""
    groups, bits = config.bit_groups, config.num_bits
    if bits % groups:
        raise ValueError(f"bit_groups ({groups}) must divide num_bits ({bits}): a token's bits split into equal groups")
    if bits // groups > MAX_GROUP_BITS:
        fewest = next(d for d in range(groups, bits + 1) if bits % d == 0 and bits // d <= MAX_GROUP_BITS)
        raise ValueError(
            f"bit_groups ({groups}) leaves {bits // groups} bits per group of a {bits}-bit token; at "
            f"most {MAX_GROUP_BITS} (2^{MAX_GROUP_BITS} values): the fewest groups that fit is {fewest}"
        )
    return bits // groups


def make_text_refiner(config: GeneratorConfig) -> TextRefiner | None:
    """The optional text refiner of either generator kind (config.text_refiner_layers blocks at the generator's
    width), or None."""
    if not config.text_refiner_layers:
        return None
    return TextRefiner(
        config.text_dim, config.dim, config.text_refiner_layers, config.num_heads, config.head_dim, config.mlp_ratio
    )


def initial_positions(config: GeneratorConfig, leading: int = 0):
    """The generators' learned position embeddings' starting table: 1D sin/cos, or 2D over config.position_grid;
    `leading` rows come first (the AR start token)."""
    if config.position_grid is None:
        return sincos_positions(config.num_tokens + leading, config.dim)
    rows, cols = config.position_grid
    if rows * cols != config.num_tokens:  # checked here: a training config learns num_tokens from its tokenizer
        raise ValueError(
            f"position_grid must be [rows, cols] with rows x cols = num_tokens ({config.num_tokens}), "
            f"got {[rows, cols]}"
        )
    return sincos_grid_positions(*config.position_grid, config.dim, leading=leading)
