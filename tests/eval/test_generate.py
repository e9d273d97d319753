"""`task=generate` on a tiny toy run: the PNGs are the evaluation's images of the same seeds (per-seed inputs, the
Eq. S1 grid and kernel stored with the generator, the evaluation's decoder and PNG writer), the npz holds images,
labels and seeds, a checkpoint's EMA is a generator file, and a missing generator is a one-line error naming the
key."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cosim_dist import cosim, tasks
from cosim_dist.build import noise_range
from cosim_dist.config import load_config
from cosim_dist.eval.decode import pixels_to_uint8
from cosim_dist.eval.real import save_pngs
from cosim_dist.eval.samplers import cosim_spec, seeded_inputs
from cosim_dist.teacher_io import load_snapshot

REPO = pathlib.Path(__file__).resolve().parents[2]

TINY = ['run.device=cpu', 'model.net.model_channels=16', 'pretrain.kimg=0.2', 'pretrain.batch=64', 'train.kimg=0.064',
        'train.batch=32', 'train.checkpoint_kimg=0', 'eval.steps=[1,2]', 'logging.wandb=disabled',
        'logging.progress=false']

@pytest.fixture(scope='module')
def toy_run(tmp_path_factory) -> list[str]:
    """The arguments of a distilled toy run (generator.pt and one checkpoint)."""
    args = [f'run.root={tmp_path_factory.mktemp("runs")}', 'run.name=toy', *TINY]
    tasks.run(load_config(args + ['task=train']))
    return args

def generate(args: list[str], *extra: str) -> pathlib.Path:
    cfg = load_config(args + ['task=generate', *extra])
    tasks.run(cfg)
    return pathlib.Path(cfg.generate.out or cfg.run_dir / 'generated')

def pngs(root: pathlib.Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob('*.png'))}

#----------------------------------------------------------------------------

def test_pngs_are_the_evaluation_images_of_the_seeds(toy_run, tmp_path):
    out = generate(toy_run, 'generate.seeds=3-6,1001', 'generate.steps=2', 'eval.batch=2')
    cfg = load_config(toy_run)
    G, extra = load_snapshot(cfg.run_dir / 'generator.pt')
    grid = cosim.default_grid(2, noise_range(cfg), cfg.eval.grid_scale)
    assert extra['grids'] == {1: cosim.default_grid(1, noise_range(cfg)), 2: grid}      # stored with the generator
    seeds = [3, 4, 5, 6, 1001]
    for batch in (seeds[:2], seeds[2:4], seeds[4:]):      # eval/real.py's pipeline: per-seed inputs, Eq. S1, uint8
        z, c, noise = seeded_inputs(batch, (3, 16, 16), 10, 1, torch.device('cpu'))
        save_pngs(pixels_to_uint8(cosim_spec(G, grid).fn(z, c, noise)), batch, tmp_path / 'ref')
    assert sorted(pngs(out)) == ['000000/000003.png', '000000/000004.png', '000000/000005.png', '000000/000006.png',
                                 '001000/001001.png']
    assert pngs(out) == pngs(tmp_path / 'ref')                                           # byte-identical files
    # an explicit grid wins over the stored one
    other = generate(toy_run, 'generate.seeds=3', 'generate.steps=2', 'generate.grid=[80,0.5]',
                     f'generate.out={tmp_path}/other')
    assert pngs(other)['000000/000003.png'] != pngs(out)['000000/000003.png']

def test_the_generator_samples_with_the_kernel_it_was_trained_with(toy_run, tmp_path):
    """Eq. S1 re-noises with the Eq. K1 kernel of training: a run with kernel.eta=0.5 stores it with generator.pt,
    and task=generate uses it even under a config that says otherwise."""
    args = [f'run.root={tmp_path}', 'run.name=eta', *TINY, 'kernel.eta=0.5']
    tasks.run(load_config(args + ['task=train']))
    cfg = load_config(args)
    G, extra = load_snapshot(cfg.run_dir / 'generator.pt')
    assert extra['eta'] == 0.5
    out = generate(args, 'kernel.eta=1.0', 'generate.seeds=0-1', 'generate.steps=2', f'generate.out={tmp_path}/g')
    z, c, noise = seeded_inputs([0, 1], (3, 16, 16), 10, 1, torch.device('cpu'))
    grid = cosim.default_grid(2, noise_range(cfg), cfg.eval.grid_scale)
    for eta, same in ((0.5, True), (1.0, False)):
        save_pngs(pixels_to_uint8(cosim_spec(G, grid, eta).fn(z, c, noise)), [0, 1], tmp_path / f'ref{eta}')
        assert (pngs(out) == pngs(tmp_path / f'ref{eta}')) == same

def test_npz_holds_images_labels_and_seeds(toy_run, tmp_path):
    out = generate(toy_run, 'generate.seeds=0-4', 'generate.classes=[1,2]', 'generate.npz=true', 'generate.png=false',
                   f'generate.out={tmp_path}/fixed')
    data = np.load(out / 'images.npz')
    assert data['images'].shape == (5, 16, 16, 3) and data['images'].dtype == np.uint8
    assert data['labels'].tolist() == [1, 2, 1, 2, 1] and data['seeds'].tolist() == [0, 1, 2, 3, 4]
    assert not list(out.rglob('*.png')) and not list(out.glob('.images-rank*'))
    own = generate(toy_run, 'generate.seeds=0-4', 'generate.npz=true', f'generate.out={tmp_path}/own')
    data = np.load(own / 'images.npz')                   # default: each seed's own label, images equal to the PNGs
    assert data['labels'].tolist() == seeded_inputs(range(5), (1,), 10, 0, torch.device('cpu'))[1].argmax(1).tolist()
    assert np.array_equal(data['images'][4], np.asarray(Image.open(own / '000000' / '000004.png')))

def test_a_checkpoint_step_directory_is_a_generator(toy_run, tmp_path):
    cfg = load_config(toy_run)
    step = next((cfg.run_dir / 'checkpoints').glob('step-*'))
    from_ckpt = generate(toy_run, f'generate.generator={step}', 'generate.seeds=0-3', 'generate.steps=2',
                         f'generate.out={tmp_path}/ckpt')
    from_snapshot = generate(toy_run, 'generate.seeds=0-3', 'generate.steps=2', f'generate.out={tmp_path}/snap')
    assert len(pngs(from_ckpt)) == 4 and pngs(from_ckpt) == pngs(from_snapshot)      # the final EMA, the same grid

def test_missing_generator_is_a_one_line_error(toy_run, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        generate(toy_run, f'generate.generator={tmp_path}/none.pt')
    assert '\n' not in str(err.value) and 'generate.generator=PATH' in str(err.value)
    assert f'{tmp_path}/none.pt does not exist' in str(err.value)

@pytest.mark.slow
def test_two_ranks_write_the_files_of_one(toy_run, tmp_path):
    one = generate(toy_run, 'generate.seeds=0-4', 'generate.npz=true', 'eval.batch=1', f'generate.out={tmp_path}/one')
    out = subprocess.run([sys.executable, str(REPO / 'launch.py'), '--nproc=2', *toy_run, 'task=generate',
                          'generate.seeds=0-4', 'generate.npz=true', 'eval.batch=1', f'generate.out={tmp_path}/two'],
                         capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert out.returncode == 0, out.stderr[-3000:]
    two = tmp_path / 'two'                               # seeds 0-2 on rank 0, 3-4 on rank 1; rank 0 joins the npz
    assert pngs(two) == pngs(one) and sorted(p.name for p in two.iterdir()) == ['000000', 'images.npz']
    assert (two / 'images.npz').read_bytes() == (one / 'images.npz').read_bytes()
