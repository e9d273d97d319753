"""Object-store faults between boto3 and a real S3 endpoint (SeaweedFS on 127.0.0.1), injected by a proxy:
5xx, SlowDown, connection resets before and after the store applied a request, truncated replies. Requests are
retried; a checkpoint is committed only when whole, and only whole checkpoints are ever loaded."""

import os
import random
import signal
import uuid

import fault_harness as h
import pytest
from fault_proxy import FaultPlan, FaultProxy
from fault_report import Trial, trials

from cosim_dist.checkpoint import CheckpointManager, step_prefix
from cosim_dist.storage import StorageConfig, open_store

pytestmark = [pytest.mark.s3, pytest.mark.slow]

def put_step(ck: CheckpointManager, nimg: int) -> bytes:
    payload = os.urandom(300_000)
    (ck.stage(nimg) / 'weights.bin').write_bytes(payload)
    ck.commit(nimg)
    ck.wait()
    return payload

def test_training_through_a_faulty_store(s3_env, fault_root, reference, record):
    """Training checkpoints through the proxy (random faults on every request), kill -9 while an upload is in
    flight, resume through the proxy: the final state equals the uninterrupted run's."""
    rng, direct = random.Random(5), StorageConfig(endpoint_url=s3_env.endpoint_url)
    for trial in range(trials(1, share=0.5)):
        url = f's3://{s3_env.bucket}/faults-{uuid.uuid4().hex[:8]}'
        plan = FaultPlan(rate=rng.uniform(0.05, 0.15), seed=trial, delay_put=0.05)
        with FaultProxy(s3_env.endpoint_url, plan) as proxy:
            store = open_store(url, direct)
            hits, final = h.chain(fault_root, f's3-{trial}', 1, signal.SIGKILL,
                                  lambda done: ('upload', h.in_upload(store), rng.randrange(3)),
                                  extra=lambda: [f'storage.endpoint_url={proxy.url}',
                                                 f'checkpoint.async_upload={rng.random() < 0.5}'],
                                  url=url, storage=direct)
            rc = final.wait()
        diff = h.differences(h.final_state(final.dir, url, direct), reference) if rc == 0 else ['did not finish']
        lost = any(x.lost for x in hits) or bool(diff)
        ok = rc == 0 and all(x.resumed_ok for x in hits) and not lost and proxy.injected() > 0
        record(Trial('S3 5xx/SlowDown/resets in training, kill -9 mid-upload', ok, lost, f'{dict(proxy.counts)}'))
        assert ok, (final.output()[-3000:], [(x.steps, x.bad, x.resumed_ok) for x in hits], diff[:5], proxy.counts)

def test_lost_replies_truncated_reads_and_exhausted_retries(s3_env, tmp_path, record):
    """A COMMIT whose reply is lost is still a commit; truncated or reset downloads are retried and verified; when
    retries run out, the step is not committed, the error names it, and the previous commit stays loadable."""
    rng = random.Random(7)
    for trial in range(trials(1)):
        url, work = f's3://{s3_env.bucket}/retries-{uuid.uuid4().hex[:8]}', tmp_path / str(trial)
        commit_put = lambda method, path: method == 'PUT' and path.split('?')[0].endswith('/COMMIT')
        with FaultProxy(s3_env.endpoint_url, FaultPlan(only=commit_put, blackout='reset-after', limit=1)) as proxy:
            ck = CheckpointManager(url, work / 'a', async_upload=False, storage=StorageConfig(endpoint_url=proxy.url))
            try:
                first, ok = put_step(ck, 1), True
            except RuntimeError:
                first, ok = None, False
            record(Trial('S3 reply lost after COMMIT was stored', ok and ck.committed() == [1]))
            assert ok and ck.committed() == [1]

        reads = lambda method, path: method in ('GET', 'HEAD')
        with FaultProxy(s3_env.endpoint_url,
                        FaultPlan(rate=0.5, kinds=('truncate', 'reset', '500'), seed=trial, only=reads)) as proxy:
            path = CheckpointManager(url, work / 'b', storage=StorageConfig(endpoint_url=proxy.url)).latest()
            ok = (path is not None and path.read('weights.bin') == first
                  and path.read_range('weights.bin', 7, 5000) == first[7:5000])
            record(Trial('S3 truncated/reset downloads', ok, not ok, f'{dict(proxy.counts)}'))
            assert ok, proxy.counts

        kind = rng.choice(('500', '503', 'reset', 'reset-after'))
        puts = lambda method, path: method == 'PUT'
        with FaultProxy(s3_env.endpoint_url, FaultPlan(only=puts, blackout=kind)) as proxy:
            ck = CheckpointManager(url, work / 'c', async_upload=rng.random() < 0.5,
                                   storage=StorageConfig(endpoint_url=proxy.url, max_attempts=2))
            with pytest.raises(RuntimeError, match=rf'{step_prefix(2)} was not committed: rank 0: ') as err:
                put_step(ck, 2)
        steps, bad = h.commits(url, StorageConfig(endpoint_url=s3_env.endpoint_url))
        restored = CheckpointManager(url, work / 'd', storage=StorageConfig(endpoint_url=s3_env.endpoint_url)).latest()
        ok = steps == [1] and not bad and restored.read('weights.bin') == first
        record(Trial('S3 retries exhausted (every PUT fails)', ok, not ok, f'{kind}: {str(err.value)[:120]}'))
        assert ok, (steps, bad)
