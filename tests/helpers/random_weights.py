"""Weight files with random (Kaiming-normal) weights for the real feature extractors and a diffusers VAE, written in
the official layouts so that they load through the real weights-path code. Used by tests/conftest.py and
benchmarks/eval_pipeline.py (no official weights exist on the test machines)."""

import pathlib
from unittest import mock

import torch

def kaiming_(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Kaiming-normal init of every weight matrix / kernel (seeded), so that features are not degenerate."""
    gen = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        if p.dim() > 1:
            torch.nn.init.kaiming_normal_(p, generator=gen)
    return net

def write_inception(path: pathlib.Path) -> pathlib.Path:
    """torch-fidelity's Inception-V3 state dict (official keys) with random weights."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe
    # Construction normally downloads the official weights; here it only provides the module with the official keys.
    with mock.patch.object(fe.FeatureExtractorInceptionV3, 'load_state_dict', lambda self, sd: None), \
            mock.patch.object(fe, 'load_state_dict_from_url', lambda *a, **k: {}):
        net = kaiming_(fe.FeatureExtractorInceptionV3('inception-v3-compat', ['2048']))
    torch.save(net.state_dict(), path)
    return path

def write_dinov2(path: pathlib.Path) -> pathlib.Path:
    """Our DINOv2 ViT-L/14 (official parameter names) with random weights."""
    from cosim_dist.eval import extractors
    net = kaiming_(extractors.DinoV2())
    torch.nn.init.normal_(net.pos_embed, std=0.02, generator=torch.Generator().manual_seed(1))
    torch.save(net.state_dict(), path)
    return path

TINY_VAE = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32)   # 1 downsampling
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,  # sd-vae-ft-mse
              sample_size=512)

def write_vae(directory: pathlib.Path, layout: dict) -> str:
    """A randomly initialised 4-latent-channel AutoencoderKL saved with save_pretrained (diffusers directory layout)."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    levels = len(layout['block_out_channels'])
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * levels,
                        up_block_types=('UpDecoderBlock2D',) * levels, latent_channels=4, **layout)
    vae.save_pretrained(directory)
    return str(directory)
