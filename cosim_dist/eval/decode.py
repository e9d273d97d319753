"""Network outputs -> uint8 RGB images [N, 3, H, W] (docs/ALGORITHM.md, "Reference facts").

- Pixel models (3 channels): x in [-1, 1] -> x * 127.5 + 128, clipped, uint8 (EDM / EDM2 `StandardRGBEncoder`).
- Latent models (EDM2, 4 channels): undo the per-channel scale and bias, z_raw = (z - bias) / scale with
  scale = 0.5 / raw_std, bias = -raw_mean * scale, decode with a diffusers AutoencoderKL (`stabilityai/sd-vae-ft-mse`
  from a local directory), clamp to [0, 1] (EDM2 feeds the VAE x/255, not [-1, 1]), * 255, uint8.
"""

import os
import pathlib
from collections.abc import Callable, Iterable

import torch

from ..latents import SD_VAE_RAW_MEAN, SD_VAE_RAW_STD, latent_scale_bias

Decoder = Callable[[torch.Tensor], torch.Tensor]

def load_vae(path: str | os.PathLike | None, device: torch.device | str = 'cpu') -> torch.nn.Module:
    """A frozen diffusers AutoencoderKL from a local directory, or a clear error naming what to download."""
    if path is None or not (pathlib.Path(path) / 'config.json').is_file():
        raise FileNotFoundError(f'VAE directory {path} has no config.json: download stabilityai/sd-vae-ft-mse '
                                f'(diffusers layout: config.json + diffusion_pytorch_model.safetensors) and pass its '
                                f'local directory (eval.vae=DIR, or --vae DIR)')
    from diffusers import AutoencoderKL
    return AutoencoderKL.from_pretrained(path, low_cpu_mem_usage=False).eval().requires_grad_(False).to(device)

def pixels_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 as EDM's generate.py: x * 127.5 + 128, clipped to [0, 255], truncated."""
    return (x.float() * 127.5 + 128).clip(0, 255).to(torch.uint8)

class LatentDecoder:
    """EDM2 latents -> uint8 pixels through the VAE decoder, `batch` latents per decoder call."""

    def __init__(self, vae: torch.nn.Module, raw_mean: Iterable[float] = SD_VAE_RAW_MEAN,
                 raw_std: Iterable[float] = SD_VAE_RAW_STD, batch: int = 8) -> None:
        scale, bias = latent_scale_bias(raw_mean, raw_std)
        self.vae, self.batch = vae, batch
        self.scale = torch.tensor(scale, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.bias = torch.tensor(bias, dtype=torch.float32).reshape(1, -1, 1, 1)

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[1] != self.scale.shape[1]:
            raise ValueError(f'latents have {z.shape[1]} channels, the VAE statistics {self.scale.shape[1]}')
        raw = (z.float() - self.bias.to(z.device)) / self.scale.to(z.device)
        x = torch.cat([self.vae.decode(raw[i:i + self.batch]).sample for i in range(0, len(raw), self.batch)])
        return x.float().clamp(0, 1).mul(255).to(torch.uint8)

def make_decoder(channels: int, vae_path: str | None, device: torch.device, batch: int = 8,
                 raw_mean: Iterable[float] | None = None, raw_std: Iterable[float] | None = None) -> Decoder:
    """The decoder for a network with `channels` output channels: pixels (3) or latents (VAE from vae_path, latent
    statistics raw_mean / raw_std, default EDM2's for sd-vae-ft-mse)."""
    if channels == 3:
        return pixels_to_uint8
    if vae_path is None:
        raise FileNotFoundError(f'the network outputs {channels}-channel latents, so evaluation needs the VAE: '
                                f'download stabilityai/sd-vae-ft-mse and pass its local directory as eval.vae=DIR')
    return LatentDecoder(load_vae(vae_path, device), raw_mean or SD_VAE_RAW_MEAN, raw_std or SD_VAE_RAW_STD, batch)
