"""The resume fingerprint: the settings a training checkpoint must be resumed with, stored in its client state and
compared on resume (train.kimg, logging, eval, generate, the world size and data.num_workers may change)."""

import dataclasses
from typing import Any

from .config import Config, ConfigError, lookup

RESUME_SECTIONS = ('run.seed', 'model', 'teacher.kind', 'aux', 'data', 'schedule', 'kernel', 'loss',
                   'engine.backend', 'engine.zero_stage', 'train.batch', 'train.lr_g', 'train.lr_aux', 'train.beta1',
                   'train.beta2', 'train.eps', 'train.ema_halflife_kimg', 'train.ema_rampup', 'train.aux_steps_per_gen',
                   'train.aux_warmup_kimg')
# inside those sections, settings a resume may change: the loader's readers (data.py re-deals the epoch to them)
FREE = frozenset({'data.num_workers'})
# settings whose default changed after they were added: a checkpoint that lacks one was written under this value
WRITTEN_BEFORE = {'schedule.kind': 'rho'}   # sigma since the T1 study (docs/ALGORITHM.md, "Choices")

def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flatten(f'{prefix}.{key}', sub).items()}
    return {prefix: value}

def resume_fingerprint(cfg: Config) -> dict[str, Any]:
    """The settings a checkpoint must be resumed with, flattened to dotted keys."""
    return {k: v for key in RESUME_SECTIONS for k, v in _flatten(key, lookup(cfg, key)).items() if k not in FREE}

def check_resume(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Raise ConfigError listing every setting that differs from the checkpoint's. A setting the checkpoint lacks
    (added by a later version of cosim_dist) matches the value the version that wrote the checkpoint used: its
    default, or WRITTEN_BEFORE's where the default has changed since."""
    default = {**resume_fingerprint(Config()), **WRITTEN_BEFORE}
    older = {k: default[k] for k in set(now) - set(saved) if k in default}
    def shown(k: str) -> str:
        return f'unset (default {older[k]!r})' if k in older else repr(saved.get(k, '<unset>'))
    saved = {**older, **saved}
    diff = [f'{k}: {shown(k)} in the checkpoint, {now.get(k, "<unset>")!r} now'
            for k in sorted((set(saved) | set(now)) - FREE) if saved.get(k) != now.get(k)]
    if diff:
        raise ConfigError('cannot resume: the config differs from the checkpoint\'s (' + '; '.join(diff)
                          + '); restore these values or start a new run with run.name=...')
