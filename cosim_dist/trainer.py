"""The CoSIM distillation loop (docs/ALGORITHM.md, Eq. L1). It receives built components and knows nothing of
launchers, Slurm or object storage; `should_stop()` is the preemption seam checked at step boundaries.

Randomness is a function of (seed, images seen): every step reseeds the global RNG (dropout) and draws the
times and noise of the *global* micro-batch from a step generator, each rank taking its slice, so a run
gives the same result in 1 or N processes and resumes exactly from one counter."""

import collections
import contextlib
import dataclasses
import io
import json
import pathlib
import shutil
from collections.abc import Callable
from typing import Protocol

import torch

from . import cosim
from .checkpoint import StepReader
from .config import ConfigError, KernelConfig, LossConfig, TrainConfig
from .distributed import any_rank, gather_object, rank_mean
from .elastic import CorruptState, Layout, agree_on_reads, load_state, save_state
from .ema import GeneratorEMA
from .engines import autocast, state_specs
from .logging import RunLogger, log
from .nets import build_network
from .resume import check_resume
from .seeds import step_seed
from .storage import open_store
from .teacher_io import arch_name

class BatchStream(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...

class Checkpointer(Protocol):
    def latest(self) -> StepReader | None: ...          # collective: the newest committed checkpoint, read lazily
    def retire(self, nimg: int, why: str) -> None: ...  # collective: a commit that turned out unusable
    def stage(self, nimg: int) -> pathlib.Path: ...     # collective: local directory to write a checkpoint into
    def commit(self, nimg: int, digests: dict[str, str]) -> None: ...  # collective: every rank wrote (sha256 of
                                                        # files it hashed as it wrote them); make it the newest
    def close(self) -> None: ...                        # collective: finish pending uploads

def finite_rows(*xs: torch.Tensor) -> torch.Tensor:
    """Mask [N] of samples whose tensors are all finite (NaN samples are dropped and counted, Eq. L1)."""
    ok = torch.ones(xs[0].shape[0], dtype=torch.bool, device=xs[0].device)
    for x in xs:
        ok &= torch.isfinite(x.flatten(1)).all(1)
    return ok

@dataclasses.dataclass
class TrainState:
    nimg: int = 0           # images per iteration (train.batch) times the iterations run, auxiliary warm-up included
    nan_dropped: int = 0    # samples dropped for NaN/Inf on this rank

#----------------------------------------------------------------------------

class Trainer:
    """Eq. L1: alternating auxiliary (Eq. A1) and generator (Eq. G1) steps, then the generator EMA."""

    def __init__(self, *, teacher: torch.nn.Module, g_engine, aux_engine, data: BatchStream,
                 schedule: cosim.TimeSchedule, train: TrainConfig, loss: LossConfig, kernel: KernelConfig,
                 sigma_data: float, seed: int, logger: RunLogger, device: torch.device, precision: str = 'fp32',
                 checkpointer: Checkpointer | None = None, should_stop: Callable[[], bool] = lambda: False,
                 rank: int = 0, world_size: int = 1, batch_gpu: int | None = None, fingerprint: dict | None = None,
                 timer: Callable[[str], contextlib.AbstractContextManager] | None = None,
                 on_start: Callable[[], None] = lambda: None,
                 snapshot: Callable[[int, torch.nn.Module], dict[str, float]] | None = None,
                 snapshot_every: int = 0) -> None:
        self.teacher, self.g, self.aux, self.data = teacher, g_engine, aux_engine, data
        self.schedule, self.train_cfg, self.loss_cfg, self.kernel_cfg = schedule, train, loss, kernel
        self.sigma_data, self.seed, self.logger, self.device, self.precision = (sigma_data, seed, logger, device,
                                                                                precision)
        self.checkpointer, self.should_stop = checkpointer, should_stop
        self.rank, self.world_size, self.fingerprint = rank, world_size, fingerprint or {}
        self.timer = timer or (lambda phase: contextlib.nullcontext())   # phase -> context (the benchmark's clock)
        self.on_start = on_start           # called once the start is accepted (resume check passed), before step 1
        # collective (nimg, EMA) -> scalars, at every multiple of `snapshot_every` images (0: none)
        self.snapshot, self.snapshot_every = (snapshot, snapshot_every) if snapshot_every > 0 else (None, 0)
        self.batch_gpu = batch_gpu or train.batch // world_size
        self.rounds = train.batch // (self.batch_gpu * world_size)
        self.alpha = cosim.generator_alpha(loss.lmbda, loss.alpha)
        self.averaged = GeneratorEMA(g_engine, device)       # on this rank's elements of G
        self.ema = self.averaged.net                          # the full EMA network, current after averaged.sync()
        self.state = TrainState()
        self.sigma_s_seen: list[torch.Tensor] = []  # the generator step's sigma_s since the last status line
        self.t_gain = next((n for n, _ in aux_engine.module.named_parameters() if n.endswith('t_gain')), None)

    #------------------------------------------------------------------------
    # Checkpoints: the training state as full tensors in world-size-free shards (elastic.py; each tensor stored once,
    # the EMA included), the rest (counters, data state, resume fingerprint, Adam steps, buffers) in meta.pt.

    def _state_specs(self) -> list[tuple[str, tuple[int, ...]]]:
        return (state_specs(self.g.module, 'g') + state_specs(self.aux.module, 'aux')
                + [(f'ema/{k}', tuple(p.shape)) for k, p in self.ema.named_parameters()])

    def _state_access(self, specs):
        """(get(i), local(i), holding, wants, set(i, values)) over the tensors of `specs`: engine state through the
        engines, the EMA from this rank's elements (each rank holds its partitions, or all); `holding` the elements
        this rank writes at save (`local`), `wants` those it receives on resume (`set`)."""
        engines = {'g': self.g, 'aux': self.aux}
        parts = [key.split('/') for key, _ in specs]         # [net, name, kind] or ['ema', name]

        def get(i: int) -> torch.Tensor:
            net, name, *kind = parts[i]
            return self.averaged.get_full(name) if net == 'ema' else engines[net].get_full(name, kind[0])

        def local(i: int) -> torch.Tensor:
            net, name, *kind = parts[i]
            return self.averaged.local[name] if net == 'ema' else engines[net].get_local(name, kind[0])

        def set_(i: int, values: torch.Tensor) -> None:
            net, name, *kind = parts[i]
            if net == 'ema':
                self.averaged.set_local(name, values)
            else:
                engines[net].set_state(name, kind[0], values)
        holding, wants = ([self.averaged.range[name] if net == 'ema' else getattr(engines[net], method)(name, kind[0])
                           for net, name, *kind in parts] for method in ('save_range', 'state_range'))
        return get, local, holding, wants, set_

    def diagnostics(self) -> dict[str, float]:
        """Collective (ZeRO-3 gathers t_gain). This rank's sigma_s quantiles in the generator steps since the last
        call (Eq. T1: how many pairs sit where the G1 signal is small) and |t_gain|, the gate of the auxiliary's
        sigma_t branch (0 at the start; `aux.t_embed=gated`)."""
        out = {}
        if self.sigma_s_seen:
            s = torch.cat(self.sigma_s_seen).double().cpu()
            qs = torch.quantile(s, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
            out = {f'schedule/sigma_s_q{round(q * 100)}': v for q, v in zip((0.1, 0.5, 0.9), qs)}
            self.sigma_s_seen = []
        if self.t_gain is not None:
            out['aux/t_gain_abs'] = float(self.aux.get_full(self.t_gain, 'param').abs())
        return out

    def save_checkpoint(self) -> None:
        path = self.checkpointer.stage(self.state.nimg)
        specs = self._state_specs()
        meta = {'state': dataclasses.asdict(self.state), 'data': self.data.state_dict(), 'config': self.fingerprint,
                'ema_net': {'arch': arch_name(self.ema), 'init_kwargs': self.ema.init_kwargs},  # sampled on its own
                'adam_step': {'g': self.g.adam_step(), 'aux': self.aux.adam_step()},
                'buffers': {'ema': dict(self.ema.named_buffers())}, 'world_size': self.world_size}
        get, local, holding, *_ = self._state_access(specs)
        failure, digests = save_state(path, specs, gather_object(holding), get, local, self.rank, self.world_size)
        if self.rank == 0 and not failure:
            try:
                torch.save(meta, path / 'meta.pt')
            except (OSError, RuntimeError) as e:    # torch.save reports a full disk as 'unexpected pos ...'
                failure = f'{type(e).__name__}: {e}'
        if any_rank(bool(failure)):                 # every rank stops here together (no collective left waiting)
            free = shutil.disk_usage(path).free / 2**20
            raise OSError(f'checkpoint staging failed: could not write the state at {self.state.nimg} images '
                          f'into {path} ({failure or "on another rank"}); {free:.1f} MiB free on that disk (full?): '
                          f'free space or set checkpoint.staging=DIR; the previous commit is intact')
        self.checkpointer.commit(self.state.nimg, digests)
        self.saved_nimg = self.state.nimg

    def load_checkpoint(self) -> bool:
        """Collective: resume from the newest usable commit (older ones if a load finds it corrupt), on any number of
        ranks; False if there is none."""
        while self.checkpointer is not None and (reader := self.checkpointer.latest()) is not None:
            try:
                self._restore(reader)
                return True
            except CorruptState as e:
                self.checkpointer.retire(reader.nimg, str(e))
        return False

    def _restore(self, reader) -> None:
        check_format(reader)                        # an older layout is an error, never a reason to retire
        meta, layout = agree_on_reads(lambda: read_meta(reader), 'the checkpoint metadata (meta.pt, shard indexes)')
        check_resume(meta.get('config', {}), self.fingerprint)
        specs = self._state_specs()
        *_, wants, set_ = self._state_access(specs)
        self.restored_bytes = load_state(layout, specs, reader.read_range, wants, set_, self.rank, self.world_size,
                                         self.device)
        self.g.set_adam_step(meta['adam_step']['g'])
        self.aux.set_adam_step(meta['adam_step']['aux'])
        for name, value in meta['buffers']['ema'].items():
            self.ema.get_buffer(name).copy_(value)
        self.state = TrainState(**meta['state'])
        self.data.load_state_dict(meta['data'])
        log.info(f'resumed at {self.state.nimg / 1000:.1f} kimg from {reader.url} (written by {meta["world_size"]} '
                 f'ranks; this rank read {reader.bytes_read / 2**20:.2f} MiB)')

    #------------------------------------------------------------------------

    def _micro_batch(self, gen: torch.Generator):
        """Data, times (Eq. T1) and kernel noise (Eq. K1) of this rank's slice of the global micro-batch. Samples with
        non-finite data are dropped (and counted) here, before any network sees them: a NaN that entered G's forward
        would reach every weight gradient and, sanitised to 0, freeze the generator for the step."""
        x0, c = self.data.next_batch()
        x0, c = x0.to(self.device, non_blocking=True), c.to(self.device, non_blocking=True)
        n, lo = x0.shape[0] * self.world_size, x0.shape[0] * self.rank
        s, t = (v[lo:lo + x0.shape[0]] for v in self.schedule.sample(n, gen, self.device))
        n_t, n_s = torch.randn(2, n, *x0.shape[1:], generator=gen, device=self.device)[:, lo:lo + x0.shape[0]]
        ok = finite_rows(x0)
        self._count_dropped(ok)
        x0, c, s, t, n_t, n_s = (v[ok] for v in (x0, c, s, t, n_t, n_s))
        return x0, (c if c.shape[1] else None), s, t, n_t, n_s

    def _count_dropped(self, ok: torch.Tensor) -> None:
        self.state.nan_dropped += int((~ok).sum())

    #------------------------------------------------------------------------
    # Eq. L1 step 1: auxiliary update on a real batch, generator output detached.

    def aux_step(self, gen: torch.Generator) -> float:
        G, aux, total = self.g.module, self.aux.module, 0.0
        G.eval()
        aux.train()
        for _ in range(self.rounds):
            x0, c, s, t, n_t, n_s = self._micro_batch(gen)
            with torch.no_grad(), autocast(self.device, self.precision):
                with self.timer('aux: generator (no grad)'):
                    ks = cosim.transition_kernel(G, x0, c, s, t, n_t, n_s, self.kernel_cfg.eta)
                with self.timer('aux: teacher'):
                    D_phi = self.teacher(ks.x_s, s, c).float()
            ok = finite_rows(ks.x_s, D_phi)
            self._count_dropped(ok)
            c_ok = None if c is None else c[ok]
            with self.timer('aux: forward'), autocast(self.device, self.precision):
                out = aux(ks.x_s[ok], s[ok], c_ok, sigma_t=t[ok], return_logvar=aux.has_logvar)
                D_psi, logvar = out if aux.has_logvar else (out, None)
                loss = cosim.aux_loss(D_psi.float(), ks.target[ok], D_phi[ok], s[ok], self.loss_cfg.lmbda,
                                      self.sigma_data, None if logvar is None else logvar.float())
            with self.timer('aux: backward'):
                self.aux.backward(loss)
            with self.timer('aux: optimiser'):
                self.aux.step()
            total += loss.item() / self.rounds
        return total

    #------------------------------------------------------------------------
    # Eq. L1 step 2: generator update on a new real batch; teacher and auxiliary frozen but
    # differentiable in their input, so no gradient accumulates into the auxiliary.

    def generator_step(self, gen: torch.Generator) -> float:
        G, aux, total = self.g.module, self.aux.module, 0.0
        G.train()
        aux.eval().requires_grad_(False)
        try:
            for _ in range(self.rounds):
                x0, c, s, t, n_t, n_s = self._micro_batch(gen)
                s = self.schedule.generator_sigma_s(s, t)
                self.sigma_s_seen.append(s.detach())      # on the device: no host sync in the step
                with autocast(self.device, self.precision):
                    with self.timer('gen: generator forward'):
                        ks = cosim.transition_kernel(G, x0, c, s, t, n_t, n_s, self.kernel_cfg.eta)
                    with self.timer('gen: teacher'):
                        D_phi = self.teacher(ks.x_s, s, c).float()
                    with self.timer('gen: aux forward'):
                        D_psi = aux(ks.x_s, s, c, sigma_t=t).float()
                ok = finite_rows(ks.x_s, D_phi, D_psi)
                self._count_dropped(ok)
                loss = cosim.generator_loss(ks.target[ok].float(), D_phi[ok], D_psi[ok], self.alpha,
                                            self.loss_cfg.gen_scale)
                with self.timer('gen: backward'):
                    self.g.backward(loss)
                with self.timer('gen: optimiser'):
                    self.g.step()
                total += loss.item() / self.rounds
        finally:
            aux.requires_grad_(True)
        return total

    def ema_step(self) -> None:
        beta = cosim.ema_beta(self.train_cfg.batch, self.state.nimg, self.train_cfg.ema_halflife_kimg,
                              self.train_cfg.ema_rampup)
        with self.timer('ema'):
            self.averaged.update(beta)

    def iteration(self) -> dict[str, float]:
        """One Eq. L1 iteration at the current image count: auxiliary step(s), generator step, EMA; returns the
        losses ('loss/aux', and 'loss/gen' after the auxiliary warm-up, which has no generator step and no EMA).
        Randomness is reseeded from (seed, rank, nimg) first (resume is exact)."""
        torch.manual_seed(step_seed(self.seed, self.rank, self.state.nimg))          # dropout
        gen = torch.Generator(self.device).manual_seed(step_seed(self.seed, self.state.nimg))
        steps = self.train_cfg.aux_steps_per_gen
        losses = {'loss/aux': sum(self.aux_step(gen) for _ in range(steps)) / steps}
        warmup = self.state.nimg < self.train_cfg.aux_warmup_kimg * 1000
        if not warmup:
            losses['loss/gen'] = self.generator_step(gen)
        self.state.nimg += self.train_cfg.batch
        if not warmup:
            self.ema_step()
        return losses

    #------------------------------------------------------------------------

    def take_snapshot(self) -> None:
        """Collective: the snapshot seam at the current image count; its scalars join the training log."""
        with self.logger.maintenance():
            self.averaged.sync()
            self.logger.scalars(self.state.nimg, self.snapshot(self.state.nimg, self.ema))

    def train(self) -> TrainState:
        """Run (or resume) until train.kimg; returns the final state. Stops early when any rank's
        should_stop() is true (agreed at a step boundary), after saving a checkpoint."""
        cfg = self.train_cfg
        self.load_checkpoint()
        self.on_start()
        self.saved_nimg = self.state.nimg
        total, batch = int(cfg.kimg * 1000), cfg.batch
        self.logger.start(total, min(self.state.nimg, total), 'distil')
        next_log = self.state.nimg + cfg.log_kimg * 1000
        next_ckpt = self.state.nimg + cfg.checkpoint_kimg * 1000
        next_snap = (self.state.nimg // self.snapshot_every + 1) * self.snapshot_every if self.snapshot else 0
        sums: collections.Counter[str] = collections.Counter()
        counts: collections.Counter[str] = collections.Counter()
        while self.state.nimg < total:
            if any_rank(self.should_stop()):
                log.info(f'stop requested: saving at {self.state.nimg / 1000:.1f} kimg')
                break
            losses = self.iteration()
            sums.update(losses)
            counts.update(losses.keys())
            means = {k: sums[k] / counts[k] for k in sums}
            self.logger.advance(batch, **{k.removeprefix('loss/'): v for k, v in means.items()})
            done = self.state.nimg >= total
            if self.state.nimg >= next_log or done:
                self.logger.status(self.state.nimg, rank_mean(means), nan_dropped=self.state.nan_dropped,
                                   **self.diagnostics())
                sums, counts = collections.Counter(), collections.Counter()
                next_log += cfg.log_kimg * 1000
            if self.snapshot is not None and self.state.nimg >= next_snap:    # multiples, whatever the resume point
                self.take_snapshot()
                next_snap = (self.state.nimg // self.snapshot_every + 1) * self.snapshot_every
            if self.checkpointer is not None and cfg.checkpoint_kimg > 0 and self.state.nimg >= next_ckpt and not done:
                with self.logger.maintenance():
                    self.save_checkpoint()
                next_ckpt += cfg.checkpoint_kimg * 1000
        if self.checkpointer is not None:
            if self.state.nimg != self.saved_nimg:
                self.save_checkpoint()
            self.checkpointer.close()
        self.averaged.sync()
        self.logger.close()
        return self.state

#----------------------------------------------------------------------------

def check_format(reader) -> None:
    """Checkpoints of cosim-dist before the elastic layout (DeepSpeed's own files, no meta.pt) cannot be read here."""
    if 'meta.pt' not in reader.files:
        raise ConfigError(f'{reader.url} has no meta.pt: it was written by an earlier cosim-dist (DeepSpeed\'s own '
                          f'layout), which cannot resume here; start a new run (run.name=...) or use that version')

def read_meta(reader) -> tuple[dict, Layout]:
    """A checkpoint step's meta.pt and the layout of its state shards (every writer's index)."""
    check_format(reader)
    meta = torch.load(io.BytesIO(reader.read('meta.pt')), map_location='cpu', weights_only=True)
    indexes = [json.loads(reader.read(name)) for name in sorted(reader.files) if name.endswith('.json')
               and name.startswith('shard-')]
    return meta, Layout(indexes)

def open_step_dir(step_dir: pathlib.Path) -> StepReader:
    """A committed checkpoint step directory (local, e.g. <checkpoints>/step-<nimg>) as a StepReader."""
    step_dir = pathlib.Path(step_dir)
    if not (step_dir / 'manifest.json').is_file():
        raise FileNotFoundError(f'{step_dir} is not a committed checkpoint step directory (no manifest.json): pass '
                                f'<checkpoints>/step-<nimg>')
    return StepReader(open_store(step_dir.parent), step_dir.name, json.loads((step_dir / 'manifest.json').read_text()))

def saved_tensors(reader: StepReader, prefix: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, {name: tensor}) of the saved state tensors `<prefix><name>` of a checkpoint (e.g. 'ema/' for the EMA's
    parameters, 'g/' for the generator's master weights and moments), reading only their byte ranges."""
    meta, layout = read_meta(reader)
    tensors = {key[len(prefix):]: layout.tensor(reader.read_range, key) for key in layout.shapes
               if key.startswith(prefix)}
    return meta, tensors

def load_checkpoint_ema(step_dir: pathlib.Path) -> torch.nn.Module:
    """The generator EMA of a training checkpoint step directory (fp32, eval mode, frozen), rebuilt from the
    architecture stored next to it; only the EMA's byte ranges of the state shards are read."""
    meta, params = saved_tensors(open_step_dir(step_dir), 'ema/')
    net = build_network(meta['ema_net']['arch'], **meta['ema_net']['init_kwargs'])
    net.load_state_dict(params | meta['buffers']['ema'])
    return net.float().eval().requires_grad_(False)
