"""The latent-diffusion baseline of table 3, built from diffusers parts of the generator's width and depth."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .inputs import prompt_pair

if TYPE_CHECKING:
    from .plan import Plan


def require_diffusers() -> None:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise RuntimeError("the latent-diffusion baseline needs diffusers: pip install 'binlat[bench]'") from None


def pixart(plan: Plan, latent: int):
    """A PixArt-style transformer with the generator's layers, heads and head width, patch 2 over 4 channels."""
    from diffusers import PixArtTransformer2DModel

    g = plan.generator
    return PixArtTransformer2DModel(
        num_attention_heads=g["num_heads"],
        attention_head_dim=g["head_dim"],
        in_channels=4,
        out_channels=4,
        num_layers=g["num_layers"],
        cross_attention_dim=g["num_heads"] * g["head_dim"],
        sample_size=latent,
        patch_size=2,
        caption_channels=g["text_dim"],
        use_additional_conditions=False,
    )


def vae(plan: Plan):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**plan.vae)


class LatentDiffusionBaseline:
    """Text -> 20 guided DDIM steps of a PixArt-style transformer on a 4-channel latent -> AutoencoderKL decode."""

    # diffusers' models and scheduler, used through their own interfaces (not typed for mypy here)
    transformer: Any
    vae: Any
    scheduler: Any

    def __init__(self, plan: Plan, size: int, transformer: torch.nn.Module, vae: torch.nn.Module):
        from diffusers import DDIMScheduler

        self.plan, self.latent = plan, size // 8
        self.transformer, self.vae = transformer.eval(), vae.eval()
        self.scheduler = DDIMScheduler(num_train_timesteps=1000)
        self.scheduler.set_timesteps(plan.steps)
        cond, uncond = prompt_pair(plan, 1, layers=1)
        self.text = torch.cat((cond.layers[-1], uncond.layers[-1]))
        self.mask = torch.cat((cond.mask, uncond.mask)).float()

    def noise(self, seed: int = 0) -> torch.Tensor:
        return torch.randn(1, 4, self.latent, self.latent, generator=torch.Generator().manual_seed(seed))

    def step(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = self.transformer(
            torch.cat((latents, latents)),
            encoder_hidden_states=self.text,
            encoder_attention_mask=self.mask,
            timestep=t.reshape(1).expand(2),
            return_dict=False,
        )[0]
        cond, uncond = eps.chunk(2)
        eps = uncond + self.plan.guidance * (cond - uncond)
        return self.scheduler.step(eps, t, latents).prev_sample

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample

    def __call__(self, seed: int = 0) -> torch.Tensor:
        latents = self.noise(seed)
        for t in self.scheduler.timesteps:
            latents = self.step(latents, t)
        return self.decode(latents)


def baseline_image(plan: Plan, size: int) -> None:
    """One guided image of the baseline with zero inputs: what table 3 counts FLOPs of (on the meta device)."""
    net, decoder = pixart(plan, size // 8), vae(plan)
    x = torch.zeros(2, 4, size // 8, size // 8)
    text = torch.zeros(2, plan.text_length, plan.generator["text_dim"])
    for _ in range(plan.steps):
        net(
            x,
            encoder_hidden_states=text,
            encoder_attention_mask=torch.ones(2, plan.text_length),
            timestep=torch.zeros(2),
            return_dict=False,
        )
    decoder.decode(torch.zeros(1, 4, size // 8, size // 8))
