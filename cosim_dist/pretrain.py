"""Pretraining of the toy teacher by EDM denoising score matching (docs/ALGORITHM.md, "Reference facts",
"Training noise and weighting"): ln sigma ~ N(P_mean, P_std^2), loss lambda(sigma) |D(x0 + sigma n) - y|^2 with
y = x0, or with pretrain.target=exact the toy world's E[x0 | x0 + sigma n, c] (same minimiser, no target noise)."""

import copy
import math

import torch

from . import cosim
from .config import PretrainConfig
from .logging import RunLogger
from .nets.precond import edm_loss_weight
from .seeds import step_seed
from .trainer import BatchStream

def dsm_loss(net: torch.nn.Module, x0: torch.Tensor, labels: torch.Tensor | None, cfg: PretrainConfig,
             sigma_data: float, gen: torch.Generator, exact: torch.nn.Module | None = None) -> torch.Tensor:
    """EDM denoising score matching loss (docs/ALGORITHM.md), summed over pixels, mean over the batch; the target is
    x0, or exact(x_sigma, sigma, labels) where an exact denoiser is given (then x0 first widened by cfg.spread inside
    its component, GMMWorld.widen)."""
    n = x0.shape[0]
    if exact is not None and cfg.spread != 1:
        x0 = exact.world.widen(x0, labels.argmax(1), cfg.spread)
    sigma = (torch.randn(n, generator=gen, device=x0.device) * cfg.p_std + cfg.p_mean).exp()
    noisy = x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen, device=x0.device)
    target = x0 if exact is None else exact(noisy, sigma, labels)
    err = (net(noisy, sigma, labels) - target) ** 2
    return (edm_loss_weight(sigma, sigma_data) * err.flatten(1).sum(1)).mean()

def pretrain_teacher(net: torch.nn.Module, data: BatchStream, cfg: PretrainConfig, sigma_data: float, seed: int,
                     logger: RunLogger, exact: torch.nn.Module | None = None) -> torch.nn.Module:
    """Train `net` from scratch with Adam (cosine-decayed lr) and return its EMA, frozen and in eval mode. `exact`:
    the closed-form denoiser that pretrain.target=exact regresses onto."""
    device = next(net.parameters()).device
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    total, nimg = int(cfg.kimg * 1000), 0
    logger.start(total, 0, 'pretrain')
    net.train()
    while nimg < total:
        gen = torch.Generator(device).manual_seed(step_seed(seed, nimg))
        x0, c = data.next_batch()
        x0, c = x0.to(device), c.to(device)
        for group in opt.param_groups:
            group['lr'] = cfg.lr * 0.5 * (1 + math.cos(math.pi * nimg / total))
        loss = dsm_loss(net, x0, c if c.shape[1] else None, cfg, sigma_data, gen, exact)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        nimg += x0.shape[0]
        cosim.ema_update(ema, net, cosim.ema_beta(x0.shape[0], nimg, cfg.ema_halflife_kimg, 0.1))
        logger.advance(x0.shape[0], loss=loss.item())
        if nimg % (cfg.batch * 50) == 0 or nimg >= total:
            logger.status(nimg, {'pretrain/loss': loss.item()})
    logger.close()
    return ema
