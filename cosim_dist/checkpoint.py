"""Training-state checkpoints on a filesystem shared by the ranks: one `step-<nimg>` directory per
checkpoint, valid only once its COMMIT marker exists (written last, atomically, by rank 0); no `latest`
pointer; the newest committed step wins; the last `keep` committed steps are retained."""

import os
import pathlib
import re
import shutil

import torch

def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()

class LocalCheckpointer:
    """Implements the trainer's Checkpointer protocol (latest / stage / commit) under one directory."""

    def __init__(self, directory: pathlib.Path, keep: int = 2, rank: int = 0) -> None:
        self.dir, self.keep, self.rank = pathlib.Path(directory), keep, rank
        self.dir.mkdir(parents=True, exist_ok=True)

    def _step_dir(self, nimg: int) -> pathlib.Path:
        return self.dir / f'step-{nimg:012d}'

    def committed(self) -> list[pathlib.Path]:
        """Committed step directories, oldest first."""
        steps = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := re.fullmatch(r'step-(\d+)', p.name))]
        return [p for _, p in sorted(steps) if (p / 'COMMIT').is_file()]

    def latest(self) -> pathlib.Path | None:
        found = self.committed()
        return found[-1] if found else None

    def stage(self, nimg: int) -> pathlib.Path:
        path = self._step_dir(nimg)
        if (path / 'COMMIT').exists():
            raise FileExistsError(f'checkpoint {path} is already committed; committed steps are immutable')
        if self.rank == 0 and path.exists():       # a half-written attempt at this step (never committed)
            shutil.rmtree(path)
        _barrier()
        return path

    def commit(self, nimg: int) -> None:
        _barrier()
        if self.rank == 0:
            tmp = self._step_dir(nimg) / 'COMMIT.tmp'
            tmp.write_text(f'{nimg}\n')
            os.replace(tmp, tmp.with_name('COMMIT'))
            for old in self.committed()[:-self.keep]:
                shutil.rmtree(old)
        _barrier()
