"""Checkpoints in an object store (`file://`, a local path, or `s3://`), preemption-safe.

Layout under the store root: `step-<nimg>/` prefixes, immutable once committed. Saving is collective:
every rank stages its own files (its DeepSpeed / engine writes) in a rank-local directory, uploads them
(optionally in a background thread while training continues) and reports (key, size, sha256); rank 0 then
writes `step-<nimg>/manifest.json` and, last, the `COMMIT` marker (create-only where the store supports it).
A step without COMMIT does not exist. Resume opens the newest commit lazily (`StepReader`: each rank reads only the
files and byte ranges it needs, verified as they are read) and falls back to older commits when a load finds it
unusable (`retire`: it loses its COMMIT, so that training writes the step again); retention keeps the last `keep`
commits and never the one resumed from.
"""

import functools
import hashlib
import json
import pathlib
import re
import shutil
import threading
import uuid

from .distributed import barrier, gather_object
from .elastic import CorruptState, agree_on_reads
from .logging import log
from .storage import ObjectStore, StorageConfig, open_store, sha256_file

STEP = re.compile(r'step-(\d{12})')

def step_prefix(nimg: int) -> str:
    return f'step-{nimg:012d}'

class CheckpointManager:
    """The trainer's Checkpointer (latest / stage / commit) over an object store."""

    def __init__(self, url: str, staging: pathlib.Path, *, rank: int = 0, keep: int = 2, async_upload: bool = True,
                 storage: StorageConfig | None = None) -> None:
        self.store: ObjectStore = open_store(url, storage)
        self.staging, self.rank, self.keep, self.async_upload = pathlib.Path(staging), rank, keep, async_upload
        self.resumed: str | None = None         # the commit this run resumed from (never deleted)
        self._pending: tuple[int, threading.Thread, dict] | None = None
        self.retired: set[int] = set()          # commits found unusable by this run

    #------------------------------------------------------------------------

    def committed(self) -> list[int]:
        """Committed steps, oldest first (a COMMIT marker under step-<nimg>/)."""
        steps = {int(m.group(1)) for key in self.store.list('step-')
                 if (m := STEP.match(key)) and key.endswith('/COMMIT')}
        return sorted(steps)

    def _rank_dir(self, nimg: int) -> pathlib.Path:
        return self.staging / f'stage-rank{self.rank}' / step_prefix(nimg)

    def stage(self, nimg: int) -> pathlib.Path:
        """Collective. Finish the previous save, then hand out an empty rank-local directory for this one."""
        self.wait()
        if nimg in (self.committed() if self.rank == 0 else []):
            raise FileExistsError(f'{self.store.url}/{step_prefix(nimg)} is already committed; steps are immutable')
        path = self._rank_dir(nimg)
        shutil.rmtree(path.parent, ignore_errors=True)
        path.mkdir(parents=True)
        barrier()
        return path

    def commit(self, nimg: int, digests: dict[str, str] | None = None) -> None:
        """Collective. Upload this rank's files (in the background if async) and commit when all ranks are done.
        `digests`: the sha256 of files (by staged path) that the writer hashed as it wrote them; the rest are hashed
        here."""
        digests = digests or {}
        path = self._rank_dir(nimg)
        result: dict = {}

        def upload() -> None:
            try:
                entries = []
                for f in sorted(p for p in path.rglob('*') if p.is_file()):
                    name = f.relative_to(path).as_posix()
                    key = f'{step_prefix(nimg)}/{name}'
                    digest = digests.get(name) or sha256_file(f)
                    entries.append({'key': key, 'size': f.stat().st_size, 'sha256': digest})
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
        reports = gather_object(result)
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
        self.retired.discard(nimg)                 # written again: a new commit
        shutil.rmtree(self._rank_dir(nimg).parent, ignore_errors=True)
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

    def open_step(self, nimg: int) -> 'StepReader':
        """A committed step, read lazily (FileNotFoundError / ValueError if its manifest is missing or unreadable)."""
        prefix = step_prefix(nimg)
        return StepReader(self.store, prefix, json.loads(self.store.read(f'{prefix}/manifest.json')))

    def latest(self) -> 'StepReader | None':
        """Collective. The newest commit (not retired) whose manifest reads on every rank, or None. Its files are
        verified as they are read; a load that finds them unusable calls `retire` and asks again."""
        steps = gather_object(self.committed() if self.rank == 0 else None)[0]
        for nimg in reversed(steps):
            if nimg in self.retired:
                continue
            try:
                reader = agree_on_reads(functools.partial(self.open_step, nimg),
                                        f'{self.store.url}/{step_prefix(nimg)} manifest')
            except CorruptState as e:
                self.retire(nimg, str(e))
                continue
            self.resumed = step_prefix(nimg)
            return reader
        return None

    def retire(self, nimg: int, why: str) -> None:
        """Collective. An unusable commit loses its COMMIT (so that training writes the step again)."""
        log.warning(f'checkpoint {self.store.url}/{step_prefix(nimg)} is unusable ({why}); retiring it (COMMIT '
                    f'removed, so that the step is written again) and trying the previous commit')
        if self.rank == 0:
            self.store.delete(f'{step_prefix(nimg)}/COMMIT')
        self.retired.add(nimg)
        if self.resumed == step_prefix(nimg):
            self.resumed = None
        barrier()

    def close(self) -> None:
        self.wait()

#----------------------------------------------------------------------------

class StepReader:
    """One committed step in the store, read without fetching whole files: small files whole (verified against the
    manifest's sha256), shard files by byte ranges (verified by elastic.py's block hashes). `bytes_read` counts what
    this rank read."""

    def __init__(self, store: ObjectStore, prefix: str, manifest: dict) -> None:
        self.store, self.prefix, self.nimg = store, prefix, int(manifest['nimg'])
        self.files = {e['key'][len(prefix) + 1:]: e for e in manifest['files']}
        self.bytes_read = 0

    @property
    def url(self) -> str:
        return f'{self.store.url}/{self.prefix}'

    def _entry(self, name: str) -> dict:
        if name not in self.files:
            raise FileNotFoundError(f'{self.url}/{name} is not in the checkpoint manifest')
        return self.files[name]

    def read(self, name: str) -> bytes:
        entry, data = self._entry(name), self.store.read(f'{self.prefix}/{name}')
        self.bytes_read += len(data)
        if len(data) != entry['size'] or hashlib.sha256(data).hexdigest() != entry['sha256']:
            raise CorruptState(f'{self.url}/{name} does not match its manifest entry (size or sha256)')
        return data

    def read_range(self, name: str, start: int, end: int) -> bytes:
        self._entry(name)
        data = self.store.read_range(f'{self.prefix}/{name}', start, end)
        self.bytes_read += len(data)
        return data
