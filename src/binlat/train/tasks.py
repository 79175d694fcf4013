"""The three trainers as small tasks the engine drives: what to build, what data to read, how to score a batch."""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .. import registry
from ..io import check_state_dict, load_safetensors, save_safetensors
from ..metrics import psnr_of_mse
from ..modeling import Network
from ..processes.common import uniform
from ..tokenizer import BinaryTokenizer, bit_regularizer
from ..tokenizer.losses import gradient_l1
from .checkpoints import load_torch_state
from .config import TrainConfig

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger("binlat.train")


class Task:
    model: Network
    model_config: Any  # the kind's network config, set by each task
    # Whether the shapes stream may render the held-out compositions: yes for the tokenizer, a general image codec
    # that reads no captions; never for the generators, whose held-out score tests composition.
    sees_held_out = False

    def __init__(self, cfg: TrainConfig, device: torch.device, allow_data_commands: bool = False):
        self.cfg, self.device = cfg, device
        # Whether cfg.data may name URLs that run programs: only a --data the user typed with the opt-in flag.
        self.allow_data_commands = allow_data_commands
        self.accelerator: Accelerator | None = None  # the engine's, given to prepare once it has one

    def dataset(self) -> Any:
        from ..data.precomputed import INDEX, PrecomputedDataset
        from ..data.readers import make_dataset

        spec = self.cfg.data.removeprefix("precomputed:")
        if (Path(spec) / INDEX).is_file():
            return self.check_precomputed(PrecomputedDataset(spec))
        return make_dataset(
            self.cfg.data,
            size=self.cfg.image_size,
            seed=self.cfg.seed,
            include_held_out=self.sees_held_out,
            allow_commands=self.allow_data_commands,
        )

    def check_precomputed(self, data):
        raise ValueError("precomputed bits only serve generator training; give the tokenizer images")

    def new_model(self) -> Network:
        raise NotImplementedError

    def init_from(self, directory: str) -> None:
        """Start from a model directory's weights (fine-tuning: the optimiser and the schedule start fresh). The
        directory's architecture must be this run's; a difference is named rather than left to a shape error."""
        start = type(self.model).from_pretrained(directory)
        ours, theirs = dataclasses.asdict(self.model.config), dataclasses.asdict(start.config)
        differ = [f"{k} {theirs.get(k)} (run: {v})" for k, v in ours.items() if theirs.get(k) != v]
        if differ:
            raise ValueError(
                f"init_from {directory}: its model differs from this run's in "
                + ", ".join(differ)
                + "; set the run's model to match, or start from scratch"
            )
        self.model.load_state_dict(start.state_dict())

    def loss(self, model, batch, step: int, generators: list[torch.Generator]) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def prepare(self, accelerator: Accelerator) -> None:
        """Called once the engine has prepared the model: a task prepares what else it trains here."""
        self.accelerator = accelerator

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        """The task's own work once the optimiser has stepped; `metrics` are the step's, averaged over the processes
        (the same on every process)."""

    def save_checkpoint(self, directory: Path) -> dict:
        """What the task carries across a resume: its own files, written into the checkpoint folder `directory`,
        and the small values it returns, which the engine keeps in the checkpoint's state.json."""
        return {}

    def load_checkpoint(self, directory: Path, state: dict) -> None:
        """Take back what save_checkpoint kept (`state`: the values it returned). Every file is read and checked
        before anything changes, so a damaged checkpoint leaves the task as it was."""

    def sample_grid(self, model, cfg: TrainConfig):
        return None

    def evaluate(self, model) -> dict[str, float]:
        """Metrics of the EMA model at sample time (logged as eval_*)."""
        return {}


class TokenizerTask(Task):
    sees_held_out = True

    def __init__(self, cfg: TrainConfig, device: torch.device, allow_data_commands: bool = False):
        super().__init__(cfg, device, allow_data_commands)
        opts = cfg.tokenizer
        if opts.freeze_encoder and not opts.init_from:  # a frozen random encoder would train a decoder of noise
            raise ValueError(
                "tokenizer.freeze_encoder trains only the decoder, over a trained encoder: name the tokenizer to "
                "start from with --set tokenizer.init_from=DIR (an exported tokenizer or model directory)"
            )
        self.model_config = cfg.model_config(image_size=cfg.image_size)
        self.model = self.new_model()
        if opts.init_from:
            self.init_from(opts.init_from)
        if opts.freeze_encoder:
            self.model.encoder.requires_grad_(False)
            self.model.quantizer.to_logits.requires_grad_(False)
        self.perceptual = None
        if opts.perceptual_weight > 0:
            if opts.perceptual_weights and Path(opts.perceptual_weights).is_file():
                from ..tokenizer.losses import PerceptualLoss

                self.perceptual = PerceptualLoss(opts.perceptual_weights).to(device)
            else:
                log.warning(
                    "perceptual loss off: tokenizer.perceptual_weights (a local VGG16 safetensors file) not given "
                    "or not found"
                )
        self.disc = self.disc_opt = None
        if opts.gan_weight > 0:
            from ..tokenizer.losses import PatchDiscriminator

            self.disc = PatchDiscriminator(self.model_config.in_channels)
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=opts.disc_lr, betas=(0.5, 0.9))
        # (real, reconstruction) of every micro-batch of the current step, for the discriminator's update in
        # after_step: with grad_accum > 1 it must see them all, not only the last.
        self.fakes: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.fakes_step: int | None = None
        self.recent_psnr: list[float] = []
        self.bits_from: int | None = None if opts.soft_until_psnr > 0 else 0  # first step with sampled bits

    def soft(self, step: int) -> bool:
        """Whether the decoder reads probabilities instead of sampled bits at this step (see soft_until_psnr)."""
        return self.bits_from is None or step < self.bits_from

    def after_step(self, step, metrics):
        self.train_discriminator(step)
        self.watch_soft_latent(step, metrics)

    def watch_soft_latent(self, step: int, metrics: dict[str, float]) -> None:
        """Switch the decoder to sampled bits once the PSNR over the last soft_window steps reaches soft_until_psnr,
        or at soft_max_steps."""
        o = self.cfg.tokenizer
        if self.bits_from is not None:
            return
        if "psnr" in metrics:
            self.recent_psnr = (self.recent_psnr + [metrics["psnr"]])[-o.soft_window :]
        ready = len(self.recent_psnr) == o.soft_window and sum(self.recent_psnr) / o.soft_window >= o.soft_until_psnr
        if ready or (o.soft_max_steps and step + 1 >= o.soft_max_steps):
            self.bits_from = step + 1
            log.info("step %d: the decoder reads sampled bits from now on", step + 1)

    def new_model(self) -> BinaryTokenizer:
        return BinaryTokenizer(self.model_config)

    def prepare(self, accelerator):
        super().prepare(accelerator)
        if self.disc is not None:
            self.disc, self.disc_opt = accelerator.prepare(self.disc, self.disc_opt)

    def temperature(self, step: int) -> float:
        """Bernoulli temperature, annealed linearly from tau_start to tau_end over tau_steps."""
        o = self.cfg.tokenizer
        if o.tau_steps <= 0:
            return o.tau_end
        return o.tau_start + (o.tau_end - o.tau_start) * min(1.0, step / o.tau_steps)

    def loss(self, model, batch, step, generators):
        o = self.cfg.tokenizer
        images = batch["image"].to(self.device)
        if o.multires_sizes:
            # One size per step, the same on every process: a function of the step only.
            size = random.Random(self.cfg.seed * 1_000_003 + step).choice(o.multires_sizes)
            if size != images.shape[-1]:
                images = F.interpolate(images, size=(size, size), mode="bicubic", antialias=True).clamp(-1, 1)
        cfg = self.model_config
        noise = uniform((cfg.num_tokens, cfg.num_bits), generators, images.device)
        soft = self.soft(step)
        out = model(images, temperature=self.temperature(step), noise=noise, soft=soft)
        recon = out.reconstruction.float()
        rec = o.l1_weight * F.smooth_l1_loss(recon, images)
        if o.l2_weight:
            rec = rec + o.l2_weight * F.mse_loss(recon, images)
        if o.gradient_weight:
            rec = rec + o.gradient_weight * gradient_l1(recon, images)
        if self.perceptual is not None:
            rec = rec + o.perceptual_weight * self.perceptual(recon, images)
        loss = rec + o.bit_reg_weight * bit_regularizer(out.probs)
        # The engine turns the (process-averaged) clamped MSE into PSNR.
        metrics = {
            "rec_loss": rec.detach(),
            "mse": F.mse_loss(recon.detach().clamp(-1, 1), images),
            "soft_latent": float(soft),
        }
        if self.disc is not None and step >= o.gan_start and model.training:
            g_loss = -self.disc(recon).mean()
            last = self.accelerator.unwrap_model(model).decoder.last_layer.weight
            from ..tokenizer.losses import adaptive_gan_weight

            weight = adaptive_gan_weight(rec, g_loss, last)
            loss = loss + o.gan_weight * weight * g_loss
            metrics["gan_g_loss"] = g_loss.detach()
            if self.fakes_step != step:  # a skipped step's micro-batches never reached after_step: drop them
                self.fakes, self.fakes_step = [], step
            self.fakes.append((images.detach(), recon.detach()))
        return loss, metrics

    def train_discriminator(self, step: int) -> None:
        """The discriminator's step, over every micro-batch of this optimiser step (its gradients averaged, as the
        generator's are)."""
        fakes = self.fakes if self.fakes_step == step else []
        self.fakes, self.fakes_step = [], None
        if not fakes:
            return
        from ..tokenizer.losses import hinge_d_loss

        # fakes are kept only by a step that ran the discriminator, after prepare() gave the accelerator
        assert self.disc is not None and self.disc_opt is not None and self.accelerator is not None
        self.disc_opt.zero_grad(set_to_none=True)
        for real, fake in fakes:
            self.accelerator.backward(hinge_d_loss(self.disc(real), self.disc(fake)) / len(fakes))
        self.disc_opt.step()

    def save_checkpoint(self, directory):
        if self.disc is not None:
            save_safetensors(self.accelerator.unwrap_model(self.disc).state_dict(), directory / "disc.safetensors")
            torch.save(self.disc_opt.state_dict(), directory / "disc_optimizer.pt")
        return {"bits_from": self.bits_from, "recent_psnr": self.recent_psnr}

    def load_checkpoint(self, directory, state):
        if self.disc is not None and (directory / "disc.safetensors").is_file():
            disc_state = load_safetensors(directory / "disc.safetensors")
            check_state_dict(self.disc, disc_state, str(directory / "disc.safetensors"))
            optimizer_state = load_torch_state(directory / "disc_optimizer.pt")  # both read before either is used
            self.disc.load_state_dict(disc_state)
            self.disc_opt.load_state_dict(optimizer_state)
        if "bits_from" in state:
            self.bits_from, self.recent_psnr = state["bits_from"], list(state["recent_psnr"])

    def evaluate(self, model) -> dict[str, float]:
        """The tokenizer's ceiling: PSNR of EMA round trips with thresholded bits on 64 shapes images from a seed
        no training stream uses (skipped for other data)."""
        if not self.cfg.data.startswith("shapes"):
            return {}
        from ..data.shapes import ShapesStream

        held_out = ShapesStream(size=self.cfg.image_size, seed=12345)
        images = torch.stack([held_out.sample(i)["image"] for i in range(64)])
        with torch.inference_mode():
            recon = model.decode(model.encode(images), images.shape[-2], images.shape[-1]).clamp(-1, 1)
        mse = F.mse_loss(recon, images).item()
        return {"eval_psnr": psnr_of_mse(max(mse, 1e-10))}

    def sample_grid(self, model, cfg):
        from ..generation import to_pil
        from ..grid import contact_sheet

        data = self.dataset()
        samples = [data.sample(i) if hasattr(data, "sample") else data[i] for i in range(4)]
        images = torch.stack([s["image"] for s in samples])
        with torch.inference_mode():
            recon = model.decode(model.encode(images), images.shape[-2], images.shape[-1])
        pics = to_pil(images) + to_pil(recon)
        return contact_sheet(pics, ["input"] * 4 + ["reconstruction"] * 4, columns=4, cell=128)


class GeneratorTask(Task):
    """Training of any registered generator kind (its network and its process's loss) on bits from a frozen
    tokenizer and states from a frozen text encoder, or on bits and states precomputed by them."""

    # What the tokenizer and the text encoder decide; a run's `model` may repeat them, not change them.
    FIXED = ("num_bits", "num_tokens", "text_dim", "align_dim")

    def __init__(
        self,
        cfg: TrainConfig,
        device: torch.device,
        allow_data_commands: bool = False,
        uncond: dict[str, torch.Tensor] | None = None,
    ):
        """`uncond`: the empty prompt's text states as `binlat precompute` stores them ("text", "text_mask"). Given,
        the task trains on precomputed bits and text states alone and loads no tokenizer or text encoder: the run's
        `model` names the token grid and the text width, and the task cannot read images or captions, evaluate or
        draw samples (the bench times its steps so)."""
        super().__init__(cfg, device, allow_data_commands)
        from ..text import TextEncoder
        from ..text.encoder import CachedTextEncoder

        o = cfg.generator
        self.tokenizer: BinaryTokenizer | None = None
        self.text_encoder: TextEncoder | None = None
        resolved: dict[str, Any] = {"prediction": o.prediction}
        if uncond is None:
            if not o.tokenizer:
                raise ValueError("generator.tokenizer must name a trained tokenizer model directory")
            self.tokenizer = BinaryTokenizer.from_pretrained(o.tokenizer, device=device).requires_grad_(False)
            self.text_encoder = TextEncoder(o.text_encoder, max_length=o.text_max_length, device=device)
            resolved.update(self._fixed_by(self.tokenizer, self.text_encoder))
        self.model_config = self._checked_model_config(resolved)
        self.model = self.new_model()
        self.process = registry.generator(cfg.kind).trainer(o, self.model_config)
        if o.init_from:
            self.init_from(o.init_from)
        self.cached_text: CachedTextEncoder | None = None
        if self.text_encoder is not None:
            self.cached_text = CachedTextEncoder(self.text_encoder, list(self.model_config.text_layers))
        # The states a dropped prompt of precomputed data takes: as given, or the data's (check_precomputed).
        self.uncond = uncond
        self.data_spec = ""  # what a precomputed folder was made from (its index's "data")
        self.sample_prompts: list[str] | None = None  # own_prompts' pick, once read

    def _fixed_by(self, tokenizer: BinaryTokenizer, text_encoder) -> dict[str, Any]:
        """What the tokenizer and the text encoder fix in the network: its token grid, its text width and the text
        layers its blocks read; with REPA, the width of its alignment head."""
        from ..text import text_layer_map

        tok, layers = tokenizer.config, self.cfg.model_config().num_layers
        fixed = {
            "num_bits": tok.num_bits,
            "num_tokens": tok.num_tokens,
            "text_dim": text_encoder.hidden_size,
            "text_layers": text_layer_map(text_encoder.num_layers, layers),
        }
        if self.cfg.generator.repa_weight:  # REPA aligns to the tokenizer encoder's features: as wide as they are
            fixed.update(align_dim=tok.encoder_dim, align_block=min(1, layers - 1))
        return fixed

    def _checked_model_config(self, resolved: dict[str, Any]):
        """The run's `model` over `resolved` (see TrainConfig.model_config), refused where it changes a FIXED value."""
        config = self.cfg.model_config(**resolved)
        for name in self.FIXED:
            if name in resolved and getattr(config, name) != resolved[name]:
                raise ValueError(
                    f"model.{name} = {getattr(config, name)} but the tokenizer/text encoder "
                    f"give {resolved[name]}; fix the config or drop the key to take theirs"
                )
        return config

    def frozen_encoders(self, purpose: str) -> tuple[BinaryTokenizer, Any]:
        """The frozen tokenizer and text encoder, which `purpose` (a few words) needs; an error where the task was
        built on precomputed text states without them."""
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError(
                f"{purpose} needs the frozen tokenizer and text encoder; this task was built on precomputed text "
                f"states without them"
            )
        return self.tokenizer, self.text_encoder

    def new_model(self):
        return registry.model_class(self.cfg.kind)(self.model_config)

    def check_precomputed(self, data):
        from ..data.precomputed import weights_fingerprint

        tokenizer, _ = self.frozen_encoders("checking precomputed bits")
        tok, idx = tokenizer.config, data.index
        if (idx["num_tokens"], idx["num_bits"]) != (tok.num_tokens, tok.num_bits):
            raise ValueError(
                f"{data.root} holds {idx['num_tokens']}x{idx['num_bits']} bits; the tokenizer makes "
                f"{tok.num_tokens}x{tok.num_bits}"
            )
        made_by = idx.get("tokenizer_sha256")
        if made_by and made_by != weights_fingerprint(tokenizer):
            raise ValueError(
                f"{data.root} holds the bits of another tokenizer ({idx.get('tokenizer')}) than "
                f"generator.tokenizer {self.cfg.generator.tokenizer}; precompute again with "
                f"--tokenizer {self.cfg.generator.tokenizer}"
            )
        self.data_spec = idx.get("data") or ""
        if self.cfg.generator.repa_weight:
            raise ValueError(
                f"generator.repa_weight aligns to the tokenizer's features of the images, and {data.root} "
                f"holds bits only; train from the images (--data the image folder or shapes) or set "
                f"--set generator.repa_weight=0"
            )
        if data.has_text:
            if list(idx["text_layers"]) != list(self.model_config.text_layers):
                raise ValueError(
                    f"{data.root} stores text layers {idx['text_layers']}, the model reads "
                    f"{list(self.model_config.text_layers)}; precompute again with --text-layers"
                )
            self.uncond = data.uncond()
        return data

    def _text(self, batch, drop: list[bool]):
        from ..text import TextFeatures

        if "text" in batch:  # precomputed: [N, layers, L, D] float16 + mask; dropped rows take the empty prompt
            text, mask = batch["text"].float(), batch["text_mask"].bool()
            assert self.uncond is not None  # given, or set by check_precomputed for data that stores text
            rows = torch.tensor(drop)
            text[rows], mask[rows] = self.uncond["text"][0].float(), self.uncond["text_mask"][0].bool()
            return TextFeatures(list(text.to(self.device).unbind(1)), mask.to(self.device))
        self.frozen_encoders("training on captions")
        assert self.cached_text is not None  # made with the text encoder that frozen_encoders found
        captions = ["" if d else c for d, c in zip(drop, batch["caption"])]
        return self.cached_text(captions).to(self.device)

    def loss(self, model, batch, step, generators):
        o = self.cfg.generator
        drop = [float(torch.rand((), generator=g)) < o.prompt_dropout for g in generators]
        features = None
        with torch.no_grad():
            if "bits" in batch:
                bits = batch["bits"].float().to(self.device)
            else:
                tokenizer, _ = self.frozen_encoders("training on images")
                if o.repa_weight:
                    bits, features = tokenizer.encode_with_features(batch["image"].to(self.device))
                    bits = bits.float()
                else:
                    bits = tokenizer.encode(batch["image"].to(self.device)).float()
            text = self._text(batch, drop)
            given = {} if features is None else {"align_to": features}
            if o.role_contrast > 0:
                given["negatives"] = self._negatives(batch, drop, half_precision="text" in batch)
        return self.process.loss(model, bits, text, generators, **given)

    def _negatives(self, batch, drop: list[bool], half_precision: bool):
        """generator.role_contrast's hard negatives: the rows whose caption (kept, not dropped) is a position
        caption, and the features of those captions with their roles swapped. Features of precomputed data are
        stored in float16: a negative is rounded so too, so that nothing but the words tells it from its caption."""
        from ..data.shapes import role_negative
        from ..processes.common import Negatives

        if self.cached_text is None:
            raise ValueError("generator.role_contrast reads the captions with the text encoder, which this task lacks")
        pairs = [(i, role_negative(c)) for i, (c, d) in enumerate(zip(batch["caption"], drop)) if not d]
        kept = [(i, n) for i, n in pairs if n is not None]
        rows = torch.tensor([i for i, _ in kept], dtype=torch.long, device=self.device)
        if not kept:
            return Negatives(rows, self.cached_text([""]).index([]).to(self.device))
        text = self.cached_text([n for _, n in kept])
        if half_precision:
            text = text.to(dtype=torch.float16).to(dtype=torch.float32)
        return Negatives(rows, text.to(self.device))

    def evaluate(self, model) -> dict[str, float]:
        """On shapes data (also precomputed from shapes): the judged accuracy of the EMA model on 4 prompts per
        category (fixed seeds), a cheap running version of `binlat eval shapes`."""
        if not (self.cfg.data.startswith("shapes") or self.data_spec.startswith("shapes")):
            return {}
        from ..judge.accuracy import evaluate_shapes, pipeline_images
        from ..pipeline import Pipeline

        pipe = Pipeline(*self.frozen_encoders("evaluating"), **{self.cfg.kind: model})
        images = pipeline_images(
            pipe,
            self.cfg.kind,
            num_steps=self.cfg.generator.sample_steps,
            guidance_scale=self.cfg.generator.sample_guidance,
            size=self.cfg.image_size,
        )
        summary = evaluate_shapes(images, per_category=4, seed=0, held_out=False)["summary"]
        return {"eval_shapes_accuracy": summary["overall"], **{f"eval_{c}": a for c, a in summary["accuracy"].items()}}

    def own_prompts(self, count: int = 3, look: int = 64) -> list[str]:
        """Sample-grid prompts from the run's own data: the first `count` distinct captions among its first `look`
        samples (the shapes data: SHAPES_SAMPLE_PROMPTS); none where the data has no captions (then no grid)."""
        from .config import SHAPES_SAMPLE_PROMPTS

        if self.cfg.data.startswith("shapes") or self.data_spec.startswith("shapes"):
            return list(SHAPES_SAMPLE_PROMPTS)
        if self.sample_prompts is None:
            data, found = self.dataset(), []
            reader = (data.sample(i) for i in range(min(look, len(data)))) if hasattr(data, "sample") else iter(data)
            for _, sample in zip(range(look), reader):
                caption = (sample or {}).get("caption", "")
                if caption and caption not in found:
                    found.append(caption)
                if len(found) == count:
                    break
            self.sample_prompts = found
        return self.sample_prompts

    def sample_grid(self, model, cfg):
        from ..grid import contact_sheet
        from ..pipeline import Pipeline

        prompts = cfg.sample_prompts or self.own_prompts()
        if not prompts:  # data without captions: nothing to prompt with (the pipeline refuses empty prompts)
            return None
        pipe = Pipeline(*self.frozen_encoders("drawing samples"), **{cfg.kind: model})
        out = pipe(
            prompts,
            kind=cfg.kind,
            num_steps=cfg.generator.sample_steps,
            guidance_scale=cfg.generator.sample_guidance,
            seed=0,
            height=cfg.image_size,
            progress=False,
        )
        return contact_sheet(out.images, out.prompts, out.seeds, cell=128)


def make_task(cfg: TrainConfig, device: torch.device, allow_data_commands: bool = False) -> Task:
    task = TokenizerTask if cfg.kind == "tokenizer" else GeneratorTask
    return task(cfg, device, allow_data_commands)
