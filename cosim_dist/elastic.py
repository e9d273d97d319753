"""World-size-free training state: every fp32 tensor of the state (parameters, Adam moments, EMA) is stored once, in one
global order, cut at save into contiguous per-rank shard files (`shard-R-of-W.bin`, raw little-endian float32, with an
index `shard-R-of-W.json`: tensor names, shapes, offsets and a sha256 per block of the file). A resume on any number of
ranks M gives rank r the byte range [r/M, (r+1)/M) of the global order: it reads only that range (ranged reads, widened
to whole blocks so that each block is verified), and all-to-alls then hand every rank the elements it holds (its ZeRO
partitions, or whole tensors where it keeps a full copy) from the ranks that read them. No rank fetches a whole file it
does not own, and none receives a partition it does not hold; a corrupt or missing block fails the load on every rank
(`CorruptState`) before any tensor is set.

DeepSpeed's own checkpoints are tied to the world size that wrote them and its universal checkpoints load every full
parameter on every rank (docs/ARCHITECTURE.md, "Engineering choices"); here each rank reads 1/M of the bytes."""

import hashlib
import json
import math
import pathlib
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch

from .distributed import gather_object, rank_max

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

class _HashingWriter:
    """A shard file written once: the sha256 of each block and of the whole file are computed from the bytes as they
    are written (no second pass over the file)."""

    def __init__(self, f, block: int) -> None:
        self.f, self.block, self.file_hash, self.blocks = f, block, hashlib.sha256(), []
        self.part, self.fill = hashlib.sha256(), 0          # the block being filled

    def write(self, data: memoryview) -> None:
        self.f.write(data)
        self.file_hash.update(data)
        while len(data):
            take = min(len(data), self.block - self.fill)
            self.part.update(data[:take])
            data, self.fill = data[take:], self.fill + take
            if self.fill == self.block:
                self.blocks.append(self.part.hexdigest())
                self.part, self.fill = hashlib.sha256(), 0

    def block_hashes(self) -> list[str]:
        return self.blocks + ([self.part.hexdigest()] if self.fill else [])

def save_state(directory: pathlib.Path, specs: Sequence[Spec], get: Callable[[int], torch.Tensor], rank: int,
               world: int) -> tuple[str, dict[str, str]]:
    """Collective: `get(i)` is called on every rank for every tensor in order (it may be a collective gather); the
    tensor's writer appends it to its shard, then writes the shard's index. Returns (failure, digests): a write error
    (a full disk) does not stop the collective sequence but is returned ('' on success) for the caller to agree on
    with the other ranks; `digests` maps the shard file's name to its sha256 (for the checkpoint manifest)."""
    owners = save_owners([math.prod(shape) for _, shape in specs], world)
    mine = sum(math.prod(shape) * ITEM for (_, shape), owner in zip(specs, owners, strict=True) if owner == rank)
    name, entries, offset, failure, out = shard_name(rank, world), [], 0, '', None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        out = _HashingWriter(open(directory / f'{name}.bin', 'wb'), block_size(mine))
    except OSError as e:
        failure = f'{type(e).__name__}: {e}'
    for i, (key, shape) in enumerate(specs):
        value = get(i)
        if owners[i] != rank or failure:
            continue
        data = value.detach().to('cpu', torch.float32).contiguous().reshape(-1)
        if data.numel() != math.prod(shape):
            raise ValueError(f'state tensor {key}: {data.numel()} elements, expected shape {shape}')
        try:
            out.write(memoryview(data.numpy()).cast('B'))
        except OSError as e:
            failure = f'{type(e).__name__}: {e}'
        entries.append({'name': key, 'shape': list(shape), 'offset': offset})
        offset += data.numel() * ITEM
    try:
        if out is not None:
            out.f.close()
        if not failure:
            index = {'format': 'cosim-dist elastic state 1', 'rank': rank, 'world_size': world, 'file': f'{name}.bin',
                     'bytes': offset, 'block': out.block, 'sha256': out.block_hashes(), 'tensors': entries}
            (directory / f'{name}.json').write_text(json.dumps(index))
    except OSError as e:
        failure = failure or f'{type(e).__name__}: {e}'
    return failure, ({} if failure else {f'{name}.bin': out.file_hash.hexdigest()})

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
        block, view = ix['block'], memoryview(data)                  # (slices of a memoryview copy nothing)
        for k in range(first, first + -(-len(data) // block)):
            if hashlib.sha256(view[(k - first) * block:(k - first + 1) * block]).hexdigest() != ix['sha256'][k]:
                return k
        return None

    def read(self, read_range: Callable[[str, int, int], bytes], lo: int, hi: int) -> memoryview:
        """Bytes [lo, hi) of the global order, each file's part widened to whole blocks and verified (read-only; a
        view of the transfer's own buffer when one file holds them all)."""
        pieces = []
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
            pieces.append(memoryview(data)[a - start:b - start])
        return pieces[0] if len(pieces) == 1 else memoryview(b''.join(pieces))

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

def as_floats(data: memoryview) -> torch.Tensor:
    """float32 values over read-only bytes, without a copy (never written to: torch warns that it could be)."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='The given buffer is not writable')
        return torch.frombuffer(data, dtype=torch.float32)

def rank_range(total: int, rank: int, world: int) -> tuple[int, int]:
    """The byte range of the global order that `rank` of `world` reads on a resume (element-aligned)."""
    n = total // ITEM
    return rank * n // world * ITEM, (rank + 1) * n // world * ITEM

CHUNK = 256 << 20        # bytes of the global order routed per all-to-all on a resume (bounds the buffers)

Range = tuple[int, int]  # elements [a, b) of a tensor's flattened values

def _overlap(a: Range, b: Range) -> Range | None:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None

def _chunks(specs: Sequence[Spec]) -> Iterator[range]:
    """Consecutive tensors of at most CHUNK bytes together (a larger tensor alone)."""
    first = 0
    while first < len(specs):
        last, size = first + 1, math.prod(specs[first][1]) * ITEM
        while last < len(specs) and size + math.prod(specs[last][1]) * ITEM <= CHUNK:
            size += math.prod(specs[last][1]) * ITEM
            last += 1
        yield range(first, last)
        first = last

def load_state(layout: Layout, specs: Sequence[Spec], read_range: Callable[[str, int, int], bytes],
               wants: Sequence[Range], set_: Callable[[int, torch.Tensor], None], rank: int, world: int,
               device: torch.device = torch.device('cpu')) -> int:
    """Collective: read this rank's share of the global order (verified) and agree that every rank succeeded; then
    route every piece of the global order from the rank that read it to the ranks that hold it (`wants[i]`: the
    elements of tensor i this rank holds, its ZeRO partition or the whole tensor), one all-to-all per chunk of
    tensors, and hand `set_(i, values)` those elements, flat. Returns the bytes this rank read."""
    layout.check(specs)
    lo, hi = rank_range(layout.total, rank, world)
    counted: list[int] = []

    def counting(file: str, start: int, end: int) -> bytes:
        data = read_range(file, start, end)
        if len(data) != end - start:
            raise CorruptState(f'{file}: bytes {start}-{end} requested, {len(data)} read (file short or missing)')
        counted.append(len(data))
        return data

    mine = agree_on_reads(lambda: as_floats(layout.read(counting, lo, hi)) if hi > lo else torch.empty(0),
                          'the state shards')
    read = [tuple(x // ITEM for x in rank_range(layout.total, r, world)) for r in range(world)]  # global elements
    held = gather_object([tuple(w) for w in wants])                                       # every rank's wants
    base = [layout.tensors[key][0] // ITEM for key, _ in specs]
    own = lo // ITEM                                     # the first global element of `mine`

    def piece(i: int, reader: int, holder: int) -> Range | None:
        """The global elements of tensor i that `reader` read and `holder` holds."""
        a, b = held[holder][i]
        return _overlap(read[reader], (base[i] + a, base[i] + b))

    for chunk in _chunks(specs):
        sends = [[p for i in chunk if (p := piece(i, rank, q))] for q in range(world)]
        gets = [[piece(i, s, rank) for i in chunk] for s in range(world)]
        outgoing = torch.cat([mine[a - own:b - own] for q in sends for a, b in q] + [torch.empty(0)]).to(device)
        incoming = outgoing
        if world > 1:
            incoming = torch.empty(sum(b - a for g in gets for a, b in filter(None, g)), device=device)
            torch.distributed.all_to_all_single(incoming, outgoing,
                                                [sum(b - a for a, b in filter(None, g)) for g in gets],
                                                [sum(b - a for a, b in q) for q in sends])
        values: list[torch.Tensor | None] = [None] * len(chunk)
        at = 0
        for g in gets:                                 # senders in rank order, their pieces in tensor order
            for k, p in enumerate(g):
                if not p:
                    continue
                a, b = held[rank][chunk[k]]
                if p[1] - p[0] == b - a:               # one sender had all of it: a view, no copy
                    values[k] = incoming[at:at + b - a]
                else:
                    if values[k] is None:
                        values[k] = torch.empty(b - a, device=device)
                    start = p[0] - base[chunk[k]] - a
                    values[k][start:start + p[1] - p[0]].copy_(incoming[at:at + p[1] - p[0]])
                at += p[1] - p[0]
        values = [torch.empty(0, device=device) if v is None else v for v in values]
        for k, i in enumerate(chunk):
            set_(i, values[k])
    return sum(counted)
