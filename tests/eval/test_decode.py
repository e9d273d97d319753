"""Network outputs -> uint8 images: EDM's pixel mapping and EDM2's latent decoding through a real (tiny) VAE."""

import pytest
import torch

from cosim_dist.eval.decode import LatentDecoder, load_vae, make_decoder, pixels_to_uint8
from cosim_dist.latents import latent_scale_bias

def test_pixels_map_like_edm():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0]).reshape(1, 1, 2, 3)
    assert pixels_to_uint8(x).flatten().tolist() == [0, 0, 128, 191, 255, 255]

def test_latents_undo_scale_and_bias_then_decode(tiny_vae):
    vae = load_vae(tiny_vae)
    mean, std = (5.81, 3.25, 0.12, -2.15), (4.17, 4.62, 3.71, 3.28)
    z = torch.randn(5, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    images = LatentDecoder(vae, mean, std, batch=2)(z)
    scale, bias = (torch.tensor(v).reshape(1, 4, 1, 1) for v in latent_scale_bias(mean, std))
    with torch.no_grad():
        expected = vae.decode((z - bias) / scale).sample.clamp(0, 1).mul(255).to(torch.uint8)
    assert images.dtype == torch.uint8 and images.shape == (5, 3, 32, 32)
    # decoder batch 2 vs 5: fp32 reassociation (~1e-6) is far below one level (1/255) but may straddle a boundary
    assert (images.int() - expected.int()).abs().max().item() <= 1
    assert images.float().std() > 0

def test_latent_models_need_the_vae(tmp_path):
    assert make_decoder(3, None, torch.device('cpu')) is pixels_to_uint8
    with pytest.raises(FileNotFoundError, match='eval.vae=DIR'):
        make_decoder(4, None, torch.device('cpu'))
    with pytest.raises(FileNotFoundError, match='stabilityai/sd-vae-ft-mse'):
        load_vae(tmp_path)
