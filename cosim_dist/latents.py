"""The latent space of EDM2's ImageNet-512 models (docs/ALGORITHM.md, "Reference facts"): the Stable Diffusion VAE's
per-channel latent statistics and the scale/bias that map raw latents to network space, shared by the data loader
(encoding, shard checks) and the evaluation's decoder."""

from collections.abc import Iterable

# stabilityai/sd-vae-ft-mse latent statistics measured by EDM2.
SD_VAE_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
SD_VAE_RAW_STD = (4.17, 4.62, 3.71, 3.28)

def latent_scale_bias(raw_mean: Iterable[float], raw_std: Iterable[float]) -> tuple[list[float], list[float]]:
    """Per-channel (scale, bias) with z = latent*scale + bias: scale = 0.5/raw_std, bias = -raw_mean*scale."""
    scale = [0.5 / s for s in raw_std]
    return scale, [-m * s for m, s in zip(raw_mean, scale)]
