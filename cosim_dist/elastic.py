"""World-size-free training state: every fp32 tensor of the state (parameters, Adam moments, EMA) is stored once, in
one global order, cut at save into contiguous per-rank shard files (`shard-R-of-W.bin`, raw little-endian float32, with
an index `shard-R-of-W.json`: tensor names, shapes, offsets and a sha256 per block of the file). A resume on any
number of ranks M gives rank r the byte range [r/M, (r+1)/M) of the global order: it reads only that range (ranged
reads, widened to whole blocks so that each block is verified), and every tensor is assembled with broadcasts from the
ranks that read its pieces. No rank fetches a whole file it does not own; a corrupt or missing block fails the load on
every rank (`CorruptState`) before any tensor is set.

DeepSpeed's own checkpoints are tied to the world size that wrote them and its universal checkpoints load every full
parameter on every rank (docs/ARCHITECTURE.md, "Engineering choices"); here each rank reads 1/M of the bytes."""

import hashlib
import json
import math
import pathlib
from collections.abc import Callable, Sequence

import torch

from .distributed import rank_max

ITEM = 4                                  # bytes per element: the state is float32
BLOCK_MIN, BLOCK_MAX = 4 << 10, 8 << 20   # verification block size bounds (each file has ~256 blocks in between)

class CorruptState(RuntimeError):
    """A shard block did not match its hash, or a shard was missing or short (on some rank)."""

Spec = tuple[str, tuple[int, ...]]        # (tensor name, shape)

def shard_name(rank: int, world: int) -> str:
    return f'shard-{rank:05d}-of-{world:05d}'

def save_owners(sizes: Sequence[int], world: int) -> list[int]:
    """Writer of each tensor: contiguous runs of the global order, cut where the running byte count crosses k/world."""
    total, start, owners = max(sum(sizes), 1), 0, []
    for n in sizes:
        owners.append(min(world - 1, (start + n // 2) * world // total))
        start += n
    return owners

def block_size(nbytes: int) -> int:
    return min(BLOCK_MAX, max(BLOCK_MIN, 1 << max(0, math.ceil(math.log2(max(nbytes, 1) / 256)))))

def save_state(directory: pathlib.Path, specs: Sequence[Spec], get: Callable[[int], torch.Tensor], rank: int,
               world: int) -> str:
    """Collective: `get(i)` is called on every rank for every tensor in order (it may be a collective gather); the
    tensor's writer appends it to its shard, then writes the shard's index. A write error (a full disk) does not stop
    the collective sequence: it is returned ('' on success) for the caller to agree on with the other ranks."""
    owners = save_owners([math.prod(shape) for _, shape in specs], world)
    name, entries, offset, failure = shard_name(rank, world), [], 0, ''
    try:
        directory.mkdir(parents=True, exist_ok=True)
        f = open(directory / f'{name}.bin', 'wb')
    except OSError as e:
        f, failure = None, f'{type(e).__name__}: {e}'
    for i, (key, shape) in enumerate(specs):
        value = get(i)
        if owners[i] != rank or failure:
            continue
        data = value.detach().to('cpu', torch.float32).contiguous().reshape(-1).numpy().tobytes()
        if len(data) != math.prod(shape) * ITEM:
            raise ValueError(f'state tensor {key}: {len(data) // ITEM} elements, expected shape {shape}')
        try:
            f.write(data)
        except OSError as e:
            failure = f'{type(e).__name__}: {e}'
        entries.append({'name': key, 'shape': list(shape), 'offset': offset})
        offset += len(data)
    try:
        if f is not None:
            f.close()
        if not failure:
            block = block_size(offset)
            with open(directory / f'{name}.bin', 'rb') as f:
                hashes = [hashlib.sha256(chunk).hexdigest() for chunk in iter(lambda: f.read(block), b'')]
            index = {'format': 'cosim-dist elastic state 1', 'rank': rank, 'world_size': world,
                     'file': f'{name}.bin', 'bytes': offset, 'block': block, 'sha256': hashes, 'tensors': entries}
            (directory / f'{name}.json').write_text(json.dumps(index))
    except OSError as e:
        failure = failure or f'{type(e).__name__}: {e}'
    return failure

#----------------------------------------------------------------------------

class Layout:
    """The global order of a saved state, from the writers' indexes (all of them, in writer-rank order)."""

    def __init__(self, indexes: Sequence[dict]) -> None:
        self.indexes, self.tensors, base = list(indexes), {}, 0
        for ix in self.indexes:
            for t in ix['tensors']:
                self.tensors[t['name']] = (base + t['offset'], tuple(t['shape']))
            ix['base'] = base
            base += ix['bytes']
        self.total = base

    def check(self, specs: Sequence[Spec]) -> None:
        """The saved tensors must be the ones this run's networks hold, with the same shapes."""
        want = {k: tuple(s) for k, s in specs}
        have = {k: s for k, (_, s) in self.tensors.items()}
        if want != have:
            diff = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
            raise ValueError(f'the checkpoint holds another network than this run builds (first differences: '
                             f'{diff[:3]}); resume with the configuration that wrote it')

    @staticmethod
    def _bad_block(ix: dict, data: bytes, first: int) -> int | None:
        """The first block of `data` (blocks first, first+1, ... of the file) that does not match its hash."""
        block = ix['block']
        for k in range(first, first + -(-len(data) // block)):
            if hashlib.sha256(data[(k - first) * block:(k - first + 1) * block]).hexdigest() != ix['sha256'][k]:
                return k
        return None

    def read(self, read_range: Callable[[str, int, int], bytes], lo: int, hi: int) -> bytearray:
        """Bytes [lo, hi) of the global order, each file's part widened to whole blocks and verified."""
        out = bytearray(hi - lo)
        for ix in self.indexes:
            a, b = max(lo, ix['base']) - ix['base'], min(hi, ix['base'] + ix['bytes']) - ix['base']
            if a >= b:
                continue
            block = ix['block']
            first, last = a // block, (b - 1) // block
            start, end = first * block, min((last + 1) * block, ix['bytes'])
            data = read_range(ix['file'], start, end)
            if self._bad_block(ix, data, first) is not None:           # a bad transfer is read once more
                data = read_range(ix['file'], start, end)
            if (k := self._bad_block(ix, data, first)) is not None:
                raise CorruptState(f'{ix["file"]}: block {k} (bytes {k * block}-{min((k + 1) * block, ix["bytes"])}) '
                                   f'does not match its sha256')
            out[ix['base'] + a - lo:ix['base'] + b - lo] = data[a - start:b - start]
        return out

OK, CORRUPT, UNREADABLE = 0, 1, 2          # outcome of a rank's reads, agreed as the worst over ranks

def agree_on_reads(read: Callable[[], object], what: str) -> object:
    """Collective: run this rank's reads, then agree with every rank on the outcome before anything collective follows.
    A damaged checkpoint (missing file, short file, failed hash, unreadable metadata) raises CorruptState on every
    rank (the caller retires the commit); any other error (the store unreachable, credentials) an OSError on every
    rank, and the commit is kept."""
    result, why, outcome = None, '', OK
    try:
        result = read()
    except (CorruptState, FileNotFoundError, KeyError, ValueError, EOFError) as e:
        why, outcome = f'{type(e).__name__}: {e}', CORRUPT
    except Exception as e:                              # every other failure: keep the commit
        why, outcome = f'{type(e).__name__}: {e}', UNREADABLE
    outcome = rank_max(outcome)
    if outcome == UNREADABLE:
        raise OSError(f'{what} could not be read ({why or "on another rank"}); the checkpoint is kept: run again when '
                      f'the store is reachable')
    if outcome == CORRUPT:
        raise CorruptState(f'{what}: {why or "failed verification on another rank"}')
    return result

def rank_range(total: int, rank: int, world: int) -> tuple[int, int]:
    """The byte range of the global order that `rank` of `world` reads on a resume (element-aligned)."""
    n = total // ITEM
    return rank * n // world * ITEM, (rank + 1) * n // world * ITEM

def load_state(layout: Layout, specs: Sequence[Spec], read_range: Callable[[str, int, int], bytes],
               set_: Callable[[int, torch.Tensor], None], rank: int, world: int,
               device: torch.device = torch.device('cpu')) -> int:
    """Collective: read this rank's share of the global order (verified), agree that every rank succeeded, then
    assemble each tensor from the pieces of the ranks that read it and hand it to `set_(i, tensor)` on every rank.
    Returns the bytes this rank read."""
    layout.check(specs)
    lo, hi = rank_range(layout.total, rank, world)
    counted: list[int] = []

    def counting(file: str, start: int, end: int) -> bytes:
        data = read_range(file, start, end)
        if len(data) != end - start:
            raise CorruptState(f'{file}: bytes {start}-{end} requested, {len(data)} read (file short or missing)')
        counted.append(len(data))
        return data

    mine = agree_on_reads(lambda: torch.frombuffer(layout.read(counting, lo, hi), dtype=torch.float32)
                          if hi > lo else torch.empty(0), 'the state shards')
    ranges = [rank_range(layout.total, r, world) for r in range(world)]
    for i, (key, shape) in enumerate(specs):
        start, _ = layout.tensors[key]
        n = math.prod(shape)
        flat = torch.empty(n, dtype=torch.float32, device=device)
        for r, (rlo, rhi) in enumerate(ranges):
            a, b = max(start, rlo), min(start + n * ITEM, rhi)
            if a >= b:
                continue
            piece = flat[(a - start) // ITEM:(b - start) // ITEM]
            if r == rank:
                piece.copy_(mine[(a - lo) // ITEM:(b - lo) // ITEM])
            if world > 1:
                torch.distributed.broadcast(piece, src=r)
        set_(i, flat.view(shape))
    return sum(counted)
