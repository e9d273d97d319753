"""Proof that the Slurm testbed (scripts/slurm_testbed.sh) does what the launcher tests rely on, with submitit only:
multi-task jobs, two nodes with their own hostnames, addresses and private /scratch, a real preemption by a job in
the `high` partition with Slurm's stock semantics (SIGTERM to the tasks, `PreemptTime` set during the GraceTime, and
a job that exits inside it is recorded COMPLETED: nothing requeues it but the job itself) and `scontrol requeue` of a
running job. No project code is involved."""

import os
import pathlib
import subprocess
import sys
import time

import cloudpickle
import pytest

submitit = pytest.importorskip('submitit')

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# The job callables below are pickled by value: the job process cannot import this module (pytest imports it by path).
cloudpickle.register_pickle_by_value(sys.modules[__name__])

#----------------------------------------------------------------------------
# Job callables (they run inside Slurm jobs).

def task_rank() -> tuple[int, int, str]:
    return int(os.environ['SLURM_PROCID']), int(os.environ['SLURM_NTASKS']), os.environ['SLURM_JOB_PARTITION']

def node_facts(tag: str) -> tuple[str, str, list[str]]:
    """This task's hostname, the address it resolves to, and what it sees in /scratch after writing its own file."""
    import socket
    host = socket.gethostname()
    pathlib.Path(f'/scratch/{tag}-{host}').write_text(host)
    time.sleep(1)                                               # both tasks have written before either lists
    return host, socket.gethostbyname(host), sorted(p.name for p in pathlib.Path('/scratch').glob(f'{tag}-*'))

def sleep_and_return(seconds: float) -> str:
    time.sleep(seconds)
    return f'{os.environ["SLURM_JOB_PARTITION"]}:{os.environ["SLURM_CPUS_ON_NODE"]}'

def _lines(path: pathlib.Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []

def _append(path: pathlib.Path, line: str) -> None:
    with open(path, 'a') as f:
        f.write(line + '\n')
        f.flush()
        os.fsync(f.fileno())

def _progress(workdir: pathlib.Path) -> int:
    lines = _lines(workdir / 'progress')
    return int(lines[-1]) if lines else 0

class StepCounter(submitit.helpers.Checkpointable):
    """Counts to `steps`, one step per `step_s` seconds. Each finished step is appended to workdir/progress and a run
    resumes after the last one written; every start is logged to workdir/starts, every checkpoint() to
    workdir/checkpoints. Returns the steps counted and the step each start resumed from."""

    def __init__(self, workdir: str, steps: int, step_s: float):
        self.workdir, self.steps, self.step_s = workdir, steps, step_s

    def __call__(self) -> dict:
        work = pathlib.Path(self.workdir)
        done = _progress(work)
        _append(work / 'starts', f'{done} {os.environ.get("SLURM_RESTART_COUNT", "0")}')
        for step in range(done + 1, self.steps + 1):
            time.sleep(self.step_s)
            _append(work / 'progress', str(step))
        return {'steps': _progress(work), 'starts': [int(s.split()[0]) for s in _lines(work / 'starts')]}

    def checkpoint(self, *args, **kwargs):
        # Called by submitit on rank 0 when USR2 arrives; the state lives in the progress file, so requeue as is.
        _append(pathlib.Path(self.workdir) / 'checkpoints', str(_progress(pathlib.Path(self.workdir))))
        return super().checkpoint(*args, **kwargs)

class TermRecorder(StepCounter):
    """Counts like StepCounter; on SIGTERM it writes the signal and the job's PreemptTime (scontrol) to workdir/signals
    and returns the steps counted."""

    def __call__(self) -> int:
        import signal
        work, stopped = pathlib.Path(self.workdir), []

        def on_term(signum, frame):
            out = subprocess.run(['scontrol', 'show', 'job', os.environ['SLURM_JOB_ID']], capture_output=True,
                                 text=True).stdout
            _append(work / 'signals', 'SIGTERM ' + next(w for w in out.split() if w.startswith('PreemptTime=')))
            stopped.append(signum)

        signal.signal(signal.SIGTERM, on_term)          # over submitit's handler, which ignores SIGTERM
        for step in range(1, self.steps + 1):
            if stopped:
                break
            time.sleep(self.step_s)
            _append(work / 'progress', str(step))
        return _progress(work)

#----------------------------------------------------------------------------
# Helpers (test side).

def _executor(folder: pathlib.Path, **params) -> 'submitit.AutoExecutor':
    ex = submitit.AutoExecutor(folder=folder, cluster='slurm')
    # timeout_min >= 11: submitit counts a USR2 after min(0.8 * limit, limit - 10 min) of walltime as a timeout.
    ex.update_parameters(**{'nodes': 1, 'tasks_per_node': 1, 'cpus_per_task': 1, 'timeout_min': 20, **params})
    return ex

def _wait_for(predicate, timeout: float, what: str, jobs=()) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            details = '\n'.join(f'--- job {j.job_id} state {j.state}\n{j.stderr() or ""}'[-3000:] for j in jobs)
            pytest.fail(f'timed out after {timeout} s waiting for {what}\n{_squeue()}\n{details}')
        time.sleep(0.25)

def _wait_done(job, timeout: float) -> None:
    _wait_for(job.done, timeout, f'job {job.job_id} to finish', jobs=[job])

def _squeue() -> str:
    return subprocess.run(['squeue', '-o', '%i %P %T %r %M'], capture_output=True, text=True).stdout

def _sacct_states(job_id: str) -> list[str]:
    """Every state the job's allocations went through (-D: also the runs before a requeue)."""
    out = subprocess.run(['sacct', '-D', '-X', '-n', '-P', '-j', job_id, '-o', 'State'],
                         capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.split('\n') if line.strip()]

@pytest.fixture
def cancel_leftovers():
    jobs = []
    yield jobs
    for job in jobs:
        if not job.done():
            job.cancel(check=False)

def _check_counted(workdir: pathlib.Path, result: dict, steps: int) -> None:
    assert result['steps'] == steps
    assert [int(s) for s in _lines(workdir / 'progress')] == list(range(1, steps + 1)) # no step lost or repeated
    assert len(result['starts']) == 2 and result['starts'][0] == 0 and 0 < result['starts'][1] < steps, result

#----------------------------------------------------------------------------

def test_two_tasks(slurm_cluster, tmp_path, cancel_leftovers):
    t0 = time.monotonic()
    job = _executor(tmp_path / 'jobs', tasks_per_node=2, timeout_min=5).submit(task_rank)
    cancel_leftovers.append(job)
    _wait_done(job, timeout=60)
    assert sorted(job.results()) == [(0, 2, 'low'), (1, 2, 'low')]
    print(f'2-task job {job.job_id} done in {time.monotonic() - t0:.1f} s')

def test_two_nodes_have_own_hosts_addresses_and_scratch(slurm_cluster, tmp_path, cancel_leftovers):
    tag = tmp_path.name
    job = _executor(tmp_path / 'jobs', nodes=2, timeout_min=5).submit(node_facts, tag)
    cancel_leftovers.append(job)
    _wait_done(job, timeout=60)
    facts = sorted(job.results())
    assert [f[0] for f in facts] == list(slurm_cluster.nodes)
    assert len({f[1] for f in facts}) == 2 and all(f[1].startswith('10.77.0.') for f in facts), facts
    for host, _, seen in facts:                                 # each node sees only its own file
        assert seen == [f'{tag}-{host}'], facts
        assert (slurm_cluster.scratch(host) / f'{tag}-{host}').read_text() == host
    assert not list(pathlib.Path('/scratch').glob(f'{tag}-*'))   # nor does the host

def test_preemption_sends_sigterm_and_does_not_requeue_a_job_that_exits(slurm_cluster, tmp_path, cancel_leftovers):
    """A job in `high` needing every CPU of every node preempts the `low` job: its task gets SIGTERM while `scontrol
    show job` shows a PreemptTime; the task exits at once and the job ends COMPLETED, not requeued
    (launchers/signals.py relies on both facts)."""
    work = tmp_path / 'work'
    work.mkdir()
    t0 = time.monotonic()
    low = _executor(tmp_path / 'jobs', slurm_partition=slurm_cluster.low).submit(TermRecorder(str(work), 120, 0.5))
    cancel_leftovers.append(low)
    _wait_for(lambda: _progress(work) >= 3, 60, 'the low job to count 3 steps', jobs=[low])
    high = _executor(tmp_path / 'jobs', slurm_partition=slurm_cluster.high, cpus_per_task=slurm_cluster.cpus,
                     nodes=len(slurm_cluster.nodes), timeout_min=5).submit(sleep_and_return, 2.0)
    cancel_leftovers.append(high)
    t_high = time.monotonic()
    _wait_for(lambda: _lines(work / 'signals'), 30, 'SIGTERM in the preempted low job', jobs=[low, high])
    t_signal = time.monotonic()
    _wait_done(low, timeout=60)
    _wait_done(high, timeout=60)
    assert high.results() == [f'{slurm_cluster.high}:{slurm_cluster.cpus}'] * len(slurm_cluster.nodes)
    (line,) = _lines(work / 'signals')
    assert line.startswith('SIGTERM PreemptTime=') and 'PreemptTime=None' not in line, line
    assert low.result() < 120 and _sacct_states(low.job_id) == ['COMPLETED'], _sacct_states(low.job_id)
    print(f'preemption: SIGTERM {t_signal - t_high:.1f} s after the high job was submitted ({line}); low job '
          f'{_sacct_states(low.job_id)} {time.monotonic() - t0:.1f} s after submission')

def test_scontrol_requeue_resumes(slurm_cluster, tmp_path, cancel_leftovers):
    """`scontrol requeue` kills the running job (no USR2) and reruns it; it resumes from its progress file."""
    steps, work = 24, tmp_path / 'work'
    work.mkdir()
    t0 = time.monotonic()
    job = _executor(tmp_path / 'jobs').submit(StepCounter(str(work), steps, 0.5))
    cancel_leftovers.append(job)
    _wait_for(lambda: _progress(work) >= 3, 60, 'the job to count 3 steps', jobs=[job])
    subprocess.run(['scontrol', 'requeue', job.job_id], check=True, timeout=30)
    t_requeue = time.monotonic()
    _wait_for(lambda: len(_lines(work / 'starts')) >= 2, 60, 'the requeued job to restart', jobs=[job])
    t_restart = time.monotonic()
    _wait_done(job, timeout=60)
    result = job.result()
    _check_counted(work, result, steps)
    assert not _lines(work / 'checkpoints') # requeue sends no USR2: nothing called checkpoint()
    assert _lines(work / 'starts')[1].split()[1] == '1' # SLURM_RESTART_COUNT
    print(f'scontrol requeue: restarted after {t_restart - t_requeue:.1f} s at step {result["starts"][1]}; '
          f'done {time.monotonic() - t0:.1f} s after submission')
