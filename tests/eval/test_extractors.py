"""Feature extractors built with random Kaiming weights written to files and read back through the real
weights-path code (no official weights exist on this machine)."""

import pytest
import torch

from cosim_dist.eval import extractors

def images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)

def test_dinov2_from_file(dinov2_weights):
    feats = extractors.dinov2_vitl14(dinov2_weights)
    with torch.no_grad():
        a, b = feats(images(2, 64, 0)), feats(images(2, 64, 0))
        c = feats(images(1, 96, 1))
    assert a.shape == (2, 1024) and a.dtype == torch.float32 and torch.equal(a, b)
    assert (a[0] - a[1]).abs().mean() > 1e-3 and (a[0] - c[0]).abs().mean() > 1e-3     # not degenerate
    with pytest.raises(ValueError, match='uint8 RGB'):
        feats(images(1, 32, 0).float())

def test_dinov2_position_embedding_interpolation_matches_grid():
    net = extractors.DinoV2(dim=8, depth=0, heads=2, grid=4)
    torch.nn.init.normal_(net.pos_embed)
    assert torch.equal(net._pos_embed(4, 4), net.pos_embed)
    assert net._pos_embed(16, 16).shape == (1, 16 * 16 + 1, 8)

def test_inception_from_file(inception_weights):
    feats = extractors.inception_v3(inception_weights)
    with torch.no_grad():
        f = feats(images(3, 32, 2))
    assert f.shape == (3, 2048) and torch.isfinite(f).all() and (f[0] - f[1]).abs().mean() > 0

def test_missing_or_foreign_weights_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='dinov2_vitl14_pretrain.pth'):
        extractors.dinov2_vitl14(tmp_path / 'nope.pth')
    with pytest.raises(FileNotFoundError, match='weights-inception-2015-12-05'):
        extractors.inception_v3(None)
    torch.save({'foo': torch.zeros(1)}, tmp_path / 'other.pth')
    with pytest.raises(ValueError, match='not a DINOv2 ViT-L/14 checkpoint'):
        extractors.dinov2_vitl14(tmp_path / 'other.pth')
