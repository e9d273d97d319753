"""A small state for elastic.py's routing test (tests/test_elastic.py), and the per-rank resume it runs under
torch.distributed.run: `route_probe.py OUT DIR CHUNK` loads the state in DIR with a mix of holdings and saves, per
rank, what `set_` received, the bytes read, the span read and the elements received from other ranks to
OUT-<rank>.pt."""

import json
import math
import pathlib
import sys

import torch

# Odd sizes, so that tensors straddle verification blocks and rank shares.
SPECS = [('a', (3, 1021)), ('b', (1,)), ('c', (4097,)), ('d', (2, 3)), ('e', (5000,))]

def values(i: int) -> torch.Tensor:
    return torch.arange(math.prod(SPECS[i][1]), dtype=torch.float32).reshape(SPECS[i][1]) + 1e4 * i

def wants_of(rank: int, world: int) -> list[tuple[int, int]]:
    """A mix of holdings: ZeRO-3-like partitions (some empty), a whole replicated tensor, and nothing at all."""
    out = []
    for i, (_, shape) in enumerate(SPECS):
        n = math.prod(shape)
        if i == 3:
            out.append((0, n))                                   # replicated on every rank
        elif i == 4 and rank == 0:
            out.append((0, 0))                                   # not held by this rank
        else:
            out.append(partition(n, rank, world))
    return out

def holdings_of(rank: int, world: int) -> list[tuple[int, int]]:
    """What each of `world` writers holds at save: ZeRO-3-like partitions that tile each tensor (some empty), and
    tensor 'd' whole on every rank."""
    return [(0, 6) if i == 3 else partition(math.prod(shape), rank, world) for i, (_, shape) in enumerate(SPECS)]

def partition(n: int, rank: int, world: int) -> tuple[int, int]:
    part = -(-n // world)
    return min(n, rank * part), min(n, (rank + 1) * part)

def main(out: str, directory: str, chunk: str) -> None:
    from cosim_dist import elastic
    from cosim_dist.elastic import Layout, load_state
    torch.distributed.init_process_group('gloo')
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    elastic.CHUNK = int(chunk)
    directory = pathlib.Path(directory)
    layout = Layout([json.loads(p.read_text()) for p in sorted(directory.glob('shard-*.json'))])
    spans = []

    def read_range(name: str, start: int, end: int) -> bytes:
        spans.append(end - start)
        with open(directory / name, 'rb') as f:
            f.seek(start)
            return f.read(end - start)

    received, to_self, all_to_all = [], [], torch.distributed.all_to_all_single

    def counting(output, input, output_split_sizes, input_split_sizes):      # elements from the other ranks, itself
        received.append(sum(output_split_sizes) - output_split_sizes[rank])
        to_self.append(output_split_sizes[rank])
        return all_to_all(output, input, output_split_sizes, input_split_sizes)
    torch.distributed.all_to_all_single = counting
    got = {}
    nbytes = load_state(layout, SPECS, read_range, wants_of(rank, world), lambda i, v: got.setdefault(i, v.clone()),
                        rank, world)
    torch.save({'bytes': nbytes, 'spans': sum(spans), 'span': layout.spans(world)[rank], 'received': sum(received),
                'to_self': sum(to_self),
                'total': layout.total, 'got': got}, f'{out}-{rank}.pt')
    torch.distributed.destroy_process_group()

if __name__ == '__main__':
    main(*sys.argv[1:])
