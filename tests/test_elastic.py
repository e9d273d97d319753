"""elastic.py on its own: shard hashes computed while writing, and the routing of a resume (each rank receives exactly
the elements it holds, from whichever ranks read them), over real gloo process groups."""

import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from cosim_dist import elastic
from cosim_dist.elastic import ITEM, Layout, save_plan, save_state, shard_name
from cosim_dist.storage import sha256_file

def write(probe, directory, world: int) -> dict[str, str]:
    """The state as `world` writers store it, each holding `probe.holdings_of` (each call plays one rank; `get` is not
    collective here)."""
    digests, holdings = {}, [probe.holdings_of(r, world) for r in range(world)]
    for rank in range(world):
        def local(i: int, rank=rank) -> torch.Tensor:
            return probe.values(i).flatten()[slice(*holdings[rank][i])]
        failure, d = save_state(directory, probe.SPECS, holdings, probe.values, local, rank, world)
        assert failure == ''
        digests |= d
    return digests

def test_hashes_are_computed_while_writing(route_probe, tmp_path, monkeypatch):
    """Every block hash and the whole-file digest equal a second pass over the file (blocks straddle tensors)."""
    monkeypatch.setattr(elastic, 'BLOCK_MIN', 1000)             # blocks smaller than the tensors: many boundaries
    digests = write(route_probe, tmp_path, 2)
    for rank in range(2):
        index = json.loads((tmp_path / f'{shard_name(rank, 2)}.json').read_text())
        data = (tmp_path / index['file']).read_bytes()
        assert len(data) == index['bytes'] and index['block'] < len(data)
        block = index['block']
        assert index['sha256'] == [hashlib.sha256(data[k:k + block]).hexdigest() for k in range(0, len(data), block)]
        assert digests[index['file']] == sha256_file(tmp_path / index['file'])

#----------------------------------------------------------------------------

@pytest.mark.parametrize('written,world,chunk', [(2, 3, 256 << 20), (3, 2, 4096), (1, 4, 1), (3, 3, 256 << 20)])
def test_each_rank_receives_exactly_what_it_holds(route_probe, tmp_path, written, world, chunk):
    """Written by `written` ranks (each its own partitions, a replicated tensor once), resumed on `world` (gloo,
    tests/helpers/route_probe.py): set_ receives, for every tensor, exactly the elements the rank holds (value by
    value), whatever the chunking of the all-to-alls (one chunk, several, one tensor per chunk); each rank reads its
    span of the global order plus at most a verification block at each end of each file it reads from. On the writers'
    number of ranks each rank reads exactly the file it wrote and receives only the replicated tensor from others.
    What a rank read for itself never goes through the all-to-all (views of its own read)."""
    probe = route_probe
    write(probe, tmp_path, written)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={world}',
           probe.__file__, str(tmp_path / 'out'), str(tmp_path), str(chunk)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert done.returncode == 0, done.stderr[-4000:]
    spans = []
    for rank in range(world):
        out = torch.load(tmp_path / f'out-{rank}.pt', weights_only=True)
        assert out['total'] == sum(math.prod(s) for _, s in probe.SPECS) * ITEM
        lo, hi = (x * ITEM for x in out['span'])
        spans.append(out['span'])
        assert out['bytes'] == out['spans'] and hi - lo <= out['bytes'] <= hi - lo + 2 * written * elastic.BLOCK_MIN
        assert sorted(out['got']) == list(range(len(probe.SPECS))) and out['to_self'] == 0
        for i, (a, b) in enumerate(probe.wants_of(rank, world)):
            assert torch.equal(out['got'][i], probe.values(i).flatten()[a:b]), (rank, i)
        if written == world:
            assert out['bytes'] == (tmp_path / f'{shard_name(rank, world)}.bin').stat().st_size
            assert out['received'] in (0, 6)                       # tensor 'd' (6 elements), unless this rank wrote it
    assert spans[0][0] == 0 and all(spans[r][1] == spans[r + 1][0] for r in range(world - 1))
    assert spans[-1][1] * ITEM == out['total']

def test_the_save_plan_writes_each_element_once():
    """A tensor every rank holds whole has one writer and goes through `get`; a partitioned one (also one that a single
    rank holds entirely, as a ZeRO-1/2 fragment often is) is written by its holders; holdings that leave a gap or
    overlap are refused, naming the tensor."""
    specs = [('w', (10,)), ('m', (10,)), ('e', (0,)), ('f', (3,))]
    holdings = [[(0, 10), (0, 4), (0, 0), (0, 3)], [(0, 10), (4, 10), (0, 0), (0, 0)]]
    plan, whole = save_plan(specs, holdings, 2)
    assert len(plan[0]) == 1 and list(plan[0].values()) == [(0, 10)]
    assert plan[1] == {0: (0, 4), 1: (4, 10)} and len(plan[2]) == 1 and plan[3] == {0: (0, 3)}
    assert whole == [True, False, True, False]
    for bad in ([(0, 10), (0, 4), (0, 0), (0, 3)], [(0, 10), (5, 10), (0, 0), (0, 0)]), \
               ([(0, 10), (0, 6), (0, 0), (0, 3)], [(0, 10), (4, 10), (0, 0), (0, 0)]):
        with pytest.raises(ValueError, match="state tensor m: the ranks hold"):
            save_plan(specs, bad, 2)

def test_save_calls_get_only_for_whole_tensors_and_reports_a_wrong_size(tmp_path):
    """`get` (collective in the trainer) runs on every rank for the tensors all ranks hold whole and for nothing else;
    a tensor of the wrong size is a returned failure naming it (the collective sequence goes on), not an exception
    on one rank."""
    specs = [('w', (4,)), ('m', (6,)), ('f', (2,))]
    holdings = [[(0, 4), (0, 3), (0, 2)], [(0, 4), (3, 6), (0, 0)]]
    for rank in range(2):
        asked: list[int] = []
        failure, _ = save_state(tmp_path, specs, holdings, lambda i, a=asked: a.append(i) or torch.zeros(specs[i][1]),
                                lambda i, r=rank: torch.zeros(holdings[r][i][1] - holdings[r][i][0]), rank, 2)
        assert failure == '' and asked == [0]
    failure, _ = save_state(tmp_path, specs, holdings, lambda i: torch.zeros(specs[i][1]),
                            lambda i: torch.zeros(5), 1, 2)
    assert failure.startswith('state tensor m: 5 elements, expected 3')

def test_a_format_1_index_reads_as_whole_tensors(tmp_path):
    """Shards of the first format (no element ranges: each tensor whole in one file) still load."""
    index = {'format': 'cosim-dist elastic state 1', 'rank': 0, 'world_size': 1, 'file': 'x.bin', 'bytes': 24,
             'block': 4096, 'sha256': [hashlib.sha256(torch.arange(6.0).numpy().tobytes()).hexdigest()],
             'tensors': [{'name': 'a', 'shape': [2], 'offset': 0}, {'name': 'b', 'shape': [2, 2], 'offset': 8}]}
    layout = Layout([index])
    data = torch.arange(6.0).numpy().tobytes()
    assert torch.equal(layout.tensor(lambda f, a, b: data[a:b], 'b'), torch.tensor([[2.0, 3.0], [4.0, 5.0]]))
    assert layout.pieces == {'a': [(0, 2, 0)], 'b': [(0, 4, 2)]}
    with pytest.raises(RuntimeError, match="x.bin: shard format 'cosim-dist elastic state 9'"):
        Layout([{**index, 'format': 'cosim-dist elastic state 9'}])    # a newer layout: refused, never misread
