"""EDM teachers (docs/ALGORITHM.md): DDPM++ (SongUNet) and ADM (DhariwalUNet) with EDM preconditioning,
built module by module like NVlabs/edm `training/networks.py`, so that `state_dict()` keys and shapes equal those of
the official pickles (`model.` prefix). Also the UNet level layout that EDM2 reuses."""

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .aux import add_t_embedding
from .precond import Precond

#----------------------------------------------------------------------------
# Layers. Weights keep the checkpoint's dtype and are cast to the activations' dtype on use. Initialisation is a
# plain fan-in normal: teachers come with weights (teacher_io) and students copy the teacher's.

def fan_in_normal(*shape: int) -> torch.Tensor:
    return torch.randn(shape) / math.sqrt(math.prod(shape[1:]))

def box_filter(device: torch.device | None = None) -> torch.Tensor:
    """The [1, 1] resampling filter of EDM and EDM2 as a normalised [1, 1, 2, 2] kernel."""
    return torch.full([1, 1, 2, 2], 0.25, device=device)

def resample(x: torch.Tensor, mode: str, f: torch.Tensor | None = None) -> torch.Tensor:
    """2x depthwise resampling with the [1, 1, k, k] filter f (default: box_filter): 'down' is a stride-2
    convolution, 'up' a stride-2 transposed convolution with filter 4f, 'keep' the identity."""
    if mode == 'keep':
        return x
    f = box_filter(x.device) if f is None else f
    c, pad = x.shape[1], (f.shape[-1] - 1) // 2
    f = f.to(device=x.device, dtype=x.dtype).tile([c, 1, 1, 1])
    if mode == 'down':
        return F.conv2d(x, f, groups=c, stride=2, padding=pad)
    return F.conv_transpose2d(x, f * 4, groups=c, stride=2, padding=pad)

class Linear(nn.Module):
    def __init__(self, cin: int, cout: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(fan_in_normal(cout, cin))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

class Conv2d(nn.Module):
    """k x k convolution with bias (k = 0: none) after an optional 2x resampling; the filter is a persistent buffer
    of resampling layers only, as in the official pickles."""

    def __init__(self, cin: int, cout: int, kernel: int, resample_mode: str = 'keep') -> None:
        super().__init__()
        self.out_channels, self.resample_mode = cout, resample_mode
        self.weight = nn.Parameter(fan_in_normal(cout, cin, kernel, kernel)) if kernel else None
        self.bias = nn.Parameter(torch.zeros(cout)) if kernel else None
        self.register_buffer('resample_filter', box_filter() if resample_mode != 'keep' else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample_filter is not None:
            x = resample(x, self.resample_mode, self.resample_filter)
        if self.weight is None:
            return x
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, self.weight.to(x.dtype), b, padding=self.weight.shape[-1] // 2)

class GroupNorm(nn.Module):
    """GroupNorm with 32 groups of at least 4 channels."""

    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.groups, self.eps = min(32, channels // 4), eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)

def positional_embedding(x: torch.Tensor, channels: int, endpoint: bool = False,
                         sin_first: bool = False) -> torch.Tensor:
    """Transformer timestep features [cos(x w_j), sin(x w_j)], w_j = 10^(-4 j / (channels/2 - endpoint)), j < channels/2
    (DDPM++ uses endpoint=True and swaps the halves)."""
    half = channels // 2
    freqs = (1e-4 ** (torch.arange(half, dtype=torch.float32, device=x.device) / (half - int(endpoint)))).to(x.dtype)
    x = x.outer(freqs)
    return torch.cat([x.sin(), x.cos()] if sin_first else [x.cos(), x.sin()], dim=1)

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Self-attention with channels first (q, k, v: [..., c, HW]): v softmax_keys(q^T k / sqrt(c)), through the fused
    scaled-dot-product kernel (flash / memory-efficient on GPU; fp32 accumulation of the softmax)."""
    return F.scaled_dot_product_attention(q.mT, k.mT, v.mT).mT

#----------------------------------------------------------------------------
# Residual block of DDPM++ and ADM (docs/ALGORITHM.md, "Reference facts").

class UNetBlock(nn.Module):
    """GroupNorm-SiLU-Conv, the embedding added (DDPM++) or as scale and shift (ADM, adaptive_scale),
    GroupNorm-SiLU-Dropout-Conv, skip connection, then optional multi-head self-attention; sums scaled by skip_scale."""

    def __init__(self, cin: int, cout: int, emb_channels: int, resample_mode: str = 'keep', attention: bool = False,
                 num_heads: int | None = None, channels_per_head: int = 64, dropout: float = 0.0,
                 skip_scale: float = 1.0, eps: float = 1e-5, resample_proj: bool = False,
                 adaptive_scale: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.num_heads = (num_heads or cout // channels_per_head) if attention else 0
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        self.norm0 = GroupNorm(cin, eps)
        self.conv0 = Conv2d(cin, cout, 3, resample_mode=resample_mode)
        self.affine = Linear(emb_channels, cout * (2 if adaptive_scale else 1))
        self.norm1 = GroupNorm(cout, eps)
        self.conv1 = Conv2d(cout, cout, 3)
        self.skip = None
        if cout != cin or resample_mode != 'keep':
            self.skip = Conv2d(cin, cout, 1 if resample_proj or cout != cin else 0, resample_mode=resample_mode)
        if self.num_heads:
            self.norm2 = GroupNorm(cout, eps)
            self.qkv = Conv2d(cout, cout * 3, 1)
            self.proj = Conv2d(cout, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        y = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(y.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            y = F.silu(torch.addcmul(shift, self.norm1(y), scale + 1))
        else:
            y = F.silu(self.norm1(y + params))
        y = self.conv1(F.dropout(y, p=self.dropout, training=self.training))
        x = (y + (x if self.skip is None else self.skip(x))) * self.skip_scale
        if self.num_heads:
            qkv = self.qkv(self.norm2(x)).reshape(x.shape[0] * self.num_heads, x.shape[1] // self.num_heads, 3, -1)
            q, k, v = qkv.unbind(2)
            a = attention(q, k, v)
            x = (self.proj(a.reshape(x.shape)) + x) * self.skip_scale
        return x

#----------------------------------------------------------------------------
# The level layout shared by DDPM++, ADM and EDM2 (docs/ALGORITHM.md, "Reference facts"), s.3 "Keys").

BlockFactory = Callable[..., nn.Module]  # block(cin, cout, flavor 'enc' | 'dec', resample_mode=..., attention=...)

def build_levels(img_resolution: int, conv: nn.Module, widths: list[int], num_blocks: int,
                 attn_resolutions: Sequence[int], block: BlockFactory,
                 dec_attn_last_only: bool = False) -> tuple[nn.ModuleDict, nn.ModuleDict]:
    """Encoder: '{r}x{r}_conv' (level 0) or '_down', then '_block0..{num_blocks-1}'. Decoder, lowest level first:
    '_in0' (attention), '_in1' at the lowest level, else '_up', then '_block0..{num_blocks}', each fed a skip."""
    enc, dec, cout = nn.ModuleDict(), nn.ModuleDict(), conv.out_channels
    for level, width in enumerate(widths):
        res = img_resolution >> level
        if level == 0:
            enc[f'{res}x{res}_conv'] = conv
        else:
            enc[f'{res}x{res}_down'] = block(cout, cout, 'enc', resample_mode='down')
        for idx in range(num_blocks):
            enc[f'{res}x{res}_block{idx}'] = block(cout, width, 'enc', attention=res in attn_resolutions)
            cout = width
    skips = [m.out_channels for m in enc.values()]
    for level, width in reversed(list(enumerate(widths))):
        res = img_resolution >> level
        if level == len(widths) - 1:
            dec[f'{res}x{res}_in0'] = block(cout, cout, 'dec', attention=True)
            dec[f'{res}x{res}_in1'] = block(cout, cout, 'dec')
        else:
            dec[f'{res}x{res}_up'] = block(cout, cout, 'dec', resample_mode='up')
        for idx in range(num_blocks + 1):
            attn = res in attn_resolutions and (idx == num_blocks or not dec_attn_last_only)
            dec[f'{res}x{res}_block{idx}'] = block(cout + skips.pop(), width, 'dec', attention=attn)
            cout = width
    return enc, dec

def run_levels(enc: nn.ModuleDict, dec: nn.ModuleDict, x: torch.Tensor, emb: torch.Tensor,
               cat: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Forward through build_levels' layout; every decoder '_block*' first concatenates the latest skip."""
    skips = []
    for name, block in enc.items():
        x = block(x) if name.endswith('_conv') else block(x, emb)
        skips.append(x)
    for name, block in dec.items():
        if '_aux_' not in name:                       # DDPM++ output head, applied by SongUNet
            x = block(cat(x, skips.pop()) if '_block' in name else x, emb)
    return x

def torch_cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, b], dim=1)

#----------------------------------------------------------------------------
# DDPM++ and ADM. Both map positional noise features through map_layer0/1; an auxiliary (docs/ALGORITHM.md,
# "Networks") adds the duplicate branch map_layer0_t/1_t fed c_noise(sigma_t), times t_gain (init 0) when gated, to
# the pre-activation embedding: before ADM mixes in its label; DDPM++ mixes its label into the features before
# map_layer0, so there the branch joins after it. Augmentation labels are zero (no augmentation at distillation), so
# map_augment (bias-free) adds nothing and is kept only for the checkpoint's sake.

class EDMUNet(nn.Module):
    T_EMBED_SOURCES = {'map_layer0_t': 'map_layer0', 'map_layer1_t': 'map_layer1'}

    def __init__(self, noise_channels: int, emb_channels: int, aux_t_embed: str | None, endpoint: bool = False,
                 sin_first: bool = False) -> None:
        super().__init__()
        self.noise_channels, self.endpoint, self.sin_first = noise_channels, endpoint, sin_first
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)
        if aux_t_embed:
            self.map_layer0_t = Linear(noise_channels, emb_channels)
            self.map_layer1_t = Linear(emb_channels, emb_channels)
        self.t_gain = nn.Parameter(torch.zeros([])) if aux_t_embed == 'gated' else None

    def noise_features(self, c_noise: torch.Tensor) -> torch.Tensor:
        """Positional features of c_noise (DDPM++: endpoint=True, sin first; ADM: the defaults)."""
        return positional_embedding(c_noise, self.noise_channels, endpoint=self.endpoint, sin_first=self.sin_first)

    def mapping(self, features: torch.Tensor, c_noise_t: torch.Tensor | None) -> torch.Tensor:
        """map_layer1(silu(map_layer0(features)))
        [+ g * map_layer1_t(silu(map_layer0_t(noise_features(c_noise_t))))]."""
        emb = self.map_layer1(F.silu(self.map_layer0(features)))
        if c_noise_t is None:
            return emb
        emb_t = self.map_layer1_t(F.silu(self.map_layer0_t(self.noise_features(c_noise_t))))
        return add_t_embedding(emb, emb_t, self.t_gain)

class SongUNet(EDMUNet):
    """DDPM++ as in EDM (docs/ALGORITHM.md): label added to the noise features, standard encoder and decoder,
    output head dec.{r}x{r}_aux_norm/_aux_conv; GroupNorm eps 1e-6, one attention head, skip scale sqrt(1/2)."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, augment_dim: int = 0,
                 model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2), channel_mult_emb: int = 4,
                 num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,), dropout: float = 0.10,
                 aux_t_embed: str | None = None) -> None:
        emb_channels = model_channels * channel_mult_emb
        super().__init__(model_channels, emb_channels, aux_t_embed, endpoint=True, sin_first=True)
        self.map_label = Linear(label_dim, model_channels) if label_dim else None
        self.map_augment = Linear(augment_dim, model_channels, bias=False) if augment_dim else None
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                            eps=1e-6, resample_proj=True, adaptive_scale=False)
        self.enc, self.dec = build_levels(img_resolution, Conv2d(img_channels, model_channels, 3),
                                          [model_channels * m for m in channel_mult], num_blocks, attn_resolutions,
                                          lambda cin, cout, flavor, **kw: UNetBlock(cin, cout, **kw, **block_kwargs),
                                          dec_attn_last_only=True)
        self.head = f'{img_resolution}x{img_resolution}'
        self.dec[f'{self.head}_aux_norm'] = GroupNorm(model_channels * channel_mult[0], eps=1e-6)
        self.dec[f'{self.head}_aux_conv'] = Conv2d(model_channels * channel_mult[0], img_channels, 3)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None,
                c_noise_t: torch.Tensor | None = None) -> torch.Tensor:
        features = self.noise_features(c_noise)
        if self.map_label is not None:
            features = features + self.map_label(class_labels * math.sqrt(class_labels.shape[1]))
        emb = F.silu(self.mapping(features, c_noise_t))
        x = run_levels(self.enc, self.dec, x, emb, torch_cat)
        return self.dec[f'{self.head}_aux_conv'](F.silu(self.dec[f'{self.head}_aux_norm'](x)))

class DhariwalUNet(EDMUNet):
    """ADM as in EDM (docs/ALGORITHM.md): label added after map_layer1, adaptive scale and shift, 64 channels per head,
    attention in encoder and decoder, output out_norm/out_conv."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, augment_dim: int = 0,
                 model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_emb: int = 4,
                 num_blocks: int = 3, attn_resolutions: Sequence[int] = (32, 16, 8), dropout: float = 0.10,
                 aux_t_embed: str | None = None) -> None:
        emb_channels = model_channels * channel_mult_emb
        super().__init__(model_channels, emb_channels, aux_t_embed)
        self.map_augment = Linear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_label = Linear(label_dim, emb_channels, bias=False) if label_dim else None
        widths = [model_channels * m for m in channel_mult]
        self.enc, self.dec = build_levels(img_resolution, Conv2d(img_channels, widths[0], 3), widths, num_blocks,
                                          attn_resolutions, lambda cin, cout, flavor, **kw: UNetBlock(
                                              cin, cout, emb_channels, dropout=dropout, **kw))
        self.out_norm = GroupNorm(widths[0], eps=1e-5)
        self.out_conv = Conv2d(widths[0], img_channels, 3)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None,
                c_noise_t: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.mapping(self.noise_features(c_noise), c_noise_t)
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels)
        x = run_levels(self.enc, self.dec, x, F.silu(emb), torch_cat)
        return self.out_conv(F.silu(self.out_norm(x)))

#----------------------------------------------------------------------------
# The preconditioned EDM teachers (docs/ALGORITHM.md, "Reference facts"), precond.Precond).

class SongUNetPrecond(Precond):
    UNET = SongUNet

class DhariwalUNetPrecond(Precond):
    UNET = DhariwalUNet
