"""Feature statistics and the Frechet distance (docs/ALGORITHM.md, "Reference facts")."""

import io
import pathlib
import pickle

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
        flat = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64), self.sum,
                          self.outer.flatten()]).to(device)
        torch.distributed.all_reduce(flat)
        flat = flat.cpu()
        d = len(self.sum)
        self.n, self.sum, self.outer = int(flat[0].item()), flat[1:1 + d], flat[1 + d:].reshape(d, d)

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        return {'n': self.n, 'sum': self.sum.clone(), 'outer': self.outer.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor | int]) -> None:
        if state['sum'].shape != self.sum.shape:
            raise ValueError(f'moment state of dimension {state["sum"].shape[0]} '
                             f'does not fit dimension {self.sum.shape[0]}')
        self.n, self.sum, self.outer = int(state['n']), state['sum'].to(torch.float64), state['outer'].to(torch.float64)

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

def frechet_to_reference(acc: MomentAccumulator, ref_mu: np.ndarray, ref_sigma: np.ndarray) -> float:
    """The Frechet distance of the accumulated moments to reference moments."""
    mu, sigma = acc.moments()
    return frechet_distance(mu, sigma, ref_mu, ref_sigma)

#----------------------------------------------------------------------------
# Reference statistics files: EDM2's pickle {'fid': {'mu', 'sigma'}, 'fd_dinov2': {...}} (written and read) and
# EDM's .npz {mu, sigma} (read, as the 'fid' entry). Pickles are read with an allow-list of numpy's array
# reconstruction functions only, so a reference file cannot run code.

NUMPY_GLOBALS = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
                 ('numpy', 'ndarray'), ('numpy', 'dtype'), ('numpy.core.multiarray', 'scalar'),
                 ('numpy._core.multiarray', 'scalar')}

class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f'reference file refers to {module}.{name}, which is not a numpy array type')
        return super().find_class(module, name)

def save_ref(path: str | pathlib.Path, stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Write {metric: (mu, sigma)} in EDM2's reference format."""
    with open(path, 'wb') as f:
        pickle.dump({k: {'mu': mu, 'sigma': sigma} for k, (mu, sigma) in stats.items()}, f)

def load_ref(path: str | pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read an EDM2 .pkl or an EDM .npz reference as {metric: (mu, sigma)}."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'reference statistics {path} do not exist: compute them with cosim-ref-stats '
                                f'or download EDM2\'s dataset-refs/img512.pkl')
    if path.suffix == '.npz':
        with np.load(path, allow_pickle=False) as z:
            return {'fid': (z['mu'], z['sigma'])}
    data = _ArrayUnpickler(io.BytesIO(path.read_bytes())).load()
    return {k: (v['mu'], v['sigma']) for k, v in data.items()}
