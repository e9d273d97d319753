"""EDM preconditioning shared by every denoiser (ALGORITHM.md Part II section 1)."""

import torch

#----------------------------------------------------------------------------
# EDM preconditioning coefficients (ALGORITHM.md Part II s.1, table row "EDM"):
#   c_skip = sd^2 / (s^2 + sd^2), c_out = s*sd / sqrt(s^2 + sd^2),
#   c_in = 1 / sqrt(s^2 + sd^2), c_noise = ln(s) / 4.

def edm_coefficients(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
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
    """EDM loss weight lambda(sigma) = (sigma^2 + sd^2) / (sigma * sd)^2 (Part II s.1, 'Training noise')."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
