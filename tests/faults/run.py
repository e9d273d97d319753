"""The fault-injection suite with more trials, and its summary table (fault, trials, survived, data lost):

    python tests/faults/run.py --trials 20      # kill -9 x 20, USR2 chains / S3 / full disk x 10, the rest x 20

It runs `pytest tests/faults` with COSIM_FAULT_TRIALS set (CI runs the same tests with a few trials each), collects
every trial and prints the table at the end; the exit code is pytest's. Extra arguments go to pytest (e.g. -k kill)."""

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from fault_report import REPORT_ENV, TRIALS_ENV, load, table

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--trials', type=int, default=20, help='trials per randomised fault (chains take half)')
    parser.add_argument('pytest_args', nargs='*', help='extra pytest arguments')
    args = parser.parse_args()
    here = pathlib.Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        report = pathlib.Path(tmp) / 'trials.jsonl'
        env = {**os.environ, TRIALS_ENV: str(args.trials), REPORT_ENV: str(report)}
        t0 = time.monotonic()
        rc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', str(here),
                             *args.pytest_args],
                            cwd=here.parents[1], env=env).returncode
        print(f'\nfault injection: --trials {args.trials}, {time.monotonic() - t0:.0f} s, pytest exit code {rc}\n')
        print(table(load(report)))
    return rc

if __name__ == '__main__':
    sys.exit(main())
