"""EDM2 teachers (docs/ALGORITHM.md, "Reference facts"): the magnitude-preserving UNet of Karras et al. 2024 with EDM
preconditioning and the logvar head u(sigma), built module by module like NVlabs/edm2 `training/networks_edm2.py`, so
that `state_dict()` keys and shapes equal those of the official pickles (`unet.`, `logvar_fourier.`, `logvar_linear.`).

Forced weight normalisation (Eq. 66) is not written inside `forward` (that breaks ZeRO-3 parameter sharding): the
engines apply `nets.weight_constraint` before training and after every optimiser step instead, to the module and the
optimiser's master weights, which gives every forward the same weights (tests/nets/test_edm2.py)."""

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .aux import add_t_embedding
from .edm import attention, build_levels, resample, run_levels
from .precond import Precond

#----------------------------------------------------------------------------
# Magnitude-preserving primitives (docs/ALGORITHM.md, "Reference facts"); equation numbers of the EDM2 paper).

def normalize(x: torch.Tensor, dim: int | list[int] | None = None, eps: float = 1e-4) -> torch.Tensor:
    """x / (eps + ||x|| sqrt(n_norm / n_x)): unit RMS over `dim` (default: all but dim 0, i.e. per output unit)."""
    dim = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)

def normalize_scale(sums: torch.Tensor, length: int, eps: float = 1e-4) -> torch.Tensor:
    """The factor `normalize` applies to each output row (default dim) from the row's sum of squares:
    1 / (eps + sqrt(sums / length)) (forced weight normalisation, Eq. 66, computed on ZeRO-3 partitions)."""
    return 1 / (eps + (sums / length).sqrt())

def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU (Eq. 81): silu(x) / 0.596."""
    return F.silu(x) / 0.596

def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving sum (Eq. 88): lerp(a, b, t) / sqrt((1-t)^2 + t^2)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)

def mp_cat(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Magnitude-preserving concatenation along channels (Eq. 103): [w_a a, w_b b] with w_a = C (1-t) / sqrt(N_a),
    w_b = C t / sqrt(N_b), C = sqrt((N_a + N_b) / ((1-t)^2 + t^2))."""
    Na, Nb = a.shape[1], b.shape[1]
    C = math.sqrt((Na + Nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (C / math.sqrt(Na) * (1 - t)), b * (C / math.sqrt(Nb) * t)], dim=1)

class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features (Eq. 75): sqrt(2) cos(x f + p), with random buffers f, p that the
    checkpoint carries."""

    def __init__(self, channels: int, bandwidth: float = 1.0) -> None:
        super().__init__()
        self.register_buffer('freqs', 2 * math.pi * torch.randn(channels) * bandwidth)
        self.register_buffer('phases', 2 * math.pi * torch.rand(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.float32).outer(self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)

class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel [k, k]) or linear layer (kernel []) without bias (Eq. 47):
    x * (gain normalize(w) / sqrt(fan_in)), computed in fp32 and cast to x's dtype."""

    def __init__(self, cin: int, cout: int, kernel: list[int]) -> None:
        super().__init__()
        self.out_channels = cout
        self.weight = nn.Parameter(torch.randn(cout, cin, *kernel))

    def forward(self, x: torch.Tensor, gain: torch.Tensor | float = 1.0) -> torch.Tensor:
        w = normalize(self.weight.to(torch.float32))
        w = (w * (gain / math.sqrt(w[0].numel()))).to(x.dtype)
        return x @ w.t() if w.ndim == 2 else F.conv2d(x, w, padding=w.shape[-1] // 2)

#----------------------------------------------------------------------------
# Encoder/decoder block (docs/ALGORITHM.md, "Reference facts"), EDM2 Figure 21).

class Block(nn.Module):
    def __init__(self, cin: int, cout: int, emb_channels: int, flavor: str = 'enc', resample_mode: str = 'keep',
                 attention: bool = False, channels_per_head: int = 64, dropout: float = 0.0, res_balance: float = 0.3,
                 attn_balance: float = 0.3, clip_act: float | None = 256) -> None:
        super().__init__()
        self.out_channels, self.flavor, self.resample_mode = cout, flavor, resample_mode
        self.num_heads = cout // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(cout if flavor == 'enc' else cin, cout, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, cout, kernel=[])
        self.conv_res1 = MPConv(cout, cout, kernel=[3, 3])
        self.conv_skip = MPConv(cin, cout, kernel=[1, 1]) if cin != cout else None
        self.attn_qkv = MPConv(cout, cout * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(cout, cout, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_mode)
        if self.flavor == 'enc':
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)                                           # pixel norm
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == 'dec' and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            y = self.attn_qkv(x)
            y = y.reshape(y.shape[0], self.num_heads, -1, 3, y.shape[2] * y.shape[3])
            q, k, v = normalize(y, dim=2).unbind(3)                           # pixel norm and split
            y = self.attn_proj(attention(q, k, v).reshape(x.shape))
            x = mp_sum(x, y, t=self.attn_balance)
        return x if self.clip_act is None else x.clip(-self.clip_act, self.clip_act)

#----------------------------------------------------------------------------
# The UNet (docs/ALGORITHM.md). An auxiliary (docs/ALGORITHM.md, "Networks") adds the duplicate noise embedding
# emb_noise_t(emb_fourier_t(c_noise(sigma_t))), times t_gain (init 0) when gated, before the label is mixed in.

class UNet(nn.Module):
    T_EMBED_SOURCES = {'emb_fourier_t': 'emb_fourier', 'emb_noise_t': 'emb_noise'}

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, model_channels: int = 192,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_noise: int | None = None,
                 channel_mult_emb: int | None = None, num_blocks: int = 3, attn_resolutions: Sequence[int] = (16, 8),
                 label_balance: float = 0.5, concat_balance: float = 0.5, aux_t_embed: str | None = None,
                 **block_kwargs) -> None:
        super().__init__()
        widths = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else widths[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(widths)
        self.label_balance, self.concat_balance = label_balance, concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        if aux_t_embed:
            self.emb_fourier_t = MPFourier(cnoise)
            self.emb_noise_t = MPConv(cnoise, cemb, kernel=[])
        self.t_gain = nn.Parameter(torch.zeros([])) if aux_t_embed == 'gated' else None
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim else None
        block = lambda cin, cout, flavor, **kw: Block(cin, cout, cemb, flavor, **kw, **block_kwargs)
        self.enc, self.dec = build_levels(img_resolution, MPConv(img_channels + 1, widths[0], kernel=[3, 3]), widths,
                                          num_blocks, attn_resolutions, block)
        self.out_conv = MPConv(widths[0], img_channels, kernel=[3, 3])

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None,
                c_noise_t: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.emb_noise(self.emb_fourier(c_noise))
        if c_noise_t is not None:
            emb_t = self.emb_noise_t(self.emb_fourier_t(c_noise_t))
            emb = add_t_embedding(emb, emb_t, self.t_gain)
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(class_labels * math.sqrt(class_labels.shape[1])), t=self.label_balance)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)                # constant input channel
        x = run_levels(self.enc, self.dec, x, mp_silu(emb), lambda a, b: mp_cat(a, b, t=self.concat_balance))
        return self.out_conv(x, gain=self.out_gain)

#----------------------------------------------------------------------------
# precond.Precond (the same preconditioning as EDM, docs/ALGORITHM.md plus the uncertainty head u(sigma) (EDM2 Eq. 21,
# "Uncertainty head").

class EDM2Precond(Precond):
    UNET = UNet
    UNET_NAME = 'unet'
    has_logvar = True

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, sigma_data: float = 0.5,
                 aux_t_embed: str | None = None, logvar_channels: int = 128, **unet_kwargs) -> None:
        super().__init__(img_resolution, img_channels, label_dim, sigma_data, aux_t_embed, **unet_kwargs)
        self.init_kwargs['logvar_channels'] = logvar_channels
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def logvar(self, c_noise: torch.Tensor) -> torch.Tensor:
        """u(sigma) = logvar_linear(logvar_fourier(c_noise)), one scalar per sample, [N, 1, 1, 1]."""
        return self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
