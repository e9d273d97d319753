"""A small EDM-preconditioned UNet for the toy world (fast on a 2-core CPU)."""

import math

import torch
from torch import nn
from torch.nn import functional as F

from .aux import add_t_embedding
from .precond import Precond

#----------------------------------------------------------------------------
# Building blocks.

class FourierEmbedding(nn.Module):
    """Sinusoidal embedding of c_noise with fixed log-spaced frequencies, in fp32."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer('freqs', torch.exp(-math.log(1e3) * torch.arange(dim // 2) / (dim // 2)))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        x = c_noise.reshape(-1, 1).float() * self.freqs.float()
        return torch.cat([x.cos(), x.sin()], dim=1)

class NoiseMLP(nn.Module):
    """Noise-level path: Fourier features -> Linear -> SiLU -> Linear."""

    def __init__(self, dim: int, emb_dim: int) -> None:
        super().__init__()
        self.fourier = FourierEmbedding(dim)
        self.layer0 = nn.Linear(dim, emb_dim)
        self.layer1 = nn.Linear(emb_dim, emb_dim)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        return self.layer1(F.silu(self.layer0(self.fourier(c_noise).to(self.layer0.weight.dtype))))

class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv residual block with an additive embedding, output scaled by 1/sqrt(2)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm0 = nn.GroupNorm(min(8, cin // 4), cin)
        self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb_dim, cout)
        self.norm1 = nn.GroupNorm(min(8, cout // 4), cout)
        self.conv1 = nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = dropout
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x))) + self.affine(emb)[:, :, None, None]
        h = F.dropout(F.silu(self.norm1(h)), p=self.dropout, training=self.training)
        h = self.conv1(h)
        return (h + (self.skip(x) if self.skip is not None else x)) * math.sqrt(0.5)

#----------------------------------------------------------------------------
# UNet on a 2x pixel-unshuffled image: levels at res/2, res/4, ... with widths C * channel_mult.

class ToyUNet(nn.Module):
    T_EMBED_SOURCES = {'map_noise_t': 'map_noise'}

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, model_channels: int = 32,
                 channel_mult: tuple[int, ...] = (1, 2), num_blocks: int = 1, dropout: float = 0.0,
                 aux_t_embed: str | None = None) -> None:
        super().__init__()
        C, emb_dim = model_channels, 4 * model_channels
        self.map_noise = NoiseMLP(C, emb_dim)
        self.map_noise_t = NoiseMLP(C, emb_dim) if aux_t_embed else None
        self.t_gain = nn.Parameter(torch.zeros([])) if aux_t_embed == 'gated' else None
        self.map_label = nn.Linear(label_dim, emb_dim, bias=False) if label_dim else None
        self.conv_in = nn.Conv2d(img_channels * 4, C, 3, padding=1)
        self.enc, self.dec, skips, cin = nn.ModuleList(), nn.ModuleList(), [], C
        for mult in channel_mult:
            for _ in range(num_blocks):
                self.enc.append(ResBlock(cin, C * mult, emb_dim, dropout))
                cin = C * mult
                skips.append(cin)
        self.mid = ResBlock(cin, cin, emb_dim, dropout)
        for mult in reversed(channel_mult):
            for _ in range(num_blocks):
                self.dec.append(ResBlock(cin + skips.pop(), C * mult, emb_dim, dropout))
                cin = C * mult
        self.levels, self.num_blocks = len(channel_mult), num_blocks
        self.norm_out = nn.GroupNorm(min(8, cin // 4), cin)
        self.conv_out = nn.Conv2d(cin, img_channels * 4, 3, padding=1)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None,
                c_noise_t: torch.Tensor | None) -> torch.Tensor:
        emb = self.map_noise(c_noise)
        if self.map_noise_t is not None:
            emb_t = self.map_noise_t(c_noise_t)
            emb = add_t_embedding(emb, emb_t, self.t_gain)
        if self.map_label is not None:
            class_labels = class_labels.to(self.map_label.weight.dtype)       # fp32 from Precond; bf16 teacher
            emb = emb + self.map_label(class_labels * math.sqrt(class_labels.shape[1]))
        emb = F.silu(emb)
        h, skips = self.conv_in(F.pixel_unshuffle(x, 2)), []
        for i, block in enumerate(self.enc):
            h = block(h, emb)
            skips.append(h)
            if (i + 1) % self.num_blocks == 0 and (i + 1) // self.num_blocks < self.levels:
                h = F.avg_pool2d(h, 2)
        h = self.mid(h, emb)
        for i, block in enumerate(self.dec):
            if i % self.num_blocks == 0 and i > 0:
                h = F.interpolate(h, scale_factor=2, mode='nearest')
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), 2)

#----------------------------------------------------------------------------
# EDM preconditioning around the UNet: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (precond.Precond).

class ToyPrecond(Precond):
    UNET = ToyUNet
