#!/usr/bin/env python
"""cosim-dist entry point: `python launch.py [--dry-run] [group=name ...] [key=value ...]`.

With no arguments it runs the embedded default locally: pretrain (or reuse) the toy teacher, distil it
with CoSIM, evaluate against exact ground truth and print the table."""

import argparse
import sys

from cosim_dist.config import ConfigError, batch_layout, load_config, to_yaml
from cosim_dist.distributed import DistributedEnvError

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dry-run', action='store_true', help='print the resolved config and exit')
    parser.add_argument('--nproc', type=int, default=1, help='local processes (ranks) to start on this machine')
    parser.add_argument('overrides', nargs='*', help='group=name selections and dotted key=value overrides')
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.overrides)
        if args.dry_run:
            print(to_yaml(cfg), end='')
            return 0
        from launchers.local import launch_local, launch_processes
        batch_layout(cfg.train, args.nproc)
        if args.nproc > 1:
            return launch_processes(args.nproc, args.overrides)
        launch_local(cfg)
    except (ConfigError, FileNotFoundError, DistributedEnvError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0

if __name__ == '__main__':
    sys.exit(main())
