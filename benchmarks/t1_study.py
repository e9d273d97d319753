"""The Eq. T1 study on the toy world: which reading of the joint time schedule makes CoSIM's claims hold?

Every combination of R (the paper's 4, 1, 0.25) x the T1 reading (`schedule.kind`: rho, sigma, logsigma) x the
auxiliary's sigma_t embedding (`aux.t_embed`: gated, sum) x the teacher (`teacher.kind`: exact, network) x seeds is
distilled with the same budget from the same toy teacher and evaluated with every toy metric (eval.json rows: CoSIM
K = 1, 2, 4, the teacher's Heun and DPM-Solver++(2M) at NFE 2/4/8, the exact-samples floor). Prints one markdown table
(mean over seeds) and writes every row to <out>/study.json.

    python benchmarks/t1_study.py --quick      # minutes: R in {4, 0.25}, rho and logsigma, gated, exact teacher
    python benchmarks/t1_study.py              # hours: the whole grid, 3 seeds (stop and rerun at will)
    python benchmarks/t1_study.py --report     # no training: the table of what has finished so far
    python benchmarks/t1_study.py --only teacher=network --only t_embed=gated     # a slice of the grid first
"""

import argparse
import itertools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
METRICS = ('frechet_distance', 'within_component_fd', 'component_weight_tv', 'nll_per_dim')
GRID = {'full': dict(ratio=(4.0, 1.0, 0.25), kind=('rho', 'sigma', 'logsigma'), t_embed=('gated', 'sum'),
                     teacher=('exact', 'network'), seed=(0, 1, 2)),
        'quick': dict(ratio=(4.0, 0.25), kind=('rho', 'logsigma'), t_embed=('gated',), teacher=('exact',),
                      seed=(0,))}
BUDGET = {'full': ['pretrain.kimg=300', 'train.kimg=100', 'eval.num_samples=10000'],
          'quick': ['pretrain.kimg=20', 'pretrain.batch=128', 'train.kimg=4', 'train.batch=32', 'eval.num_samples=1000',
                    'eval.batch=500', 'model.net.model_channels=16']}

def run_one(out: pathlib.Path, mode: str, combo: dict, extra: list[str], train: bool = True) -> list[dict]:
    """The eval.json rows of one combination, tagged with it; trains it first unless it finished (or `train` is
    false: then a combination that has not finished has no rows)."""
    name = '-'.join(f'{k}{v}' for k, v in combo.items())
    path = out / name / 'eval.json'
    if not path.exists():                    # finished runs are kept: a rerun of the study only fills the gaps
        if not train:
            return []
        args = [f'run.root={out}', f'run.name={name}', 'task=default', 'logging.wandb=disabled',
                'logging.progress=false', f'schedule.ratio={combo["ratio"]}', 'schedule.ratio_mix=null',  # one R
                f'schedule.kind={combo["kind"]}',
                f'aux.t_embed={combo["t_embed"]}', f'teacher.kind={combo["teacher"]}', f'run.seed={combo["seed"]}',
                'data.gmm.seed=0', *BUDGET[mode], *extra]
        t0 = time.time()
        done = subprocess.run([sys.executable, str(REPO / 'launch.py'), *args], capture_output=True, text=True,
                              env={**os.environ, 'PYTHONPATH': str(REPO)})
        if done.returncode != 0:
            raise SystemExit(f'{name} failed:\n{done.stderr[-3000:]}')
        print(f'{name}: {time.time() - t0:.0f} s', file=sys.stderr)
    return [dict(row, **combo) for row in json.loads(path.read_text())]

def table(rows: list[dict], keys: tuple[str, ...]) -> str:
    """Mean over seeds of every metric, one line per (combination, sampler), with the number of seeds it averages."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((*(r[k] for k in keys), r['name']), []).append(r)
    head = [*keys, 'sampler', 'NFE', 'seeds', *METRICS]
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for key, rs in groups.items():
        means = [statistics.fmean(r[m] for r in rs) for m in METRICS]
        lines.append('| ' + ' | '.join(map(str, key)) + f' | {rs[0]["nfe"]} | {len(rs)} | '
                     + ' | '.join(f'{v:.4f}' for v in means) + ' |')
    return '\n'.join(lines)

def _equal(value, text: str) -> bool:
    """Whether `text` names the grid value (`4` and `4.0` name the same R)."""
    try:
        return type(value)(text) == value
    except ValueError:
        return False

def restrict(grid: dict[str, tuple], only: list[str]) -> dict[str, tuple]:
    """The grid with each `key=v1,v2` of `only` keeping those values of that key (a slice of the study, run first)."""
    grid = dict(grid)
    for item in only:
        key, _, values = item.partition('=')
        if key not in grid:
            raise SystemExit(f'--only {item}: no grid key {key!r}; the keys are {", ".join(grid)}')
        kept = tuple(v for v in grid[key] if any(_equal(v, x) for x in values.split(',')))
        if not kept:
            raise SystemExit(f'--only {item}: none of {values!r} is in the grid; {key} takes '
                             f'{", ".join(map(str, grid[key]))}')
        grid[key] = kept
    return grid

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='the CI-sized grid and budget (minutes)')
    parser.add_argument('--out', default='runs/t1-study', help='run root (finished runs are reused)')
    parser.add_argument('--report', action='store_true',
                        help='train nothing: the table of the combinations that have finished so far')
    parser.add_argument('--only', action='append', default=[], metavar='KEY=V1,V2',
                        help='a slice of the grid, e.g. --only teacher=network --only ratio=4.0,0.25')
    parser.add_argument('overrides', nargs='*', help='extra key=value overrides for every run')
    args = parser.parse_args()
    mode = 'quick' if args.quick else 'full'
    out = pathlib.Path(args.out).absolute() / mode
    grid = restrict(GRID[mode], args.only)
    rows = [r for values in itertools.product(*grid.values())
            for r in run_one(out, mode, dict(zip(grid, values)), args.overrides, train=not args.report)]
    if not args.report:
        (out / 'study.json').write_text(json.dumps(rows, indent=1))
    print(table(rows, ('teacher', 't_embed', 'kind', 'ratio')))

if __name__ == '__main__':
    main()
