"""The CoSIM distillation loop (ALGORITHM.md Eq. L1). It receives built components and knows nothing of
launchers, Slurm or object storage; `should_stop()` is the preemption seam checked at step boundaries."""

import copy
import dataclasses
import time
from typing import Callable, Protocol

import torch

from . import cosim
from .config import KernelConfig, LossConfig, TrainConfig
from .logging import RunLogger, log

class BatchStream(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...

class Checkpointer(Protocol):
    def save(self, nimg: int, state: dict) -> None: ...
    def load_latest(self) -> dict | None: ...

def step_generator(seed: int, rank: int, nimg: int, device: torch.device) -> torch.Generator:
    """Per-step RNG derived from (seed, rank, images seen), so resume replays the exact noise (EDM2 style)."""
    return torch.Generator(device).manual_seed(hash((seed, rank, nimg)) & 0x7fff_ffff_ffff)

def finite_rows(*xs: torch.Tensor) -> torch.Tensor:
    """Mask [N] of samples whose tensors are all finite (NaN samples are dropped and counted, Eq. L1)."""
    ok = torch.ones(xs[0].shape[0], dtype=torch.bool, device=xs[0].device)
    for x in xs:
        ok &= torch.isfinite(x.flatten(1)).all(1)
    return ok

@dataclasses.dataclass
class TrainState:
    nimg: int = 0           # generator-step images seen
    nan_dropped: int = 0    # samples dropped for NaN/Inf

#----------------------------------------------------------------------------

class Trainer:
    """Eq. L1: alternating auxiliary (Eq. A1) and generator (Eq. G1) steps, then the generator EMA."""

    def __init__(self, *, teacher: torch.nn.Module, g_engine, aux_engine, data: BatchStream,
                 schedule: cosim.TimeSchedule, train: TrainConfig, loss: LossConfig, kernel: KernelConfig,
                 sigma_data: float, seed: int, logger: RunLogger, checkpointer: Checkpointer | None = None,
                 checkpoint_kimg: float = 0.0, should_stop: Callable[[], bool] = lambda: False,
                 rank: int = 0, world_size: int = 1, batch_gpu: int | None = None) -> None:
        self.teacher, self.g, self.aux, self.data = teacher, g_engine, aux_engine, data
        self.schedule, self.train_cfg, self.loss_cfg, self.kernel_cfg = schedule, train, loss, kernel
        self.sigma_data, self.seed, self.logger = sigma_data, seed, logger
        self.checkpointer, self.checkpoint_kimg, self.should_stop = checkpointer, checkpoint_kimg, should_stop
        self.rank, self.world_size = rank, world_size
        self.batch_gpu = batch_gpu or train.batch // world_size
        self.rounds = train.batch // (self.batch_gpu * world_size)
        self.alpha = cosim.generator_alpha(loss.lmbda, loss.alpha)
        self.ema = copy.deepcopy(self.g.module).eval().requires_grad_(False)
        self.state = TrainState()
        self.device = next(self.g.module.parameters()).device

    #------------------------------------------------------------------------
    # Checkpoint state: both engines, EMA, data counter, progress.

    def state_dict(self) -> dict:
        return {'state': dataclasses.asdict(self.state), 'g': self.g.state_dict(), 'aux': self.aux.state_dict(),
                'ema': self.ema.state_dict(), 'data': self.data.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.state = TrainState(**sd['state'])
        self.g.load_state_dict(sd['g'])
        self.aux.load_state_dict(sd['aux'])
        self.ema.load_state_dict(sd['ema'])
        self.data.load_state_dict(sd['data'])

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x0, c = self.data.next_batch()
        return x0.to(self.device, non_blocking=True), c.to(self.device, non_blocking=True)

    def _labels(self, c: torch.Tensor) -> torch.Tensor | None:
        return c if c.shape[1] else None

    #------------------------------------------------------------------------
    # Eq. L1 step 1: auxiliary update on a real batch, generator output detached.

    def aux_step(self, gen: torch.Generator) -> float:
        G, aux, total = self.g.module, self.aux.module, 0.0
        G.eval()
        aux.train()
        for _ in range(self.rounds):
            x0, c = self._batch()
            s, t = self.schedule.sample(x0.shape[0], gen, self.device)
            with torch.no_grad():
                ks = cosim.transition_kernel(G, x0, self._labels(c), s, t, self.kernel_cfg.eta, gen)
                D_phi = self.teacher(ks.x_s, s, self._labels(c))
            ok = finite_rows(ks.x_s, D_phi)
            self.state.nan_dropped += int((~ok).sum())
            out = aux(ks.x_s[ok], s[ok], self._labels(c[ok]), sigma_t=t[ok], return_logvar=aux.has_logvar)
            D_psi, logvar = out if aux.has_logvar else (out, None)
            loss = cosim.aux_loss(D_psi, ks.target[ok], D_phi[ok], s[ok], self.loss_cfg.lmbda, self.sigma_data, logvar)
            self.aux.backward(loss / self.rounds)
            total += loss.item() / self.rounds
        self.aux.step()
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
                x0, c = self._batch()
                s, t = self.schedule.sample(x0.shape[0], gen, self.device)
                ks = cosim.transition_kernel(G, x0, self._labels(c), s, t, self.kernel_cfg.eta, gen)
                D_phi = self.teacher(ks.x_s, s, self._labels(c))
                D_psi = aux(ks.x_s, s, self._labels(c), sigma_t=t)
                ok = finite_rows(ks.x_s, D_phi, D_psi)
                self.state.nan_dropped += int((~ok).sum())
                loss = cosim.generator_loss(ks.target[ok], D_phi[ok], D_psi[ok], self.alpha, self.loss_cfg.gen_scale)
                self.g.backward(loss / self.rounds)
                total += loss.item() / self.rounds
            self.g.step()
        finally:
            aux.requires_grad_(True)
        return total

    #------------------------------------------------------------------------

    def train(self) -> TrainState:
        """Run (or resume) until train.kimg; returns the final state. Stops early if should_stop()."""
        cfg = self.train_cfg
        if self.checkpointer is not None and (sd := self.checkpointer.load_latest()) is not None:
            self.load_state_dict(sd)
            log.info(f'resumed at {self.state.nimg / 1000:.1f} kimg')
        total, batch = int(cfg.kimg * 1000), cfg.batch
        self.logger.start(total, min(self.state.nimg, total), 'distil')
        next_log = self.state.nimg + cfg.log_kimg * 1000
        next_ckpt = self.state.nimg + self.checkpoint_kimg * 1000
        sums, count, t0 = {'loss/aux': 0.0, 'loss/gen': 0.0}, 0, time.time()
        while self.state.nimg < total and not self.should_stop():
            gen = step_generator(self.seed, self.rank, self.state.nimg, self.device)
            for _ in range(cfg.aux_steps_per_gen):
                sums['loss/aux'] += self.aux_step(gen) / cfg.aux_steps_per_gen
            sums['loss/gen'] += self.generator_step(gen)
            self.state.nimg += batch
            beta = cosim.ema_beta(batch, self.state.nimg, cfg.ema_halflife_kimg, cfg.ema_rampup)
            cosim.ema_update(self.ema, self.g.module, beta)
            count += 1
            self.logger.advance(batch, aux=sums['loss/aux'] / count, gen=sums['loss/gen'] / count)
            done = self.state.nimg >= total
            if self.state.nimg >= next_log or done:
                rate = count * batch / (time.time() - t0)
                self.logger.scalars(self.state.nimg, {k: v / count for k, v in sums.items()}
                                    | {'perf/img_per_s': rate, 'nan_dropped': self.state.nan_dropped})
                sums, count, t0 = dict.fromkeys(sums, 0.0), 0, time.time()
                next_log += cfg.log_kimg * 1000
            if self.checkpointer is not None and self.checkpoint_kimg > 0 and (self.state.nimg >= next_ckpt or done):
                self.checkpointer.save(self.state.nimg, self.state_dict())
                next_ckpt += self.checkpoint_kimg * 1000
        if self.checkpointer is not None and self.state.nimg < total:
            self.checkpointer.save(self.state.nimg, self.state_dict())
        self.logger.close()
        return self.state
