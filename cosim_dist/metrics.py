"""Feature statistics and the Frechet distance (ALGORITHM.md Part II s.7, "Metrics implementation")."""

import numpy as np
import torch

class MomentAccumulator:
    """Running float64 sums of f and f f^T; mean and unbiased (N - 1) covariance at the end."""

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features: torch.Tensor) -> None:
        f = features.detach().to('cpu', torch.float64).flatten(1)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def all_reduce(self) -> None:
        """Sum the statistics of every rank (float64), so that every rank holds the global moments."""
        if not torch.distributed.is_initialized():
            return
        device = 'cuda' if torch.distributed.get_backend() == 'nccl' else 'cpu'
        flat = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64), self.sum, self.outer.flatten()]).to(device)
        torch.distributed.all_reduce(flat)
        flat = flat.cpu()
        d = len(self.sum)
        self.n, self.sum, self.outer = int(flat[0].item()), flat[1:1 + d], flat[1 + d:].reshape(d, d)

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        mu = self.sum / self.n
        sigma = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.numpy(), sigma.numpy()

def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), float64, symmetric eigensolver."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    r = _sqrt_psd(s1)
    m = r @ s2 @ r
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross)
