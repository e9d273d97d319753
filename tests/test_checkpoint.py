"""CheckpointManager over a local directory and a real S3 endpoint (SeaweedFS on 127.0.0.1)."""

import json

import pytest
import torch

from cosim_dist import build
from cosim_dist.checkpoint import CheckpointManager, step_prefix
from cosim_dist.config import load_config
from cosim_dist.elastic import CorruptState

def write_step(ck: CheckpointManager, nimg: int, payload: bytes) -> None:
    path = ck.stage(nimg)
    (path / 'g').mkdir()
    (path / 'g' / 'weights.bin').write_bytes(payload)
    (path / 'client.json').write_text(json.dumps({'nimg': nimg}))
    ck.commit(nimg)

def first_readable(ck: CheckpointManager, name: str) -> tuple[str, bytes]:
    """What the trainer does on resume: the newest commit whose file reads verified; unusable ones are retired."""
    while (reader := ck.latest()) is not None:
        try:
            return reader.prefix, reader.read(name)
        except CorruptState as e:
            ck.retire(reader.nimg, str(e))
    raise AssertionError('no usable commit')

@pytest.fixture(params=['local', pytest.param('s3', marks=pytest.mark.s3)])
def store_url(request, tmp_path):
    if request.param == 'local':
        return str(tmp_path / 'store')
    ep = request.getfixturevalue('s3_env')
    return f's3://{ep.bucket}/ckpt-{tmp_path.name}'

def test_commit_resume_retention(store_url, tmp_path):
    ck = CheckpointManager(store_url, tmp_path / 'staging', keep=2)
    for nimg in (100, 200, 300):
        write_step(ck, nimg, bytes([nimg % 256]) * 5000)
    ck.close()
    assert ck.committed() == [200, 300]
    assert not any(k.startswith(step_prefix(100)) for k in ck.store.list('step-'))
    reader = CheckpointManager(store_url, tmp_path / 'other').latest()
    assert reader.read('g/weights.bin') == bytes([300 % 256]) * 5000
    assert reader.read_range('g/weights.bin', 10, 20) == bytes([300 % 256]) * 10
    assert reader.bytes_read == 5010                            # a ranged read fetches only its bytes

def test_flipped_byte_falls_back_and_half_upload_is_ignored(store_url, tmp_path):
    ck = CheckpointManager(store_url, tmp_path / 'staging', keep=3, async_upload=False)
    write_step(ck, 1, b'a' * 4096)
    write_step(ck, 2, b'b' * 4096)
    key = f'{step_prefix(2)}/g/weights.bin'
    data = bytearray(ck.store.read(key))
    data[100] ^= 0x01
    ck.store.put_bytes(bytes(data), key)                        # silent corruption in the store
    ck.store.put_bytes(b'partial', f'{step_prefix(3)}/g/weights.bin')   # killed before its COMMIT
    reader = CheckpointManager(store_url, tmp_path / 'reader', keep=1)
    assert first_readable(reader, 'g/weights.bin') == (step_prefix(1), b'a' * 4096)
    assert reader.resumed == step_prefix(1)
    write_step(reader, 4, b'd' * 10)                            # retention never drops the resumed commit
    reader.close()
    assert reader.committed() == [1, 4] and not reader.store.exists(f'{step_prefix(3)}/g/weights.bin')

def test_unusable_commit_is_retired_and_written_again(tmp_path):
    """Resume skips a damaged newest commit and removes its COMMIT, so that training can commit that step again."""
    ck = CheckpointManager(str(tmp_path / 'store'), tmp_path / 'staging', async_upload=False)
    write_step(ck, 1, b'a' * 100)
    write_step(ck, 2, b'b' * 100)
    ck.store.put_bytes(b'b' * 99, f'{step_prefix(2)}/g/weights.bin')
    reader = CheckpointManager(ck.store.url, tmp_path / 'reader', async_upload=False)
    assert first_readable(reader, 'g/weights.bin')[0] == step_prefix(1) and reader.committed() == [1]
    write_step(reader, 2, b'c' * 100)
    assert reader.committed() == [1, 2] and reader.latest().prefix == step_prefix(2)

def test_committed_steps_are_immutable(tmp_path):
    ck = CheckpointManager(str(tmp_path / 'store'), tmp_path / 'staging', async_upload=False)
    write_step(ck, 5, b'x')
    with pytest.raises(FileExistsError, match='already committed'):
        ck.stage(5)
    assert not ck.store.create(b'again', f'{step_prefix(5)}/COMMIT')

@pytest.mark.s3
def test_trainer_resumes_from_s3(s3_env, tmp_path):
    """The toy trainer checkpoints to the S3 endpoint; a fresh trainer resumes from it exactly."""
    url = f's3://{s3_env.bucket}/run-{tmp_path.name}'
    args = [f'run.root={tmp_path}', 'train.kimg=0.128', 'train.batch=32', 'train.checkpoint_kimg=0.064',
            'logging.wandb=disabled', 'logging.progress=false', 'model.net.model_channels=16', f'checkpoint.url={url}']
    cfg = load_config(args)
    build.prepare_run_dir(cfg)
    torch.manual_seed(0)
    teacher = build.new_network(cfg).eval().requires_grad_(False)
    first = build.build_trainer(cfg, teacher, torch.device('cpu'))
    steps = iter(range(100))
    first.should_stop = lambda: next(steps) >= 2
    first.train()
    second = build.build_trainer(cfg, teacher, torch.device('cpu'))
    second.train()
    straight = build.build_trainer(load_config(args + [f'checkpoint.url={tmp_path}/straight']), teacher,
                                   torch.device('cpu'))
    straight.train()
    for a, b in zip(second.ema.parameters(), straight.ema.parameters()):
        assert torch.equal(a, b)
