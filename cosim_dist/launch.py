"""cosim-dist entry point: `cosim-launch [--dry-run] [group=name ...] [key=value ...]` (from a checkout also
`python launch.py ...`, or `python -m cosim_dist.launch ...`).

With no arguments it runs the embedded default locally: pretrain (or reuse) the toy teacher, distil it
with CoSIM, evaluate against exact ground truth and print the table."""

import argparse
import logging
import os
import sys
from typing import NoReturn

from .config import ConfigError, batch_layout, load_config, to_yaml

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dry-run', action='store_true', help='print the resolved config and exit')
    parser.add_argument('--nproc', type=int, default=1, help='local processes (ranks) to start on this machine')
    parser.add_argument('--cluster', choices=('local', 'slurm'), default='local', help='where to run')
    parser.add_argument('--nodes', type=int, default=1, help='Slurm nodes')
    parser.add_argument('--gpus-per-node', type=int, default=0, help='GPUs per node (one rank each)')
    parser.add_argument('--tasks-per-node', type=int, default=None,
                        help='ranks per node (default: GPUs per node, or 1)')
    parser.add_argument('--cpus-per-task', type=int, default=None,
                        help="CPU cores per rank (default: the node's cores / ranks per node)")
    parser.add_argument('--mem', default=None, help="memory per node (default with GPUs: 0, all of the node's)")
    parser.add_argument('--exclusive', action='store_true', help='whole nodes only')
    parser.add_argument('--signal-delay-s', type=int, default=120,
                        help='USR2 this long before the time limit (one step + a save + its upload)')
    parser.add_argument('--cpu-ranks', action='store_true', help='allow a real model on CPU ranks (no GPUs)')
    parser.add_argument('--job-dir', default=None,
                        help='job files and logs, on a filesystem every node shares (default: <run_dir>/slurm)')
    parser.add_argument('--partition', default=None, help='Slurm partition')
    parser.add_argument('--account', default=None, help='Slurm account')
    parser.add_argument('--qos', default=None, help='Slurm QOS')
    parser.add_argument('--timeout-min', type=int, default=24 * 60,
                        help='wall-clock limit per allocation (requeues itself)')
    parser.add_argument('overrides', nargs='*', help='group=name selections and dotted key=value overrides')
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.overrides, ready=not args.dry_run)
        if args.cluster == 'slurm':
            from .launchers.slurm import SlurmOptions, submit
            options = SlurmOptions(nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                                   tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task, mem=args.mem,
                                   exclusive=args.exclusive, partition=args.partition, account=args.account,
                                   qos=args.qos, timeout_min=args.timeout_min, signal_delay_s=args.signal_delay_s,
                                   cpu_ranks=args.cpu_ranks, job_dir=args.job_dir)
            batch_layout(cfg.train, args.nodes * options.tasks)
            submit(cfg, options, args.overrides, dry_run=args.dry_run)
            if args.dry_run:
                print(to_yaml(cfg), end='')
            return 0
        if args.dry_run:
            print(to_yaml(cfg), end='')
            return 0
        from .launchers.local import launch_local, launch_processes
        batch_layout(cfg.train, args.nproc)
        if args.nproc > 1:
            return launch_processes(args.nproc, args.overrides)
        launch_local(cfg)
    except (ConfigError, FileNotFoundError) as e:   # DistributedEnvError is a ConfigError
        for line in str(e).splitlines():
            print(f'error: {line}', file=sys.stderr)
        return 2
    return 0

def exit_process(code: int) -> NoReturn:
    """End this process with `code`. A rank of a multi-process job (torchrun or srun: its task has finished, its
    process group is destroyed, its logs and uploads are closed) leaves without interpreter teardown: there, C++
    threads of gloo / the TCPStore / DeepSpeed's CPU comm op that are still joinable made the finished process abort
    now and then ("terminate called without an active exception", SIGABRT, exit code -6 after a committed run)."""
    if int(os.environ.get('WORLD_SIZE', '1')) > 1 or int(os.environ.get('SLURM_NTASKS', '1')) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)

def cli(argv: list[str] | None = None) -> NoReturn:
    """Every entry point (`cosim-launch`, `python launch.py`, `python -m cosim_dist.launch`) ends here."""
    exit_process(main(argv))

if __name__ == '__main__':
    cli()
