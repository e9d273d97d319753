"""The feature metrics of an evaluation (docs/ALGORITHM.md, "Reference facts"): which extractor, its
weights file and sha256, the name its Frechet distance is reported under, the reference statistics it is compared to.

A distance from Inception features is called 'fid' only with the official weights (extractors.INCEPTION_SHA256);
with any other file it is 'fd_inception' and `official_weights` is false. Reference files hold EDM2's keys
('fid', 'fd_dinov2'); an EDM .npz holds 'fid' only.
"""

import dataclasses
import pathlib
from collections.abc import Callable

import numpy as np
import torch

from ..storage import sha256_file
from . import extractors
from .metrics import load_ref

@dataclasses.dataclass(frozen=True)
class ExtractorKind:
    ref_key: str                                        # key in EDM2 reference files
    dim: int                                            # feature dimension
    build: Callable[[str | None], torch.nn.Module]      # weights path -> uint8 images -> features
    resize: str                                         # preprocessing, recorded with the results

KINDS = {
    'inception': ExtractorKind('fid', 2048, extractors.inception_v3, extractors.INCEPTION_RESIZE),
    'dinov2': ExtractorKind('fd_dinov2', 1024, extractors.dinov2_vitl14, extractors.DINOV2_RESIZE),
}

@dataclasses.dataclass
class FeatureMetric:
    name: str                 # result key: fid | fd_inception | fd_dinov2
    kind: ExtractorKind
    net: torch.nn.Module      # uint8 images [N, 3, H, W] -> features [N, dim]
    info: dict                # weights path and sha256, official flag, resize mode (eval.json)

def build_metric(kind_name: str, weights: str | None, device: torch.device) -> FeatureMetric:
    """Load one extractor from its local weights file (missing file: an error naming what to download)."""
    kind = KINDS[kind_name]
    try:
        net = kind.build(weights).to(device)
    except FileNotFoundError as e:
        raise FileNotFoundError(f'{e} as eval.{kind_name}_weights=PATH') from None
    sha = sha256_file(weights)
    official = kind_name != 'inception' or extractors.is_official_inception(sha)
    name = kind.ref_key if official else 'fd_inception'
    info = {'extractor': kind_name, 'weights': str(weights), 'weights_sha256': sha, 'resize': kind.resize,
            'features': kind.dim}
    if kind_name == 'inception':
        info['official_weights'] = official
    return FeatureMetric(name, kind, net, info)

def build_metrics(kind_names: list[str], weights: dict[str, str | None], device: torch.device) -> list[FeatureMetric]:
    return [build_metric(k, weights[k], device) for k in kind_names]

def reference_stats(path: str | None, metrics: list[FeatureMetric]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{metric name: (mu, sigma)} from an EDM2 .pkl or EDM .npz; every metric must be present with the right size."""
    if path is None:
        raise FileNotFoundError('eval.ref is not set: pass reference statistics (EDM2 dataset-refs/*.pkl, EDM '
                                'fid-refs/*.npz, or cosim-ref-stats output) as eval.ref=PATH')
    ref = load_ref(path)
    out = {}
    for m in metrics:
        if m.kind.ref_key not in ref:
            raise ValueError(f'reference {path} has no {m.kind.ref_key!r} statistics (it has {sorted(ref)}): compute '
                             f'them with cosim-ref-stats or drop {m.info["extractor"]} from eval.metrics')
        mu, sigma = ref[m.kind.ref_key]
        if mu.shape != (m.kind.dim,):
            raise ValueError(f'reference {path}: {m.kind.ref_key} statistics have shape {mu.shape}, '
                             f'expected ({m.kind.dim},)')
        out[m.name] = (mu, sigma)
    return out

def reference_info(path: str) -> dict:
    return {'reference': str(path), 'reference_sha256': sha256_file(pathlib.Path(path))}
