"""The Slurm testbed (scripts/slurm_testbed.sh) for tests: availability checks and a session set-up.

The testbed is a real Slurm 22.05 from Debian packages (slurmctld, slurmd, slurmdbd on mariadb, munge) of two nodes on
this machine, each a slurmd in its own network, UTS and mount namespaces (own address and hostname, own /scratch), with
a preemptible partition `low` (default) and a preempting partition `high`; each node declares 4 CPUs. A job's
processes reach the host (S3) at the bridge address `addr`. Starting it needs root (apt-get install on first use,
system daemons). Usage from conftest.py:
    @pytest.fixture(scope='session')
    def slurm_cluster():
        yield from load_helper('services/slurm.py').testbed_session()
Outside CI the tests skip, with the reason, where the testbed cannot run (not root, no apt-get); with CI=true
(or SLURM_TESTBED_REQUIRED=1) every failure to start is an error. The testbed is stopped at the end of the session
only if this session started it (SLURM_TESTBED_KEEP=1 leaves it running).
"""

import dataclasses
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / 'scripts' / 'slurm_testbed.sh'
PACKAGES = ('slurmctld', 'slurmd', 'slurm-client', 'munge', 'slurmdbd', 'mariadb-server', 'iproute2')

NODES = ('node1', 'node2')      # scripts/slurm_testbed.sh's default (SLURM_TESTBED_NODES=2)

@dataclasses.dataclass(frozen=True)
class SlurmTestbed:
    nodes: tuple[str, ...] = NODES  # node names (each its own hostname, resolvable to its own address)
    addr: str = '10.77.0.1'     # the host (controller) as the nodes reach it: services for jobs listen here
    cpus: int = 4               # CPUs each node declares (whatever the machine has)
    low: str = 'low'            # default partition, PriorityTier=1, GraceTime=30, preempted jobs are requeued
    high: str = 'high'          # PriorityTier=10: a job here that needs every CPU of a node preempts `low` jobs there

    def scratch(self, node: str) -> pathlib.Path:
        """The node's private /scratch, as the host sees it (a job on another node cannot)."""
        return pathlib.Path('/var/lib/slurm-testbed') / node / 'scratch'

    def progress(self, run: str) -> int:
        """A run's latest nimg (run: its directory under /scratch), from train.jsonl on whichever node rank 0 ran."""
        best = 0
        for node in self.nodes:
            path = self.scratch(node) / run / 'train.jsonl'
            lines = path.read_text().splitlines() if path.exists() else []
            best = max([best] + [json.loads(line)['nimg'] for line in lines[-1:]])
        return best

    def preempt(self) -> None:
        """A job in `high` that needs every CPU of every node: Slurm preempts the `low` jobs."""
        subprocess.run(['sbatch', f'--partition={self.high}', f'--nodes={len(self.nodes)}', '--ntasks-per-node=1',
                        f'--cpus-per-task={self.cpus}', '--time=5',
                        '--output=/dev/null', '--wrap', 'sleep 2'], check=True, capture_output=True)

    @staticmethod
    def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
                 log: Callable[[], str] = lambda: '') -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                pytest.fail(f'timed out after {timeout} s waiting for {what}\n{log()[-5000:]}')
            time.sleep(0.25)

    @staticmethod
    def job_state(job: str) -> str:
        """squeue's state of the job ('' once Slurm forgets it)."""
        return subprocess.run(['squeue', '-h', '-j', job, '-o', '%T'], capture_output=True, text=True).stdout.strip()

    @staticmethod
    def hit_time_limit(job: str) -> None:
        """Shorten the job's limit so that Slurm's own time-limit signal (USR2, 120 s before the end: the launchers'
        default) is due now: it comes at slurmctld's next time-limit check (every 30 s), >= 60 s before the end."""
        runtime = subprocess.run(['squeue', '-h', '-j', job, '-o', '%M'], capture_output=True, text=True).stdout
        parts = reversed([int(p) for p in re.split('[-:]', runtime.strip())])
        seconds = sum(v * m for v, m in zip(parts, (1, 60, 3600, 86400)))
        subprocess.run(['scontrol', 'update', f'JobId={job}', f'TimeLimit={(seconds + 120) // 60}'], check=True)

    def stop_three_times(self, job: str, run: str, log: Callable[[], str], steps: int = 320) -> None:
        """Preempt the job twice, then let its time limit stop it, each time once it trained `steps` images more, and
        wait until rank 0 requeued it (`log`: the job's output so far)."""
        for stop in ('preemption', 'preemption', 'time limit'):
            start, n = self.progress(run), log().count(f'requeueing job {job}')
            self.wait_for(lambda s=start: self.progress(run) >= s + steps and self.job_state(job) == 'RUNNING', 300,
                          f'progress before the {stop}', log)
            self.preempt() if stop == 'preemption' else self.hit_time_limit(job)
            self.wait_for(lambda n=n: log().count(f'requeueing job {job}') > n, 120, f'the requeue after the {stop}',
                          log)
            if stop == 'time limit':
                subprocess.run(['scontrol', 'update', f'JobId={job}', 'TimeLimit=20'], check=True)

def _truthy(name: str) -> bool:
    return os.environ.get(name, '').strip().lower() in ('1', 'true', 'yes', 'on')

def required() -> bool:
    """True where a testbed that does not start is an error, not a skip (CI)."""
    return _truthy('CI') or _truthy('SLURM_TESTBED_REQUIRED')

def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)

def _controller_listening(timeout: float = 1.0) -> bool:
    """Whether slurm.conf's controller accepts TCP connections (sinfo alone takes ~10 s to give up on a dead one)."""
    conf = pathlib.Path(os.environ.get('SLURM_CONF', '/etc/slurm/slurm.conf'))
    try:
        text = conf.read_text()
    except OSError:
        return False
    settings = dict(re.findall(r'^\s*(SlurmctldHost|ControlMachine|ControlAddr|SlurmctldPort)\s*=\s*(\S+)', text,
                               re.M | re.I))
    settings = {k.lower(): v for k, v in settings.items()}
    host = settings.get('slurmctldhost') or settings.get('controlmachine') or 'localhost'
    host = settings.get('controladdr') or (re.search(r'\((.+)\)', host) or re.match(r'([^(]+)', host)).group(1)
    port = int(settings.get('slurmctldport', '6817').split('-')[0])
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False

def slurm_available() -> bool:
    """True if a Slurm controller answers here with the testbed's nodes and its partitions `low` and `high`."""
    if shutil.which('sinfo') is None or not _controller_listening():
        return False
    try:
        out = _run(['sinfo', '-h', '-N', '-o', '%N %R'], timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    pairs = {tuple(line.split()) for line in out.stdout.splitlines()}
    return out.returncode == 0 and {(n, p) for n in NODES for p in ('low', 'high')} <= pairs

def _packages_installed() -> bool:
    try:
        out = _run(['dpkg-query', '-W', '-f=${Status}\\n', *PACKAGES], timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.stdout.count('install ok installed') == len(PACKAGES)

def cannot_start_reason() -> str | None:
    """Why scripts/slurm_testbed.sh start cannot run on this machine, or None if it can try."""
    if os.geteuid() != 0:
        return 'the Slurm testbed needs root (it installs Debian packages and starts system daemons)'
    if not _packages_installed() and shutil.which('apt-get') is None:
        return f'the Slurm testbed needs apt-get (Debian/Ubuntu) to install {" ".join(PACKAGES)}'
    return None

def start(timeout: float = 300) -> float:
    """Run `scripts/slurm_testbed.sh start` (installs the packages on first use); returns the seconds it took.
    Raises RuntimeError with the script's output if it fails or takes longer than `timeout`."""
    t0 = time.monotonic()
    try:
        out = _run(['bash', str(SCRIPT), 'start'], timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f'{SCRIPT} start did not finish within {timeout} s; output:\n{e.output or ""}') from None
    if out.returncode != 0:
        raise RuntimeError(f'{SCRIPT} start failed (exit code {out.returncode}); output:\n{out.stdout}')
    return time.monotonic() - t0

def stop(timeout: float = 120) -> None:
    out = _run(['bash', str(SCRIPT), 'stop'], timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f'{SCRIPT} stop failed (exit code {out.returncode}); output:\n{out.stdout}')

def testbed_session() -> Iterator[SlurmTestbed]:
    """Generator for a session-scoped fixture: make sure the testbed runs, yield it, stop it if this session started it.
    Skips (outside CI) where it cannot run; raises where it should run but does not start."""
    testbed = SlurmTestbed()
    started = False
    if not slurm_available():
        reason = cannot_start_reason()
        if reason is not None:
            if required():
                raise RuntimeError(f'CI is set but {reason}; '
                                   f'run the tests as root or start the testbed first: `sudo {SCRIPT} start`')
            pytest.skip(f'{reason}; start it with `sudo {SCRIPT} start`, or deselect with -m "not slurm"')
        start()
        started = True
    yield testbed
    if started and not _truthy('SLURM_TESTBED_KEEP'):
        stop()
