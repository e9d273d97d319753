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
from cosim_dist.elastic import ITEM, rank_range, save_state, shard_name
from cosim_dist.storage import sha256_file

def write(probe, directory, world: int) -> dict[str, str]:
    """The state as `world` writers store it (each call plays one rank; `get` is not collective here)."""
    digests = {}
    for rank in range(world):
        failure, d = save_state(directory, probe.SPECS, probe.values, rank, world)
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

@pytest.mark.parametrize('written,world,chunk', [(2, 3, 256 << 20), (3, 2, 4096), (1, 4, 1)])
def test_each_rank_receives_exactly_what_it_holds(route_probe, tmp_path, written, world, chunk):
    """Written by `written` ranks, resumed on `world` (gloo, tests/helpers/route_probe.py): set_ receives, for every
    tensor, exactly the elements the rank holds (value by value), whatever the chunking of the all-to-alls (one chunk,
    several, one tensor per chunk); each rank reads its share of the bytes plus at most a verification block at each
    end of each file it reads from."""
    probe = route_probe
    write(probe, tmp_path, written)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={world}',
           probe.__file__, str(tmp_path / 'out'), str(tmp_path), str(chunk)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in range(world):
        out = torch.load(tmp_path / f'out-{rank}.pt', weights_only=True)
        assert out['total'] == sum(math.prod(s) for _, s in probe.SPECS) * ITEM
        lo, hi = rank_range(out['total'], rank, world)
        assert out['bytes'] == out['spans'] and hi - lo <= out['bytes'] <= hi - lo + 2 * written * elastic.BLOCK_MIN
        assert sorted(out['got']) == list(range(len(probe.SPECS)))
        for i, (a, b) in enumerate(probe.wants_of(rank, world)):
            assert torch.equal(out['got'][i], probe.values(i).flatten()[a:b]), (rank, i)
