"""Machinery of the fault-injection suite: tiny toy training runs as real `launch.py` processes, the store's view of
their checkpoints (committed, verified against the manifest), strikes (a signal delivered while the run is in a chosen
phase) and exact comparison of final training states."""

import dataclasses
import hashlib
import io
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from cosim_dist.checkpoint import STEP, CheckpointManager, step_prefix
from cosim_dist.storage import ObjectStore, StorageConfig, open_store
from cosim_dist.trainer import saved_tensors

REPO = pathlib.Path(__file__).resolve().parents[2]
TOTAL = 320                                 # images of a full run: 20 steps of 16, a checkpoint every 2 steps
ARGS = ['task=train', 'pretrain.kimg=0.5', 'pretrain.batch=64', 'model.net.model_channels=16', 'train.batch=16',
        f'train.kimg={TOTAL / 1000}', 'train.log_kimg=0.016', 'train.checkpoint_kimg=0.032', 'logging.wandb=disabled',
        'logging.progress=false']
COMMITTED = re.compile(r'checkpoint committed: \S*(step-\d{12})')
RESUMED = re.compile(r'resumed at .* from \S*(step-\d{12})')
TIMEOUT = 300

def step_of(prefix: str) -> int:
    return int(STEP.match(prefix).group(1))

#----------------------------------------------------------------------------
# Runs.

@dataclasses.dataclass
class Run:
    """A `launch.py` process of run `name` under `root`; stdout and stderr go to a log file."""
    root: pathlib.Path
    name: str
    proc: subprocess.Popen
    log: pathlib.Path
    jsonl_start: int = 0                    # size of train.jsonl when this launch started (earlier launches' lines)
    started: float = dataclasses.field(default_factory=time.time)

    @property
    def dir(self) -> pathlib.Path:
        return self.root / self.name

    def output(self) -> str:
        return self.log.read_text(errors='replace')

    def wait(self, timeout: float = TIMEOUT) -> int:
        return self.proc.wait(timeout=timeout)

    def committed(self) -> list[int]:
        """Steps this process reported committed."""
        return [step_of(m) for m in COMMITTED.findall(self.output())]

    def resumed(self) -> int | None:
        """The step this process resumed from (None: a fresh start)."""
        m = RESUMED.search(self.output())
        return step_of(m.group(1)) if m else None

    def progress(self) -> int:
        """Images trained by this launch so far (its last complete line of train.jsonl; 0 before its first step)."""
        path = self.dir / 'train.jsonl'
        with open(path, 'rb') if path.exists() else io.BytesIO() as f:
            f.seek(self.jsonl_start)
            lines = f.read().decode(errors='replace').splitlines()
        for line in reversed(lines):
            try:
                return json.loads(line)['nimg']
            except ValueError:
                continue
        return 0

def start(root: pathlib.Path, name: str, *extra: str, env: dict[str, str] | None = None) -> Run:
    root.mkdir(parents=True, exist_ok=True)
    log = root / f'{name}.{time.monotonic_ns()}.log'
    jsonl = root / name / 'train.jsonl'
    offset = jsonl.stat().st_size if jsonl.exists() else 0
    with open(log, 'wb') as out:
        proc = subprocess.Popen([sys.executable, str(REPO / 'launch.py'), f'run.root={root}', f'run.name={name}',
                                 f'checkpoint.staging={root / name / "staging"}', *ARGS, *extra],   # phases watch it
                                stdout=out, stderr=subprocess.STDOUT, cwd=root,
                                env={**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})})
    return Run(root, name, proc, log, offset)

def finish(root: pathlib.Path, name: str, *extra: str, env: dict[str, str] | None = None) -> Run:
    """Run to the end; the run must succeed."""
    run = start(root, name, *extra, env=env)
    assert run.wait() == 0, run.output()[-4000:]
    return run

#----------------------------------------------------------------------------
# The store's view.

def verify(store: ObjectStore, nimg: int) -> bool:
    """Every file of a commit matches its manifest entry (size and sha256)."""
    try:
        manifest = json.loads(store.read(f'{step_prefix(nimg)}/manifest.json'))
        return bool(manifest['files']) and all(len(data := store.read(e['key'])) == e['size']
                                               and hashlib.sha256(data).hexdigest() == e['sha256']
                                               for e in manifest['files'])
    except (FileNotFoundError, KeyError, ValueError):
        return False

def commits(url: str, storage: StorageConfig | None = None) -> tuple[list[int], list[int]]:
    """(committed steps, those of them that fail verification)."""
    steps = CheckpointManager(url, pathlib.Path(tempfile.gettempdir()), storage=storage).committed()
    store = open_store(url, storage)
    return steps, [n for n in steps if not verify(store, n)]

def keys_of(store: ObjectStore, nimg: int) -> list[str]:
    return store.list(f'{step_prefix(nimg)}/')

#----------------------------------------------------------------------------
# Final states: generator.pt (the EMA) and both engines' saved state (module, Adam, client state) of the last commit.

def final_state(run_dir: pathlib.Path, url: str | None = None, storage: StorageConfig | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        reader = CheckpointManager(url or str(run_dir / 'checkpoints'), pathlib.Path(tmp), storage=storage).latest()
        assert reader is not None and reader.nimg == TOTAL, reader and reader.prefix
        meta, tensors = saved_tensors(reader, '')
        return {'generator.pt': torch.load(run_dir / 'generator.pt', map_location='cpu', weights_only=True),
                'state': tensors, 'meta': meta}

def differences(a: Any, b: Any, where: str = '') -> list[str]:
    """Where two nested states differ (tensors bit for bit, everything else by ==)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f'{where}: keys {sorted(map(str, a.keys() ^ b.keys()))}']
        return [d for k in a for d in differences(a[k], b[k], f'{where}/{k}')]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f'{where}[{i}]')]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return [] if a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) else [where]
    return [] if type(a) is type(b) and a == b else [where]

#----------------------------------------------------------------------------
# Strikes: deliver a signal while the run is in a phase. The process is frozen (SIGSTOP) as soon as a phase test
# passes and the test is repeated while it is frozen, so the signal provably lands inside the phase.

Phase = Callable[[Run], bool]

def in_staging(store: ObjectStore) -> Phase:
    """The engines are writing a checkpoint into the rank-local staging directory; nothing of it is uploaded."""
    def test(run: Run) -> bool:
        for nimg in staged_steps(run):
            if (any((run.dir / 'staging' / 'stage-rank0' / step_prefix(nimg)).rglob('shard-*'))
                and not keys_of(store, nimg)):
                return True
        return False
    return test

def in_upload(store: ObjectStore) -> Phase:
    """A staged checkpoint has files in the store but no COMMIT yet (uploading, or uploaded and awaiting its commit)."""
    def test(run: Run) -> bool:
        for nimg in staged_steps(run):
            keys = keys_of(store, nimg)
            if keys and f'{step_prefix(nimg)}/COMMIT' not in keys:
                return True
        return False
    return test

def after_images(nimg: int, jitter: float) -> Phase:
    """Training has passed `nimg` images, plus `jitter` seconds (lands anywhere in a step)."""
    since: list[float] = []                 # when the run passed nimg
    def test(run: Run) -> bool:
        if not since and run.progress() >= nimg:
            since.append(time.monotonic())
        return bool(since) and time.monotonic() - since[0] >= jitter
    return test

def staged_steps(run: Run) -> list[int]:
    """Steps this launch is staging (a killed launch's leftovers are older than this one)."""
    staging = run.dir / 'staging' / 'stage-rank0'
    try:
        return [step_of(p) for p in os.listdir(staging) if STEP.match(p)
                and (staging / p).stat().st_mtime >= run.started]
    except OSError:
        return []

def holds(phase: Phase, run: Run) -> bool:
    try:
        return phase(run)
    except OSError:                 # a directory vanished under the test: the phase is over
        return False

def strike(run: Run, phase: Phase, sig: int, skip: int = 0, timeout: float = TIMEOUT) -> bool:
    """Send `sig` to the run the (skip+1)-th time its phase test passes while frozen; False if the run ended first."""
    deadline, hits = time.monotonic() + timeout, 0
    while run.proc.poll() is None and time.monotonic() < deadline:
        if not holds(phase, run):
            time.sleep(0.002)
            continue
        os.kill(run.proc.pid, signal.SIGSTOP)
        try:
            if holds(phase, run):
                if hits == skip:
                    os.kill(run.proc.pid, sig)
                    return True
                hits += 1
        finally:
            os.kill(run.proc.pid, signal.SIGCONT)
        # let this occurrence pass
        while holds(phase, run) and run.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
    return False

def random_train_phase(rng: random.Random, done: int) -> Phase:
    """A random moment in training after `done` images."""
    return after_images(rng.randrange(done + 16, TOTAL, 16), rng.uniform(0, 0.15))

#----------------------------------------------------------------------------
# Chains: one run interrupted again and again, then finished.

@dataclasses.dataclass
class Hit:
    """One interruption and what the store held after it."""
    label: str
    run: Run
    rc: int
    steps: list[int]                        # committed steps after the interruption
    bad: list[int]                          # committed steps that fail verification (a partial commit)
    announced: int                          # the newest step any launch so far reported committed
    # images done when the interrupted launch ended (its resume point if no step)
    progress: int
    resumed_ok: bool = False                # the next launch resumed from the newest verified commit

    @property
    def lost(self) -> bool:
        return bool(self.bad) or self.announced > max(self.steps, default=0)

Choose = Callable[[int], tuple[str, Phase, int]]    # images done -> (label, phase, skip)

def chain(root: pathlib.Path, name: str, count: int, sig: int, choose: Choose, extra: Callable[[], list[str]] = list,
          then: Callable[[Run], None] = lambda run: None, url: str | None = None, storage: StorageConfig | None = None,
          env: dict[str, str] | None = None) -> tuple[list[Hit], Run]:
    """Interrupt run `name` up to `count` times with `sig` (each time in the phase `choose` picks; `then` runs right
    after the signal), then run it to the end; returns the interruptions and the finishing launch (whose exit code is
    checked by the caller)."""
    url = url or str(root / name / 'checkpoints')
    hits: list[Hit] = []
    expect: int | None = None
    announced = 0
    while True:
        label, phase, skip = choose(expect or 0) if len(hits) < count else ('', None, 0)
        run = start(root, name, *extra(), f'checkpoint.url={url}', env=env)
        landed = phase is not None and strike(run, phase, sig, skip)
        if landed:
            then(run)
        rc = run.wait()
        if hits:
            hits[-1].resumed_ok = run.resumed() == expect
        if not landed:
            return hits, run
        steps, bad = commits(url, storage)
        announced = max([announced, *run.committed()])
        hits.append(Hit(label, run, rc, steps, bad, announced, run.progress() or run.resumed() or 0))
        expect = max(set(steps) - set(bad), default=None)
