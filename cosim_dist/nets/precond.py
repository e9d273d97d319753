"""EDM preconditioning shared by every denoiser (docs/ALGORITHM.md, "Reference facts")."""

import torch
from torch import nn

from .aux import T_EMBED_MODES

#----------------------------------------------------------------------------
# EDM preconditioning coefficients (docs/ALGORITHM.md, "Reference facts"):
#   c_skip = sd^2 / (s^2 + sd^2), c_out = s*sd / sqrt(s^2 + sd^2),
#   c_in = 1 / sqrt(s^2 + sd^2), c_noise = ln(s) / 4.

def edm_coefficients(sigma: torch.Tensor,
                     sigma_data: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM preconditioning (c_skip, c_out, c_in, c_noise) for a sigma tensor of any shape."""
    sigma = sigma.to(torch.float32)
    var = sigma ** 2 + sigma_data ** 2
    c_skip = sigma_data ** 2 / var
    c_out = sigma * sigma_data / var.sqrt()
    c_in = 1 / var.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise

def as_batch_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar, [N] or [N,1,1,1] sigma to a float32 [N,1,1,1] tensor matching x."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    return sigma.reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)

def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM loss weight lambda(sigma) = (sigma^2 + sd^2) / (sigma * sd)^2 (docs/ALGORITHM.md, "Reference facts")."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2

#----------------------------------------------------------------------------
# The preconditioned denoiser D(x; sigma, c) = c_skip x + c_out F(c_in x; c_noise, c) (docs/ALGORITHM.md),
# the contract of cosim_dist.nets. F runs in the parameters' dtype; x, sigma, the embeddings' inputs and D stay fp32.

class Precond(nn.Module):
    """Base of every architecture: a subclass names its UNet F, the class UNET built as
    UNET(img_resolution, img_channels, label_dim, aux_t_embed=..., **unet_kwargs) and called as
    F(c_in x, c_noise, class_labels, c_noise_t), stored under UNET_NAME (the checkpoint's key prefix).
    UNET.T_EMBED_SOURCES, relative to the UNet, names the teacher modules that the auxiliary's sigma_t branch copies
    (aux.py). A subclass with has_logvar = True also defines logvar(c_noise) -> [N, 1, 1, 1]."""

    UNET: type[nn.Module]
    UNET_NAME = 'model'
    has_logvar = False
    T_EMBED_SOURCES: dict[str, str]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        prefix = cls.UNET_NAME + '.'
        cls.T_EMBED_SOURCES = {prefix + dst: prefix + src for dst, src in cls.UNET.T_EMBED_SOURCES.items()}

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, sigma_data: float = 0.5,
                 aux_t_embed: str | None = None, **unet_kwargs) -> None:
        super().__init__()
        if aux_t_embed not in (None, *T_EMBED_MODES):
            raise ValueError(f'aux_t_embed={aux_t_embed!r} is invalid; valid choices: None, {", ".join(T_EMBED_MODES)}')
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                sigma_data=sigma_data, aux_t_embed=aux_t_embed, **unet_kwargs)
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.sigma_data, self.aux_t_embed = sigma_data, aux_t_embed
        self.add_module(self.UNET_NAME, self.UNET(img_resolution, img_channels, label_dim, aux_t_embed=aux_t_embed,
                                                  **unet_kwargs))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                sigma_t: torch.Tensor | float | None = None,
                return_logvar: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if return_logvar and not self.has_logvar:
            raise ValueError(f'{type(self).__name__} has no logvar head (has_logvar=False)')
        if (sigma_t is None) != (self.aux_t_embed is None):
            raise ValueError('sigma_t is required by auxiliary networks (aux_t_embed set) and refused by others')
        x = x.to(torch.float32)
        c_skip, c_out, c_in, c_noise = edm_coefficients(as_batch_sigma(sigma, x), self.sigma_data)
        c_noise_t = None if sigma_t is None else edm_coefficients(as_batch_sigma(sigma_t, x),
                                                                  self.sigma_data)[3].flatten()
        if not self.label_dim:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros(x.shape[0], self.label_dim, device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = next(self.parameters()).dtype
        F_x = getattr(self, self.UNET_NAME)((c_in * x).to(dtype), c_noise.flatten(), class_labels, c_noise_t)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        return (D_x, self.logvar(c_noise.flatten())) if return_logvar else D_x
