"""Fixtures of the fault-injection suite: trial recording, the summary table at the end of the session, and the
uninterrupted reference run that interrupted runs must match bit for bit."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))      # fault_*.py helpers (tests/ is not a package)

import fault_harness as h  # noqa: E402
from fault_report import Trial, append, table  # noqa: E402

RECORDS: list[Trial] = []

@pytest.fixture(autouse=True)
def one_thread():
    """In-process training on one thread, as the launched runs (OMP_NUM_THREADS=1):
    2 shared cores oversubscribe easily."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

@pytest.fixture
def record():
    """record(Trial(...)): keep a trial for the summary table (and run.py's report file)."""
    def add(trial: Trial) -> None:
        RECORDS.append(trial)
        append(trial)
    return add

def pytest_terminal_summary(terminalreporter) -> None:
    if RECORDS:
        terminalreporter.write_sep('=', 'fault injection')
        terminalreporter.write_line(table(RECORDS))

@pytest.fixture(scope='session')
def fault_root(tmp_path_factory) -> pathlib.Path:
    """One run root for the suite, so the toy teacher is pretrained once (runs/_cache)."""
    return tmp_path_factory.mktemp('faults')

@pytest.fixture(scope='session')
def reference(fault_root) -> dict:
    """Final state of an uninterrupted run (CPU, fp32)."""
    run = h.finish(fault_root, 'reference')
    return h.final_state(run.dir)
