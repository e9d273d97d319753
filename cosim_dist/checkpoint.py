"""Training-state checkpoints in the run directory: atomic writes (temporary file + rename), newest
loadable state wins, the last `keep` states are retained."""

import os
import pathlib
import re

import torch

from .logging import log

class LocalCheckpointer:
    """`state-<nimg>.pt` files under one directory."""

    def __init__(self, directory: pathlib.Path, keep: int = 2) -> None:
        self.dir, self.keep = pathlib.Path(directory), keep
        self.dir.mkdir(parents=True, exist_ok=True)

    def _states(self) -> list[pathlib.Path]:
        found = [(int(m.group(1)), p) for p in self.dir.glob('state-*.pt') if (m := re.fullmatch(r'state-(\d+)\.pt', p.name))]
        return [p for _, p in sorted(found)]

    def save(self, nimg: int, state: dict) -> None:
        path = self.dir / f'state-{nimg:012d}.pt'
        tmp = path.with_suffix('.tmp')
        torch.save(state, tmp)
        os.replace(tmp, path)
        for old in self._states()[:-self.keep]:
            old.unlink()

    def load_latest(self) -> dict | None:
        for path in reversed(self._states()):
            try:
                return torch.load(path, map_location='cpu', weights_only=True)
            except Exception as e:  # a damaged file must not stop a resume from the previous one
                log.warning(f'skipping unreadable checkpoint {path}: {e}')
        return None
