"""The Trainer on its own (Eq. L1): real tiny networks and TorchEngines, but an in-memory data stream and a
recording checkpointer instead of the full composition of build.build_trainer (see test_trainer.py)."""

import json
import pathlib
import shutil

import pytest
import torch

from cosim_dist import cosim
from cosim_dist.checkpoint import StepReader
from cosim_dist.config import Config, ConfigError, KernelConfig, LossConfig, TrainConfig
from cosim_dist.engines import TorchEngine
from cosim_dist.logging import RunLogger
from cosim_dist.nets import build_network
from cosim_dist.nets.aux import make_auxiliary
from cosim_dist.resume import resume_fingerprint
from cosim_dist.storage import LocalStore, sha256_file
from cosim_dist.trainer import Trainer

RES, CH, LABELS, BATCH = 8, 3, 2, 4
ITERS = 6                                               # train.kimg = ITERS * BATCH / 1000

class CounterStream:
    """Deterministic batches drawn from the call counter, which is the whole state; rows in `nan_rows` are NaN."""

    def __init__(self, batch: int, nan_rows: tuple[int, ...] = ()) -> None:
        self.batch, self.nan_rows, self.count = batch, nan_rows, 0

    def next_batch(self):
        gen = torch.Generator().manual_seed(1000 + self.count)
        x = 0.5 * torch.randn(self.batch, CH, RES, RES, generator=gen)
        x[list(self.nan_rows)] = float('nan')
        c = torch.nn.functional.one_hot(torch.randint(LABELS, (self.batch,), generator=gen), LABELS).float()
        self.count += 1
        return x, c

    def state_dict(self) -> dict:
        return {'count': self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state['count']

class RecordingCheckpointer:
    """Checkpointer protocol on tmp_path: records calls; commit checks both engines wrote; latest() is `resume`."""

    def __init__(self, root: pathlib.Path, resume: pathlib.Path | None = None) -> None:
        self.root, self.resume, self.calls, self.commits = root, resume, [], {}

    def latest(self):
        """The `resume` directory as a committed step (a manifest of its files, as CheckpointManager writes one)."""
        if self.resume is None:
            return None
        files = [{'key': f'{self.resume.name}/{f.relative_to(self.resume).as_posix()}', 'size': f.stat().st_size,
                  'sha256': sha256_file(f)} for f in sorted(self.resume.rglob('*')) if f.is_file()]
        return StepReader(LocalStore(self.resume.parent), self.resume.name, {'nimg': 0, 'files': files})

    def retire(self, nimg, why):
        raise AssertionError(f'a recorded checkpoint was unusable: {why}')

    def stage(self, nimg):
        assert nimg not in self.commits, f'step {nimg} staged again after its commit'
        self.calls.append(('stage', nimg))
        path = self.root / 'stage' / str(nimg)
        path.mkdir(parents=True)
        return path

    def commit(self, nimg, digests):
        self.calls.append(('commit', nimg))
        staged = self.root / 'stage' / str(nimg)
        assert (staged / 'meta.pt').is_file() and (staged / 'shard-00000-of-00001.bin').is_file()
        assert digests == {'shard-00000-of-00001.bin': sha256_file(staged / 'shard-00000-of-00001.bin')}
        self.commits[nimg] = self.root / 'commits' / str(nimg)
        shutil.move(staged, self.commits[nimg])

    def close(self):
        self.calls.append(('close',))

def tiny_net(seed: int):
    torch.manual_seed(seed)
    return build_network('toy', img_resolution=RES, img_channels=CH, label_dim=LABELS, model_channels=8,
                         channel_mult=[1])

def make_trainer(tmp_path: pathlib.Path, name: str, *, init_seed: int = 1, lmbda: float = 1.0, batch_gpu: int = BATCH,
                 checkpoint_kimg: float = 0.008, stream: CounterStream | None = None, aux_warmup_kimg: float = 0.0,
                 **kwargs) -> Trainer:
    """A Trainer over a fixed teacher (seed 0) and a generator / auxiliary initialised from `init_seed`."""
    (tmp_path / name).mkdir(parents=True, exist_ok=True)
    teacher = tiny_net(0).eval().requires_grad_(False)
    G = tiny_net(init_seed)
    aux = make_auxiliary(G, 'gated').requires_grad_(True)
    train = TrainConfig(kimg=ITERS * BATCH / 1000, batch=BATCH, batch_gpu=batch_gpu, lr_g=1e-3, lr_aux=1e-3,
                        ema_halflife_kimg=0.01, log_kimg=0.008, checkpoint_kimg=checkpoint_kimg,
                        aux_warmup_kimg=aux_warmup_kimg)
    cfg = Config(loss=LossConfig(lmbda=lmbda), train=train)
    rounds, sc = BATCH // batch_gpu, cfg.schedule
    schedule = cosim.TimeSchedule(ratio=sc.ratio, r_lo=sc.r_lo, sigma_s_max=sc.sigma_s_max, kind='rho',
                                  noise=cosim.NoiseRange(sigma_min=sc.sigma_min, sigma_max=sc.sigma_max, rho=sc.rho))
    engine = lambda net, lr: TorchEngine(net, lr, (train.beta1, train.beta2), train.eps, accum=rounds)
    kwargs.setdefault('checkpointer', RecordingCheckpointer(tmp_path / name))
    return Trainer(teacher=teacher, g_engine=engine(G, train.lr_g), aux_engine=engine(aux, train.lr_aux),
                   data=stream or CounterStream(batch_gpu), schedule=schedule, train=train, loss=cfg.loss,
                   kernel=KernelConfig(), sigma_data=0.5, seed=0, device=torch.device('cpu'), batch_gpu=batch_gpu,
                   logger=RunLogger(tmp_path / name, 'train', {}, wandb_mode='disabled', progress=False),
                   fingerprint=resume_fingerprint(cfg), **kwargs)

def flat(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])

def stop_after(k: int):
    calls = iter(range(10**6))
    return lambda: next(calls) >= k

#----------------------------------------------------------------------------

def test_train_runs_to_kimg_with_periodic_and_final_checkpoints(tmp_path):
    """kimg*1000/batch iterations (2 rounds x (aux + gen) batches each), nimg steps by the batch, a checkpoint every
    checkpoint_kimg and one at the end, close() last; a fresh Trainer can load the final checkpoint."""
    trainer = make_trainer(tmp_path, 'run', batch_gpu=BATCH // 2)
    state = trainer.train()
    assert state.nimg == ITERS * BATCH and trainer.data.count == ITERS * 2 * 2
    ckpt = trainer.checkpointer
    assert ckpt.calls == [(op, n) for n in (8, 16, 24) for op in ('stage', 'commit')] + [('close',)]
    logged = [json.loads(line) for line in (tmp_path / 'run' / 'train.jsonl').read_text().splitlines()]
    assert [r['nimg'] for r in logged] == [8, 16, 24] and all(r['nan_dropped'] == 0 for r in logged)
    meta = torch.load(ckpt.commits[24] / 'meta.pt', weights_only=True)
    assert meta['state'] == {'nimg': 24, 'nan_dropped': 0} and meta['data'] == {'count': 24}
    fresh = make_trainer(tmp_path, 'load', init_seed=2, batch_gpu=BATCH // 2,
                         checkpointer=RecordingCheckpointer(tmp_path / 'load', resume=ckpt.commits[24]))
    assert fresh.load_checkpoint() and fresh.state == state and fresh.data.count == 24
    for a, b in ((trainer.g.module, fresh.g.module), (trainer.aux.module, fresh.aux.module), (trainer.ema, fresh.ema)):
        assert torch.equal(flat(a), flat(b))

def test_should_stop_saves_at_the_step_boundary_and_returns_early(tmp_path):
    """A stop request after 3 iterations: train() returns at 3 batches (< total) after saving exactly there."""
    trainer = make_trainer(tmp_path, 'run', checkpoint_kimg=0, should_stop=stop_after(3))
    state = trainer.train()
    assert state.nimg == 3 * BATCH < ITERS * BATCH and trainer.data.count == 3 * 2
    assert trainer.checkpointer.calls == [('stage', 12), ('commit', 12), ('close',)]

def test_resume_restores_stream_and_matches_an_uninterrupted_run(tmp_path):
    """Stop at 3 iterations, resume into differently initialised networks: the stream counter and nimg come back,
    and the finished run equals an uninterrupted one bit for bit (G, aux, EMA)."""
    straight = make_trainer(tmp_path, 'straight')
    straight.train()
    first = make_trainer(tmp_path, 'first', checkpoint_kimg=0, should_stop=stop_after(3))
    first.train()
    resumed = make_trainer(tmp_path, 'second', init_seed=2,
                           checkpointer=RecordingCheckpointer(tmp_path / 'second',
                                                              resume=first.checkpointer.commits[12]))
    assert resumed.load_checkpoint() and resumed.state.nimg == 12 and resumed.data.count == 6
    assert resumed.train().nimg == ITERS * BATCH and resumed.data.count == straight.data.count
    calls = resumed.checkpointer.calls                 # (the checkpoint interval restarts at the resume point)
    assert calls[-3:] == [('stage', 24), ('commit', 24), ('close',)] and all(nimg > 12 for _, nimg in calls[:-1])
    for a, b in ((straight.g.module, resumed.g.module), (straight.aux.module, resumed.aux.module),
                 (straight.ema, resumed.ema)):
        assert torch.equal(flat(a), flat(b))

def test_generator_and_auxiliary_steps_touch_only_their_own_network(tmp_path):
    """The generator step moves G but leaves no gradient in (and no change to) the auxiliary, which is trainable
    again afterwards; the auxiliary step moves the auxiliary but not G; the teacher never moves."""
    trainer = make_trainer(tmp_path, 'run')
    G, aux, gen = trainer.g.module, trainer.aux.module, torch.Generator().manual_seed(0)
    g0, aux0, teacher0 = flat(G), flat(aux), flat(trainer.teacher)
    trainer.generator_step(gen)
    assert all(p.grad is None or not p.grad.any() for p in aux.parameters())
    assert all(p.requires_grad for p in aux.parameters()) and torch.equal(aux0, flat(aux))
    g1 = flat(G)
    assert not torch.equal(g0, g1)
    trainer.aux_step(gen)
    assert torch.equal(g1, flat(G)) and not torch.equal(aux0, flat(aux))
    assert all(p.grad is None or not p.grad.any() for p in G.parameters())
    assert torch.equal(teacher0, flat(trainer.teacher))

def test_auxiliary_warmup_moves_only_the_auxiliary_then_the_generator_trains(tmp_path):
    """train.aux_warmup_kimg = 2 iterations: G and its EMA stay at their initial values while the auxiliary moves and
    no generator loss is logged; after the warm-up the generator step runs and is logged; the run still ends at kimg."""
    trainer = make_trainer(tmp_path, 'run', checkpoint_kimg=0, aux_warmup_kimg=2 * BATCH / 1000)
    g0, ema0, aux0 = flat(trainer.g.module), flat(trainer.ema), flat(trainer.aux.module)
    assert trainer.iteration().keys() == trainer.iteration().keys() == {'loss/aux'}
    assert torch.equal(g0, flat(trainer.g.module)) and torch.equal(ema0, flat(trainer.ema))
    assert not torch.equal(aux0, flat(trainer.aux.module))
    assert trainer.iteration().keys() == {'loss/aux', 'loss/gen'} and not torch.equal(g0, flat(trainer.g.module))
    assert not torch.equal(ema0, flat(trainer.ema))
    logged = make_trainer(tmp_path, 'log', checkpoint_kimg=0, aux_warmup_kimg=2 * BATCH / 1000)
    assert logged.train().nimg == ITERS * BATCH
    rows = [json.loads(line) for line in (tmp_path / 'log' / 'train.jsonl').read_text().splitlines()]
    assert ['loss/gen' in r for r in rows] == [False, True, True] and all('loss/aux' in r for r in rows)

def test_nan_samples_are_dropped_counted_and_parameters_stay_finite(tmp_path):
    """One NaN row per batch: every step still runs (the auxiliary learns), nan_dropped counts one per batch,
    the count is logged, and G, aux and the EMA stay finite."""
    trainer = make_trainer(tmp_path, 'run', stream=CounterStream(BATCH, nan_rows=(1,)))
    aux0 = flat(trainer.aux.module)
    state = trainer.train()
    assert state.nimg == ITERS * BATCH and state.nan_dropped == ITERS * 2
    logged = [json.loads(line) for line in (tmp_path / 'run' / 'train.jsonl').read_text().splitlines()]
    assert logged[-1]['nan_dropped'] == ITERS * 2 and all(map(torch.isfinite, map(torch.tensor, logged[-1].values())))
    assert all(torch.isfinite(flat(net)).all() for net in (trainer.g.module, trainer.aux.module, trainer.ema))
    assert not torch.equal(aux0, flat(trainer.aux.module))

def test_a_nan_sample_does_not_freeze_the_generator(tmp_path):
    """Dropping one NaN sample of four leaves the other three to train G: the generator step moves G."""
    trainer = make_trainer(tmp_path, 'run', stream=CounterStream(BATCH, nan_rows=(1,)))
    g0 = flat(trainer.g.module)
    trainer.generator_step(torch.Generator().manual_seed(0))
    assert trainer.state.nan_dropped == 1 and not torch.equal(g0, flat(trainer.g.module))

def test_resume_with_a_different_config_names_the_key(tmp_path):
    """A checkpoint written with loss.lmbda=1 refuses a resume with loss.lmbda=2, naming the key and both values."""
    first = make_trainer(tmp_path, 'first', checkpoint_kimg=0, should_stop=stop_after(1))
    first.train()
    changed = make_trainer(tmp_path, 'second', lmbda=2.0,
                           checkpointer=RecordingCheckpointer(tmp_path / 'second',
                                                              resume=first.checkpointer.commits[4]))
    with pytest.raises(ConfigError, match=r'loss\.lmbda: 1\.0 in the checkpoint, 2\.0 now'):
        changed.train()
    assert changed.checkpointer.calls == []

def test_a_checkpoint_of_the_old_layout_is_an_error_not_retired(tmp_path):
    """A commit without meta.pt (DeepSpeed's own files, before the elastic layout) stops the resume with a one-line
    error; it is not retired (RecordingCheckpointer.retire fails the test), so the old run's files stay intact."""
    old = tmp_path / 'old' / 'step'
    (old / 'g').mkdir(parents=True)
    (old / 'g' / 'engine.pt').write_bytes(b'old layout')
    trainer = make_trainer(tmp_path, 'run', checkpointer=RecordingCheckpointer(tmp_path / 'run', resume=old))
    with pytest.raises(ConfigError, match='has no meta.pt: it was written by an earlier cosim-dist'):
        trainer.load_checkpoint()
