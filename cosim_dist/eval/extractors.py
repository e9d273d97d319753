"""Feature extractors for FID and FD-DINOv2, with weights from local files (docs/ALGORITHM.md, "Reference facts",
"Metrics implementation"). Both take uint8 RGB images [N, 3, H, W] and return float32 features.

- Inception-V3 (2048-d pool features): torch-fidelity's TF-compatible extractor with the official
  `weights-inception-2015-12-05-6726825d.pth`. Only a file with exactly those weights gives numbers that may be
  called FID.
- DINOv2 ViT-L/14 (1024-d CLS token after the final norm): our own module with the official parameter names
  (`dinov2_vitl14_pretrain.pth`), EDM2's preprocessing: bicubic + antialias resize to 224, /255, ImageNet
  mean/std, fp32.
"""

import math
import pathlib

import torch
from torch import nn
from torch.nn import functional as F

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# sha256 of the official `weights-inception-2015-12-05-6726825d.pth` (95,628,359 bytes; the same bytes as pytorch-fid's
# `pt_inception-2015-12-05-6726825d.pth`; the name carries its first 8 hex digits, torch.hub's convention).
INCEPTION_SHA256 = '6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2'
INCEPTION_RESIZE = 'TF1-compatible bilinear to 299x299 (torch-fidelity inception-v3-compat)'
DINOV2_RESIZE = 'bicubic + antialias to 224x224, ImageNet mean/std (EDM2)'

def is_official_inception(sha256: str) -> bool:
    """Whether Inception weights with this sha256 give numbers that may be called FID."""
    return sha256 == INCEPTION_SHA256

def weights_file(path: str | pathlib.Path | None, what: str, official: str) -> pathlib.Path:
    """A readable weights file, or a clear error saying which file to provide and where."""
    if path is None or not pathlib.Path(path).is_file():
        raise FileNotFoundError(f'{what} weights not found at {path}: download {official} and pass its local path')
    return pathlib.Path(path)

def load_state_dict(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """Tensors only: `weights_only=True`, so a weights file cannot run code."""
    state = torch.load(path, map_location='cpu', weights_only=True)
    return state.get('state_dict', state) if isinstance(state, dict) else state

#----------------------------------------------------------------------------
# Inception-V3 through torch-fidelity.

def inception_v3(path: str | pathlib.Path | None) -> nn.Module:
    """torch-fidelity's InceptionV3 returning the 2048-d pool features; the file is checked to hold only tensors
    before torch-fidelity (which unpickles without restrictions) reads it."""
    path = weights_file(path, 'Inception', 'weights-inception-2015-12-05-6726825d.pth (torch-fidelity release)')
    load_state_dict(path)
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    net = FeatureExtractorInceptionV3('inception-v3-compat', ['2048'], feature_extractor_weights_path=str(path))

    class Pool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.net(images)[0].float()
    return Pool().eval()

#----------------------------------------------------------------------------
# DINOv2 ViT-L/14 (parameter names as in the official checkpoint).

class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.ls1 = nn.Module()
        self.ls1.gamma = nn.Parameter(torch.ones(dim))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, 4 * dim)
        self.mlp.fc2 = nn.Linear(4 * dim, dim)
        self.ls2 = nn.Module()
        self.ls2.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.attn.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d)
        x = x + self.ls1.gamma * self.attn.proj(y)
        return x + self.ls2.gamma * self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))

class DinoV2(nn.Module):
    """ViT with a 14x14 patch embedding, position embeddings for a 518px (37x37) grid interpolated to the input,
    LayerScale blocks and a final norm; returns the normalised CLS token."""

    def __init__(self, dim: int = 1024, depth: int = 24, heads: int = 16, patch: int = 14, grid: int = 37) -> None:
        super().__init__()
        self.patch = patch
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        """DINOv2's bicubic interpolation of the patch position embeddings (scale (h + 0.1) / grid)."""
        cls, pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        m = int(math.sqrt(pos.shape[1]))
        if (h, w) == (m, m):
            return self.pos_embed
        pos = F.interpolate(pos.reshape(1, m, m, -1).permute(0, 3, 1, 2), mode='bicubic', antialias=False,
                            scale_factor=((h + 0.1) / m, (w + 0.1) / m))
        return torch.cat([cls, pos.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x)
        h, w = x.shape[-2:]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        x = x + self._pos_embed(h, w)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]

class DinoFeatures(nn.Module):
    """uint8 images -> EDM2's DINOv2 preprocessing -> 1024-d features (fp32)."""

    def __init__(self, net: DinoV2) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1))
        self.register_buffer('std', torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f'DINOv2 features need uint8 RGB images [N, 3, H, W], '
                             f'got {images.dtype} {tuple(images.shape)}')
        x = F.interpolate(images.float(), size=(224, 224), mode='bicubic', antialias=True) / 255
        return self.net((x - self.mean) / self.std).float()

def dinov2_vitl14(path: str | pathlib.Path | None) -> DinoFeatures:
    path = weights_file(path, 'DINOv2', 'dinov2_vitl14_pretrain.pth (facebookresearch/dinov2 release)')
    net = DinoV2()
    missing, unexpected = net.load_state_dict(load_state_dict(path), strict=False)
    if missing or unexpected:
        raise ValueError(f'{path} is not a DINOv2 ViT-L/14 checkpoint: '
                         f'missing {missing[:5]}, unexpected {unexpected[:5]}')
    return DinoFeatures(net)
