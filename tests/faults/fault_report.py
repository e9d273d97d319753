"""Trial records of the fault-injection suite and the summary table (fault, trials, survived, data lost).

A trial *survived* when the system kept its promise for that fault (the run resumed from the newest verified commit
and ended bit-identical to an uninterrupted run; or a clear error / a counted skip). *Data lost* counts trials in which
committed work disappeared, a partial or corrupt checkpoint was committed or loaded, or the final state differed."""

import dataclasses
import json
import os
import pathlib

REPORT_ENV = 'COSIM_FAULT_REPORT'   # JSONL file that every trial is appended to (set by run.py)
TRIALS_ENV = 'COSIM_FAULT_TRIALS'   # trials per randomised fault (run.py --trials); unset: the CI default of each test

@dataclasses.dataclass
class Trial:
    fault: str
    survived: bool
    lost: bool = False
    detail: str = ''

def trials(ci_default: int, share: float = 1.0) -> int:
    """Trials of a randomised fault: the CI default, or `share` of run.py's --trials (chains of several
    interruptions per trial take a share)."""
    full = os.environ.get(TRIALS_ENV)
    return max(ci_default, round(int(full) * share)) if full else ci_default

def append(trial: Trial) -> None:
    if path := os.environ.get(REPORT_ENV):
        with open(path, 'a') as f:
            f.write(json.dumps(dataclasses.asdict(trial)) + '\n')

def load(path: str | os.PathLike) -> list[Trial]:
    text = pathlib.Path(path).read_text() if pathlib.Path(path).exists() else ''
    return [Trial(**json.loads(line)) for line in text.splitlines() if line.strip()]

def table(records: list[Trial]) -> str:
    rows: dict[str, list[int]] = {}
    for t in records:
        row = rows.setdefault(t.fault, [0, 0, 0])
        row[0] += 1
        row[1] += t.survived
        row[2] += t.lost
    width = max([len('fault')] + [len(f) for f in rows])
    lines = [f'| {"fault":<{width}} | trials | survived | data lost |',
             f'|{"-" * (width + 2)}|-------:|---------:|----------:|']
    lines += [f'| {f:<{width}} | {n:>6} | {s:>8} | {lost:>9} |' for f, (n, s, lost) in rows.items()]
    total = [sum(r[i] for r in rows.values()) for i in range(3)]
    lines.append(f'| {"all":<{width}} | {total[0]:>6} | {total[1]:>8} | {total[2]:>9} |')
    return '\n'.join(lines)
