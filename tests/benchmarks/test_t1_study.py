"""benchmarks/t1_study.py --quick, the CI-sized form of the Eq. T1 study: every combination of its grid trains, is
evaluated with every toy metric and lands in study.json and the printed table; `--report` reprints that table from the
finished runs without training, and `--only` runs a slice of the grid."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / 'benchmarks'))
from t1_study import GRID, METRICS, restrict  # noqa: E402

@pytest.mark.slow
def test_quick_study_fills_every_row(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / 'benchmarks' / 't1_study.py'), '--quick', '--out', str(tmp_path)],
                          capture_output=True, text=True, timeout=900, env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / 'quick' / 'study.json').read_text())
    combos = {(r['ratio'], r['kind']) for r in rows}
    assert combos == {(r, k) for r in GRID['quick']['ratio'] for k in GRID['quick']['kind']}
    for combo in combos:
        names = {r['name'] for r in rows if (r['ratio'], r['kind']) == combo}
        assert {'CoSIM K=1', 'CoSIM K=2', 'CoSIM K=4'} <= names and any('Heun' in n for n in names)
        assert sum('DPM' in n for n in names) == 3
    assert all(math.isfinite(r[m]) for r in rows for m in METRICS)
    table = done.stdout.splitlines()
    assert len([line for line in table if 'CoSIM K=4' in line]) == len(combos)
    assert all(line.split(' | ')[6] == '1' for line in table if 'CoSIM' in line)      # seeds averaged: one
    # --report trains nothing and prints the same table from the finished runs; with none, the header alone
    report = [sys.executable, str(REPO / 'benchmarks' / 't1_study.py'), '--quick', '--report']
    again = subprocess.run([*report, '--out', str(tmp_path)], capture_output=True, text=True, check=True)
    assert again.stdout == done.stdout
    empty = subprocess.run([*report, '--out', str(tmp_path / 'none')], capture_output=True, text=True, check=True)
    assert len(empty.stdout.splitlines()) == 2 and not (tmp_path / 'none' / 'quick' / 'study.json').exists()

def test_only_restricts_the_grid_to_a_slice():
    grid = restrict(GRID['full'], ['teacher=network', 'ratio=4,0.25', 'seed=2'])
    assert grid == {**GRID['full'], 'teacher': ('network',), 'ratio': (4.0, 0.25), 'seed': (2,)}
    assert restrict(GRID['full'], []) == GRID['full']
    with pytest.raises(SystemExit, match="no grid key 'R'; the keys are ratio, kind"):
        restrict(GRID['full'], ['R=4'])
    with pytest.raises(SystemExit, match="none of 'cosine' is in the grid; kind takes rho, sigma, logsigma"):
        restrict(GRID['full'], ['kind=cosine'])
