"""Checkpoints in an object store (`file://`, a local path, or `s3://`), preemption-safe.

Layout under the store root: `step-<nimg>/` prefixes, immutable once committed. Saving is collective:
every rank stages its own files (its DeepSpeed / engine writes) in a rank-local directory, uploads them
(optionally in a background thread while training continues) and reports (key, size, sha256); rank 0 then
writes `step-<nimg>/manifest.json` and, last, the `COMMIT` marker (create-only where the store supports it).
A step without COMMIT does not exist. Resume takes the newest commit whose files all match the manifest,
falling back to older commits (an unusable commit loses its COMMIT, so that training writes the step again);
retention keeps the last `keep` commits and never the one resumed from.
"""

import json
import pathlib
import re
import shutil
import threading
import uuid

import torch

from .distributed import any_rank, barrier
from .logging import log
from .storage import ObjectStore, StorageConfig, open_store, sha256_file

STEP = re.compile(r'step-(\d{12})')

def step_prefix(nimg: int) -> str:
    return f'step-{nimg:012d}'

def _gather(obj) -> list:
    if not torch.distributed.is_initialized():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out

class CheckpointManager:
    """The trainer's Checkpointer (latest / stage / commit) over an object store."""

    def __init__(self, url: str, staging: pathlib.Path, *, rank: int = 0, keep: int = 2, async_upload: bool = True,
                 storage: StorageConfig | None = None) -> None:
        self.store: ObjectStore = open_store(url, storage)
        self.staging, self.rank, self.keep, self.async_upload = pathlib.Path(staging), rank, keep, async_upload
        self.resumed: str | None = None         # the commit this run resumed from (never deleted)
        self._pending: tuple[int, threading.Thread, dict] | None = None

    #------------------------------------------------------------------------

    def committed(self) -> list[int]:
        """Committed steps, oldest first (a COMMIT marker under step-<nimg>/)."""
        steps = {int(m.group(1)) for key in self.store.list('step-')
                 if (m := STEP.match(key)) and key.endswith('/COMMIT')}
        return sorted(steps)

    def _rank_dir(self, kind: str, nimg: int) -> pathlib.Path:
        return self.staging / f'{kind}-rank{self.rank}' / step_prefix(nimg)

    def stage(self, nimg: int) -> pathlib.Path:
        """Collective. Finish the previous save, then hand out an empty rank-local directory for this one."""
        self.wait()
        if nimg in (self.committed() if self.rank == 0 else []):
            raise FileExistsError(f'{self.store.url}/{step_prefix(nimg)} is already committed; steps are immutable')
        path = self._rank_dir('stage', nimg)
        shutil.rmtree(path.parent, ignore_errors=True)
        path.mkdir(parents=True)
        barrier()
        return path

    def commit(self, nimg: int) -> None:
        """Collective. Upload this rank's files (in the background if async) and commit when all ranks are done."""
        path = self._rank_dir('stage', nimg)
        result: dict = {}

        def upload() -> None:
            try:
                entries = []
                for f in sorted(p for p in path.rglob('*') if p.is_file()):
                    key = f'{step_prefix(nimg)}/{f.relative_to(path).as_posix()}'
                    entries.append({'key': key, 'size': f.stat().st_size, 'sha256': sha256_file(f)})
                    self.store.put_file(f, key)
                result['entries'] = entries
            except Exception as e:     # reported at the collective finish, on every rank
                result['error'] = f'{type(e).__name__}: {e}'

        thread = threading.Thread(target=upload, name=f'ckpt-upload-{nimg}', daemon=True)
        thread.start()
        self._pending = (nimg, thread, result)
        if not self.async_upload:
            self.wait()

    def wait(self) -> None:
        """Collective. Join the pending upload; rank 0 writes manifest and COMMIT, then applies retention."""
        if self._pending is None:
            return
        nimg, thread, result = self._pending
        self._pending = None
        thread.join()
        reports = _gather(result)
        errors = [f'rank {r}: {rep["error"]}' for r, rep in enumerate(reports) if 'error' in rep]
        if errors:
            raise RuntimeError(f'checkpoint {self.store.url}/{step_prefix(nimg)} was not committed: '
                               + '; '.join(errors))
        if self.rank == 0:
            entries = [e for rep in reports for e in rep['entries']]
            keys = [e['key'] for e in entries]
            if len(set(keys)) != len(keys):
                raise RuntimeError('two ranks staged the same checkpoint file: '
                                   f'{sorted(k for k in keys if keys.count(k) > 1)}')
            self.store.put_bytes(json.dumps({'nimg': nimg, 'files': entries}, indent=1).encode(),
                                 f'{step_prefix(nimg)}/manifest.json')
            self._create_commit(nimg)
            log.info(f'checkpoint committed: {self.store.url}/{step_prefix(nimg)} ({len(entries)} files, '
                     f'{sum(e["size"] for e in entries) / 2**20:.1f} MiB)')
            self._retain()
        shutil.rmtree(self._rank_dir('stage', nimg).parent, ignore_errors=True)
        barrier()

    def _create_commit(self, nimg: int) -> None:
        """Create-only COMMIT holding a token of this attempt: when a retried PUT finds the marker, it is ours if the
        token matches (the first try reached the store, its reply was lost), another writer's otherwise."""
        key, body = f'{step_prefix(nimg)}/COMMIT', f'{nimg}\n{uuid.uuid4().hex}\n'.encode()
        if not self.store.create(body, key) and self.store.read(key) != body:
            raise RuntimeError(f'{self.store.url}/{key} already exists (another writer?)')

    def _retain(self) -> None:
        """Drop commits beyond the newest `keep` (never the resumed one), COMMIT marker first, and the leftovers of
        killed attempts older than the newest commit."""
        steps = self.committed()
        keep = set(steps[-self.keep:]) | ({int(STEP.match(self.resumed).group(1))} if self.resumed else set())
        for nimg in steps:
            if nimg not in keep:
                self.store.delete(f'{step_prefix(nimg)}/COMMIT')
        for key in self.store.list('step-'):
            if (m := STEP.match(key)) and int(m.group(1)) < steps[-1] and int(m.group(1)) not in keep:
                self.store.delete(key)

    #------------------------------------------------------------------------

    def _download(self, nimg: int) -> tuple[pathlib.Path | None, str]:
        """Fetch a committed step into a rank-local directory and verify every file; (path, '') or (None, why)."""
        prefix = step_prefix(nimg)
        try:
            manifest = json.loads(self.store.read(f'{prefix}/manifest.json'))
            path = self._rank_dir('restore', nimg)
            shutil.rmtree(path.parent, ignore_errors=True)
            for e in manifest['files']:
                local = path / e['key'][len(prefix) + 1:]
                local.parent.mkdir(parents=True, exist_ok=True)
                self.store.get_file(e['key'], local)
                if local.stat().st_size != e['size'] or sha256_file(local) != e['sha256']:
                    return None, f'{e["key"]} does not match its manifest entry (size or sha256)'
            return path, ''
        except (FileNotFoundError, KeyError, ValueError) as e:
            return None, f'{type(e).__name__}: {e}'

    def latest(self) -> pathlib.Path | None:
        """Collective. A local copy of the newest commit that verifies on every rank, or None."""
        steps = _gather(self.committed() if self.rank == 0 else None)[0]
        for nimg in reversed(steps):
            path, why = self._download(nimg)
            if not any_rank(path is None):
                self.resumed = step_prefix(nimg)
                return path
            log.warning(f'checkpoint {self.store.url}/{step_prefix(nimg)} is unusable ({why or "on another rank"}); '
                        f'retiring it (COMMIT removed, so that the step is written again) '
                        f'and trying the previous commit')
            if self.rank == 0:
                self.store.delete(f'{step_prefix(nimg)}/COMMIT')
        return None

    def close(self) -> None:
        self.wait()
