"""World-size-free training state: every fp32 tensor of the state (parameters, Adam moments, EMA) is stored once, in
per-rank shard files (`shard-R-of-W.bin`, raw little-endian float32, with an index `shard-R-of-W.json`: tensor names,
shapes, which elements of each tensor the file holds, offsets and a sha256 per block of the file). At save each rank
writes what it holds: its elements of a partitioned tensor (its ZeRO partition or fragment, read without a
collective), and a tensor every rank holds whole once, by one writer. The files, concatenated in rank order, are the
global order. A resume on the writers' number of ranks gives rank r the file it wrote (it reads its own partitions
and nothing else); on any other number M rank r reads the element range [r/M, (r+1)/M) of the global order (ranged
reads, widened to whole blocks so that each block is verified), and all-to-alls then hand every rank the elements it
holds (its ZeRO partitions, or whole tensors where it keeps a full copy) from the ranks that read them. No rank
fetches a whole file it does not own, and none receives a partition it does not hold; a corrupt or missing block
fails the load on every rank (`CorruptState`) before any tensor is set.

DeepSpeed's own checkpoints are tied to the world size that wrote them and its universal checkpoints load every full
parameter on every rank (docs/ARCHITECTURE.md, "Engineering choices"); here each rank reads 1/M of the bytes."""

import bisect
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
FORMAT = 'cosim-dist elastic state 2'     # 1: every tensor whole in one file (read as one piece)
FORMATS = ('cosim-dist elastic state 1', FORMAT)

def shard_name(rank: int, world: int) -> str:
    return f'shard-{rank:05d}-of-{world:05d}'

Range = tuple[int, int]  # elements [a, b) of a tensor's flattened values, or of the global order

def save_owners(sizes: Sequence[int], world: int) -> list[int]:
    """Writer of each tensor: contiguous runs of the global order, cut where the running byte count crosses k/world."""
    total, start, owners = max(sum(sizes), 1), 0, []
    for n in sizes:
        owners.append(min(world - 1, (start + n // 2) * world // total))
        start += n
    return owners

def tiles(ranges: Sequence[Range], n: int) -> bool:
    """Whether element ranges, sorted by start, cover [0, n) exactly once, each starting where the last ended."""
    ends = [0] + [b for _, b in ranges]
    return [a for a, _ in ranges] == ends[:-1] and ends[-1] == n

def save_plan(specs: Sequence[Spec], holdings: Sequence[Sequence[Range]],
              world: int) -> tuple[list[dict[int, Range]], list[bool]]:
    """Who writes which elements of each tensor, `{rank: (a, b)}`, and whether every rank holds it whole:
    `holdings[r][i]` are the elements of tensor i that rank r holds. A tensor every rank holds whole is written once
    (its writer from `save_owners` over those tensors); any other by each rank that holds a part, its own elements,
    which must tile the tensor (a tensor one rank holds entirely: that rank)."""
    sizes = [math.prod(shape) for _, shape in specs]
    whole = [all(tuple(h[i]) == (0, n) for h in holdings) for i, n in enumerate(sizes)]
    owners = save_owners([n if w else 0 for n, w in zip(sizes, whole, strict=True)], world)
    plan = []
    for i, n in enumerate(sizes):
        if whole[i]:
            plan.append({owners[i]: (0, n)})
            continue
        parts = sorted((tuple(h[i]), r) for r, h in enumerate(holdings) if h[i][0] < h[i][1])
        if not tiles([rng for rng, _ in parts], n):
            raise ValueError(f'state tensor {specs[i][0]}: the ranks hold {[rng for rng, _ in parts]} of its {n} '
                             f'elements, which do not tile it (each element must be held by exactly one rank or by '
                             f'all)')
        plan.append({r: rng for rng, r in parts})
    return plan, whole

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

def save_state(directory: pathlib.Path, specs: Sequence[Spec], holdings: Sequence[Sequence[Range]],
               get: Callable[[int], torch.Tensor], local: Callable[[int], torch.Tensor], rank: int,
               world: int) -> tuple[str, dict[str, str]]:
    """Collective where `get` is: `get(i)` (the full tensor) is called on every rank for every tensor that all ranks
    hold whole, in order, and its writer appends it to its shard; `local(i)` (this rank's elements, `holdings[rank][i]`,
    never collective) on the ranks that write a part of any other tensor (save_plan). Then the shard's index is
    written. Returns (failure, digests): a write error (a full disk) or a tensor of the wrong size does not stop the
    collective sequence but is returned ('' on success) for the caller to agree on with the other ranks; `digests`
    maps the shard file's name to its sha256 (for the checkpoint manifest)."""
    plan, whole = save_plan(specs, holdings, world)
    mine = sum((part[rank][1] - part[rank][0]) * ITEM for part in plan if rank in part)
    name, entries, offset, failure, out = shard_name(rank, world), [], 0, '', None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        out = _HashingWriter(open(directory / f'{name}.bin', 'wb'), block_size(mine))
    except OSError as e:
        failure = f'{type(e).__name__}: {e}'
    for i, (key, shape) in enumerate(specs):
        value = get(i) if whole[i] else (local(i) if rank in plan[i] else None)
        if rank not in plan[i] or failure:
            continue
        a, b = plan[i][rank]
        data = value.detach().to('cpu', torch.float32).contiguous().reshape(-1)
        if data.numel() != b - a:
            failure = (f'state tensor {key}: {data.numel()} elements, expected {b - a} (elements {a}-{b} of shape '
                       f'{shape})')
            continue
        try:
            out.write(memoryview(data.numpy()).cast('B'))
        except OSError as e:
            failure = f'{type(e).__name__}: {e}'
        entries.append({'name': key, 'shape': list(shape), 'elements': [a, b], 'offset': offset})
        offset += data.numel() * ITEM
    try:
        if out is not None:
            out.f.close()
        if not failure:
            index = {'format': FORMAT, 'rank': rank, 'world_size': world, 'file': f'{name}.bin',
                     'bytes': offset, 'block': out.block, 'sha256': out.block_hashes(), 'tensors': entries}
            (directory / f'{name}.json').write_text(json.dumps(index))
    except OSError as e:
        failure = failure or f'{type(e).__name__}: {e}'
    return failure, ({} if failure else {f'{name}.bin': out.file_hash.hexdigest()})

#----------------------------------------------------------------------------

class Layout:
    """The global order of a saved state, from the writers' indexes (all of them, in writer-rank order)."""

    def __init__(self, indexes: Sequence[dict]) -> None:
        self.indexes, self.shapes, base = list(indexes), {}, 0
        self.pieces: dict[str, list[tuple[int, int, int]]] = {}    # name: (a, b, first global element), by a
        for ix in self.indexes:
            if ix.get('format') not in FORMATS:
                raise RuntimeError(f'{ix.get("file")}: shard format {ix.get("format")!r}, this cosim-dist reads '
                                   f'{FORMATS}; resume with the version that wrote the checkpoint')
            for t in ix['tensors']:
                a, b = t.get('elements', (0, math.prod(t['shape'])))    # format 1: whole tensors
                self.shapes[t['name']] = tuple(t['shape'])
                self.pieces.setdefault(t['name'], []).append((a, b, (base + t['offset']) // ITEM))
            ix['base'] = base
            base += ix['bytes']
        for pieces in self.pieces.values():
            pieces.sort()
        self.total = base

    def check(self, specs: Sequence[Spec]) -> None:
        """The saved tensors must be the ones this run's networks hold, with the same shapes, each whole."""
        want = {k: tuple(s) for k, s in specs}
        if want != self.shapes:
            diff = sorted(set(want) ^ set(self.shapes)) or sorted(k for k in want if want[k] != self.shapes[k])
            raise ValueError(f'the checkpoint holds another network than this run builds (first differences: '
                             f'{diff[:3]}); resume with the configuration that wrote it')
        for name, pieces in self.pieces.items():
            if not tiles([(a, b) for a, b, _ in pieces], math.prod(self.shapes[name])):
                raise CorruptState(f'the shard indexes hold elements {[(a, b) for a, b, _ in pieces]} of {name}, '
                                   f'not all {math.prod(self.shapes[name])} of them')

    def tensor(self, read_range: Callable[[str, int, int], bytes], name: str) -> torch.Tensor:
        """One whole saved tensor (verified, a writable copy), reading only its pieces."""
        parts = [as_floats(self.read(read_range, g * ITEM, (g + b - a) * ITEM)) for a, b, g in self.pieces[name]
                 if b > a]
        return torch.cat([torch.empty(0), *parts]).view(self.shapes[name])

    def spans(self, world: int) -> list[Range]:
        """The elements of the global order that each of `world` ranks reads on a resume: on the writers' number of
        ranks the file each one wrote (its own partitions), on any other an even cut."""
        if len(self.indexes) == world:
            return [(ix['base'] // ITEM, (ix['base'] + ix['bytes']) // ITEM) for ix in self.indexes]
        n = self.total // ITEM
        return [(r * n // world, (r + 1) * n // world) for r in range(world)]

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

def _overlap(a: Range, b: Range) -> Range | None:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None

CHUNK = 256 << 20        # bytes of the global order routed per all-to-all on a resume (bounds the buffers)

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

Route = dict[int, list[tuple[int, int, int]]]   # peer rank: [(global a, global b, first tensor element)], in order

def _routes(layout: Layout, specs: Sequence[Spec], spans: Sequence[Range], held: Sequence[Sequence[Range]],
            rank: int) -> tuple[list[Route], list[Route]]:
    """Per tensor: what this rank sends (from the span it read, to each holder) and what it receives (its holding,
    from each reader), as global element ranges in piece order (the same list on both ends of every pair)."""
    sends, gets = [], []
    starts = [a for a, _ in spans]
    for i, (key, _) in enumerate(specs):
        send: Route = {}
        get: Route = {}
        for a, b, g in layout.pieces[key]:
            if (read := _overlap(spans[rank], (g, g + b - a))):
                for q, h in enumerate(held):
                    if (x := _overlap((a + read[0] - g, a + read[1] - g), h[i])):
                        send.setdefault(q, []).append((g + x[0] - a, g + x[1] - a, x[0]))
            if (x := _overlap((a, b), held[rank][i])):
                lo, hi = g + x[0] - a, g + x[1] - a
                for s in range(max(0, bisect.bisect_right(starts, lo) - 1), len(spans)):
                    if spans[s][0] >= hi:
                        break
                    if (y := _overlap(spans[s], (lo, hi))):
                        get.setdefault(s, []).append((y[0], y[1], a + y[0] - g))
        sends.append(send)
        gets.append(get)
    return sends, gets

def load_state(layout: Layout, specs: Sequence[Spec], read_range: Callable[[str, int, int], bytes],
               wants: Sequence[Range], set_: Callable[[int, torch.Tensor], None], rank: int, world: int,
               device: torch.device = torch.device('cpu')) -> int:
    """Collective: read this rank's span of the global order (`Layout.spans`, verified) and agree that every rank
    succeeded; then route every piece from the rank that read it to the ranks that hold it (`wants[i]`: the elements
    of tensor i this rank holds, its ZeRO partition or the whole tensor), one all-to-all per chunk of tensors, and hand
    `set_(i, values)` those elements, flat (often a read-only view of a transfer buffer: `set_` copies it). Returns the
    bytes this rank read."""
    layout.check(specs)
    spans = layout.spans(world)
    own, end = spans[rank]
    counted: list[int] = []

    def counting(file: str, start: int, end: int) -> bytes:
        data = read_range(file, start, end)
        if len(data) != end - start:
            raise CorruptState(f'{file}: bytes {start}-{end} requested, {len(data)} read (file short or missing)')
        counted.append(len(data))
        return data

    mine = agree_on_reads(lambda: as_floats(layout.read(counting, own * ITEM, end * ITEM)) if end > own
                          else torch.empty(0), 'the state shards')
    held = gather_object([tuple(w) for w in wants])                                       # every rank's wants
    sends, gets = _routes(layout, specs, spans, held, rank)
    for chunk in _chunks(specs):     # what this rank read for itself is not routed: views of its own read, no copy
        out = [[] if q == rank else [(a, b) for i in chunk for a, b, _ in sends[i].get(q, ())] for q in range(world)]
        into = [[] if s == rank else [(k, a, b, e) for k, i in enumerate(chunk) for a, b, e in gets[i].get(s, ())]
                for s in range(world)]
        received = [(k, e, mine[a - own:b - own].to(device)) for k, i in enumerate(chunk)
                    for a, b, e in gets[i].get(rank, ())]
        if world > 1:
            outgoing = torch.cat([mine[a - own:b - own] for q in out for a, b in q] + [torch.empty(0)]).to(device)
            incoming = torch.empty(sum(b - a for s in into for _, a, b, _ in s), device=device)
            torch.distributed.all_to_all_single(incoming, outgoing, [sum(b - a for _, a, b, _ in s) for s in into],
                                                [sum(b - a for a, b in q) for q in out])
            at = 0
            for k, a, b, e in (piece for s in into for piece in s):  # senders in rank order, then tensor order
                received.append((k, e, incoming[at:at + b - a]))
                at += b - a
        values: list[torch.Tensor | None] = [None] * len(chunk)
        for k, e, piece in received:
            lo, hi = held[rank][chunk[k]]
            if piece.numel() == hi - lo:               # one reader had all of it: a view, no copy
                values[k] = piece
            else:
                if values[k] is None:
                    values[k] = torch.empty(hi - lo, device=device)
                values[k][e - lo:e - lo + piece.numel()].copy_(piece)
        for k, i in enumerate(chunk):
            set_(i, torch.empty(0, device=device) if values[k] is None else values[k])
    return sum(counted)
