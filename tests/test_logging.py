"""Run logging: the full config in wandb, one wandb run per invocation, the login check, and the console: one
status line per logging interval, no progress bar when stderr is not a terminal."""

import itertools
import json
import os
import pathlib
import struct
import subprocess
import sys

import pytest
import wandb

from cosim_dist import build
from cosim_dist.config import load_config
from cosim_dist.logging import RunLogger

REPO = pathlib.Path(__file__).resolve().parents[1]

LAUNCH = [sys.executable, str(REPO / 'launch.py')]

def offline_run(path):
    """The run record of an offline `.wandb` file (a LevelDB-style log of protobuf records: 32 KiB blocks, 7-byte
    chunk headers crc/length/type; the file opens with a 7-byte `:W&B` header): its id, group, job type, config."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, block, pos, chunk = path.read_bytes(), 32768, 7, b''
    while pos + 7 <= len(data):
        if block - pos % block < 7:                     # block trailer too short for a header: padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack('<HB', data[pos + 4:pos + 7])
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):                              # FULL or LAST chunk: a whole record
            record = pb.Record.FromString(chunk)
            chunk = b''
            if record.WhichOneof('record_type') == 'run':
                run = record.run
                return run.run_id, run.run_group, run.job_type, {i.key: json.loads(i.value_json)
                                                                 for i in run.config.update}
    raise AssertionError(f'no run record in {path}')

def test_wandb_gets_the_full_config_and_a_new_run_per_invocation(tmp_path):
    """Offline wandb keeps the config only in its `.wandb` record log (files/config.yaml is written on sync)."""
    cfg = load_config([f'run.root={tmp_path}', 'run.name=w', 'logging.wandb=offline', 'train.lr_g=3e-4',
                       'loss.lmbda=0.7'])
    build.prepare_run_dir(cfg)
    for _ in range(2):                                  # two invocations of the same run
        build.make_logger(cfg, 'train').close()
    wandb.teardown()                                    # the wandb service has written its record logs
    runs = [offline_run(p) for p in sorted((tmp_path / 'w' / 'wandb').glob('offline-run-*/run-*.wandb'))]
    assert len(runs) == 2 and runs[0][0] != runs[1][0]
    for run_id, group, job_type, config in runs:
        assert run_id.startswith('w-train-') and (group, job_type) == ('w', 'train')
        assert config['train']['lr_g'] == 3e-4 and config['loss']['lmbda'] == 0.7 and config['groups']['model'] == 'toy'
        assert config['run']['overrides'][-1] == 'loss.lmbda=0.7'

def test_online_wandb_without_login_is_a_one_line_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith('WANDB_') and k != 'NETRC'} | {'HOME': str(tmp_path)}
    out = subprocess.run([*LAUNCH, 'logging.wandb=online', f'run.root={tmp_path}'], capture_output=True, text=True,
                         cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, timeout=120)
    assert out.returncode == 2 and 'Traceback' not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == ['error: logging.wandb=online needs a wandb login: run `wandb login` '
                                               '(or set WANDB_API_KEY), or use logging.wandb=offline']
    assert not (tmp_path / 'toy-gmm').exists()          # checked before any work

@pytest.mark.parametrize('progress', ['true', 'false'])
def test_status_lines_once_per_interval_without_a_bar_off_terminal(tmp_path, progress):
    """stderr to a file: exactly kimg / log_kimg status lines, no carriage return, no line twice, every log line
    on its own line."""
    args = [f'run.root={tmp_path}', 'run.name=s', 'task=train', 'pretrain.kimg=0.256', 'pretrain.batch=64',
            'train.kimg=0.512', 'train.batch=32', 'train.log_kimg=0.128', 'train.checkpoint_kimg=0.256',
            'model.net.model_channels=16', 'logging.wandb=disabled', f'logging.progress={progress}']
    with open(tmp_path / 'stderr.txt', 'w') as err:
        out = subprocess.run([*LAUNCH, *args], stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path, timeout=600)
    text = (tmp_path / 'stderr.txt').read_text()
    assert out.returncode == 0, text[-3000:]
    lines = text.splitlines()
    status = [line for line in lines if line.startswith('[cosim_dist] kimg ') and 'loss/gen' in line]
    assert [line.split()[2] for line in status] == ['0.1', '0.3', '0.4', '0.5']     # 0.512 / 0.128 intervals
    assert all(key in status[0] for key in ('loss/aux', 's/kimg', 'img/s', ' GiB', 'eta '))
    assert '\r' not in text and len(set(lines)) == len(lines)
    committed = [line for line in lines if 'checkpoint committed' in line]
    assert len(committed) == 2 and all(line.startswith('[cosim_dist] checkpoint committed') for line in committed)

def test_maintenance_time_is_left_out_of_the_status_rate(tmp_path, monkeypatch):
    # init and start at 0 s, maintenance from 10 s to 40 s, the status line (and its record) at 50 s
    monkeypatch.setattr('cosim_dist.logging.time.time', itertools.chain([0.0, 0.0, 10.0, 40.0],
                                                                        itertools.repeat(50.0)).__next__)
    logger = RunLogger(tmp_path, 'train', {}, wandb_mode='disabled', progress=False)
    logger.start(2000, 0, 'distil')
    with logger.maintenance():
        pass
    logger.status(1000, {'loss/gen': 1.0})
    logger.close()
    record = json.loads((tmp_path / 'train.jsonl').read_text())
    assert record['perf/img_per_s'] == 50.0                  # 1000 images in 50 s - 30 s of maintenance
