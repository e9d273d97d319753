"""encode_latents: a 2-task job with a tiny random AutoencoderKL, a task killed mid-job, and an idempotent rerun."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from cosim_dist.data import ShardStream
from cosim_dist.latents import latent_scale_bias
from cosim_dist.shards import load_shard, read_manifest, verify_manifest
from cosim_dist.storage import open_store
from cosim_dist.tools.encode_latents import EncodeConfig, encode, run_task
from cosim_dist.tools.make_shards import main as make_shards

REPO = pathlib.Path(__file__).resolve().parents[2]

@pytest.fixture
def pixels(tmp_path) -> str:
    """24 generated 3x32x32 images in 3 classes as 6 pixel shards."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / 'images.npz', x=rng.integers(0, 256, (24, 40, 36, 3), dtype=np.uint8), y=np.arange(24) % 3)
    make_shards(['--source', str(tmp_path / 'images.npz'), '--out', str(tmp_path / 'pixels'), '--resolution', '32',
                 '--samples-per-shard', '4'])
    return str(tmp_path / 'pixels')

def _wait_for(path: pathlib.Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f'encode task exited early with code {proc.returncode}'
        assert time.monotonic() < deadline, f'{path} did not appear within {timeout} s'
        time.sleep(0.05)

@pytest.mark.slow
def test_killed_task_rerun_completes_without_redoing(tmp_path, tiny_vae, pixels):
    out, args = tmp_path / 'latents', ['--source', pixels, '--vae', tiny_vae, '--tasks', '2', '--batch', '3',
                                       '--dtype', 'fp32']
    args += ['--out', str(out)]
    # Task 1 owns shards 1, 3, 5. Make its second input shard a FIFO so that the task blocks there, deterministically
    # after finishing shard 1, and kill it in that state.
    blocked = pathlib.Path(pixels) / 'shard-000003.tar'
    content = blocked.read_bytes()
    blocked.unlink()
    os.mkfifo(blocked)
    proc = subprocess.Popen([sys.executable, '-m', 'cosim_dist.tools.encode_latents', *args, '--task', '1'], cwd=REPO,
                            env=os.environ | {'PYTHONPATH': str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _wait_for(out / '_entries' / 'shard-000001.tar.json', proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    blocked.unlink()
    blocked.write_bytes(content)
    # no manifest, nothing else finished
    assert sorted(p.name for p in out.iterdir()) == ['_entries', 'shard-000001.tar']
    (out / 'shard-000005.tar').write_bytes(b'a shard without an entry, as left by a task killed before writing it')
    before = (out / 'shard-000001.tar').stat()

    results = encode([*args, '--cluster', 'local', '--log-dir', str(tmp_path / 'logs'), '--timeout-min', '10'])
    assert [(r['encoded'], r['skipped']) for r in results] == [(3, 0), (2, 1)] and any(r['manifest'] for r in results)
    after = (out / 'shard-000001.tar').stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns) # not redone

    info, entries = verify_manifest(out)
    scale, bias = latent_scale_bias((5.81, 3.25, 0.12, -2.15), (4.17, 4.62, 3.71, 3.28))
    assert (info.kind, info.resolution, info.channels, info.label_count) == ('latents', 16, 4, 3)
    assert info.latent_scale == scale and info.latent_bias == bias and info.extra['pixel_resolution'] == 32
    assert ([e.samples for e in entries] == [4] * 6
            and np.sum([e.class_hist for e in entries], axis=0).tolist() == [8, 8, 8])

    # The stored moments are those of the VAE posterior for pixels x/255.
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    src, dst = open_store(pixels), open_store(out)
    (px_info, px_entries), (_, lat_entries) = read_manifest(src), read_manifest(dst)
    x = load_shard(src, px_entries[3], px_info)
    z = load_shard(dst, lat_entries[3], info)
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(np.stack([s['x.npy'] for s in x])).float() / 255).latent_dist
    assert [s['__key__'] for s in x] == [s['__key__'] for s in z] and [s['cls'] for s in x] == [s['cls'] for s in z]
    # fp32 encoder with another batch size: every conv sum reassociated, ~u32 sqrt(fan-in) = 1e-6 relative per layer
    # over the tiny VAE's ~10 layers, on values <= 1.7: atol=1e-5 (measured 5e-7; rtol=1e-4 dropped, no rounding bound)
    torch.testing.assert_close(torch.from_numpy(np.stack([s['mean.npy'] for s in z])), dist.mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(np.stack([s['std.npy'] for s in z])), dist.std, rtol=0, atol=1e-5)

    # A further run finds everything done, and the loader serves the latents.
    cfg = EncodeConfig(source=pixels, out=str(out), vae=tiny_vae, tasks=2)
    assert run_task(cfg, 0) | {'seconds': 0} == {'task': 0, 'encoded': 0, 'skipped': 3, 'images': 0, 'seconds': 0,
                                                 'manifest': True}
    x0, c = ShardStream(out, batch_size=6, num_workers=0).next_batch()
    assert x0.shape == (6, 4, 16, 16) and c.shape == (6, 3) and torch.isfinite(x0).all()

def test_config_errors(tmp_path, tiny_vae, pixels):
    with pytest.raises(FileNotFoundError, match='no config.json'):
        EncodeConfig(source=pixels, out=str(tmp_path / 'o'), vae=str(tmp_path))
    with pytest.raises(ValueError, match='--dtype'):
        EncodeConfig(source=pixels, out=str(tmp_path / 'o'), vae=tiny_vae, dtype='bf16')
    with pytest.raises(ValueError, match='4 latent channels but --raw-mean/--raw-std give 2'):
        run_task(EncodeConfig(source=pixels, out=str(tmp_path / 'o'), vae=tiny_vae, raw_mean=(0, 0), raw_std=(1, 1)), 0)
    with pytest.raises(ValueError, match='--task=2'):
        run_task(EncodeConfig(source=pixels, out=str(tmp_path / 'o'), vae=tiny_vae, tasks=2), 2)
