"""Collective bytes per rank of one CoSIM iteration (Eq. L1) against the analytic lower bound, for the toy network and a
narrow EDM2, ZeRO 1 / 2 / 3, 2 and 4 gloo ranks on CPU, 2 micro-batches per optimiser step (as edm2-l on 32 GPUs).
Each cell is one `task=bench` run under torchrun (cosim_dist/comm.py counts at the dispatcher); prints a markdown table
and writes every bench.json to <out>.

    python benchmarks/comm_step.py [--out runs/comm-step] [--ranks 2 4] [--stages 1 2 3] [extra key=value ...]
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
MODELS = {'toy': ['model.net.model_channels=16'],
          'edm2-narrow': ['model=edm2-xs', 'model.resolution=16', 'model.net.model_channels=32',
                          'model.net.num_blocks=1', 'model.net.attn_resolutions=[8]']}

def bench(out: pathlib.Path, model: str, ranks: int, stage: int, extra: list[str]) -> dict:
    name = f'{model}-w{ranks}-z{stage}'
    path = out / name / 'bench.json'
    args = [f'run.root={out}', f'run.name={name}', 'task=bench', 'engine.backend=deepspeed',
            f'engine.zero_stage={stage}', f'train.batch={4 * ranks}', 'train.batch_gpu=2', 'bench.warmup=1',
            'bench.iters=1', 'logging.wandb=disabled', 'logging.progress=false', *MODELS[model], *extra]
    done = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={ranks}',
                           str(REPO / 'launch.py'), *args], capture_output=True, text=True,
                          env={**os.environ, 'PYTHONPATH': str(REPO), 'DS_ACCELERATOR': 'cpu'})
    if done.returncode != 0:
        raise SystemExit(f'{name} failed:\n{done.stderr[-3000:]}')
    return json.loads(path.read_text())

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='runs/comm-step')
    parser.add_argument('--ranks', type=int, nargs='+', default=[2, 4])
    parser.add_argument('--stages', type=int, nargs='+', default=[1, 2, 3])
    parser.add_argument('--models', nargs='+', default=list(MODELS))
    parser.add_argument('overrides', nargs='*', help='extra key=value overrides for every run')
    args = parser.parse_args()
    out = pathlib.Path(args.out).absolute()
    mib = lambda n: f'{n / 2 ** 20:.2f}'
    print('| model | ranks | ZeRO | trained params (G + aux) | MiB per rank per iteration | lower bound MiB | ratio | '
          'by operation (MiB) |')
    print('|---|---|---|---|---|---|---|---|')
    for model in args.models:
        for ranks in args.ranks:
            for stage in args.stages:
                r = bench(out, model, ranks, stage, args.overrides)
                p = r['trained_params']
                ops = ', '.join(f'{k} {mib(v)}' for k, v in sorted(r['comm_bytes_by_op'].items()) if v)
                print(f'| {model} | {ranks} | {stage} | {(p["generator"] + p["auxiliary"]) / 1e6:.2f}M | '
                      f'{mib(r["comm_bytes_per_iter"])} | {mib(r["comm_bytes_lower_bound"])} | '
                      f'{r["comm_bytes_per_iter"] / r["comm_bytes_lower_bound"]:.2f} | {ops} |', flush=True)

if __name__ == '__main__':
    main()
