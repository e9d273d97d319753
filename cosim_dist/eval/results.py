"""Evaluation results: eval.json (one entry per sampler) and the printed table."""

import json
import pathlib

def write_results(rows: list[dict], path: pathlib.Path) -> None:
    """eval.json: one entry per sampler (name, NFE and its distances)."""
    path.write_text(json.dumps(rows, indent=2) + '\n')

def format_table(rows: list[dict], columns: dict[str, str] | None = None) -> str:
    """One line per row: sampler name, NFE and each column (row key -> header; default the Frechet distance)."""
    columns = columns or {'frechet_distance': 'Frechet distance'}
    width = max(len(r['name']) for r in rows)
    head = ''.join(f'  {h:>16}' for h in columns.values())
    lines = [f'{"sampler":<{width}}  {"NFE":>4}{head}', '-' * (width + 6 + 18 * len(columns))]
    lines += [f'{r["name"]:<{width}}  {r["nfe"]:>4}' + ''.join(f'  {r[k]:>16.4f}' for k in columns) for r in rows]
    return '\n'.join(lines)
