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
import os
import pathlib
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / 'scripts' / 'slurm_testbed.sh'
PACKAGES = ('slurmctld', 'slurmd', 'slurm-client', 'munge', 'slurmdbd', 'mariadb-server')

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
