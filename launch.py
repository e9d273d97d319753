#!/usr/bin/env python
"""Checkout shim of the `cosim-launch` console script: `python launch.py [--dry-run] [group=name ...] [key=value ...]`
runs cosim_dist/launch.py (its --help tells the rest)."""

from cosim_dist.launch import cli

if __name__ == '__main__':
    cli()
