"""Object stores: the same contract on local directories and on a real S3 endpoint (SeaweedFS on 127.0.0.1)."""

import os
import pickle
import uuid

import pytest

from cosim_dist.storage import S3Store, StorageConfig, fetch_to_local, missing_local, open_store, parse_url

@pytest.fixture(params=['local', pytest.param('s3', marks=pytest.mark.s3)])
def store(request, tmp_path):
    if request.param == 'local':
        return open_store(tmp_path / 'root')
    ep = request.getfixturevalue('s3_env')
    return open_store(f's3://{ep.bucket}/{uuid.uuid4().hex}/root')

def test_roundtrip(store, tmp_path):
    store.put_bytes(b'hello', 'a/x.bin')
    (tmp_path / 'f.bin').write_bytes(b'world' * 1000)
    store.put_file(tmp_path / 'f.bin', 'a/b/y.bin')
    store.put_bytes(b'', 'z.bin')
    assert store.read('a/x.bin') == b'hello'
    with store.open('a/b/y.bin') as f:
        assert f.read() == b'world' * 1000
    store.get_file('a/b/y.bin', tmp_path / 'out' / 'y.bin')
    assert (tmp_path / 'out' / 'y.bin').read_bytes() == b'world' * 1000
    assert store.list() == ['a/b/y.bin', 'a/x.bin', 'z.bin']
    assert store.list('a/b') == ['a/b/y.bin']
    assert store.exists('a/x.bin') and not store.exists('a') and not store.exists('nope')
    store.delete('a/x.bin')
    store.delete('a/x.bin') # deleting a missing key is no error
    assert store.list('a/') == ['a/b/y.bin']

def test_missing_keys_raise_file_not_found(store, tmp_path):
    for call in (lambda: store.read('nope'), lambda: store.open('nope'),
                 lambda: store.get_file('nope', tmp_path / 'x')):
        with pytest.raises(FileNotFoundError, match='nope'):
            call()
    assert not (tmp_path / 'x').exists()

def test_url_parsing(tmp_path):
    assert open_store(f'file://{tmp_path}').root == tmp_path
    assert open_store('s3://bucket/a/b/').url == 's3://bucket/a/b'
    with pytest.raises(ValueError, match='unsupported URL scheme'):
        open_store('gs://bucket/x')
    with pytest.raises(ValueError, match='needs a bucket'):
        open_store('s3:///x')
    with pytest.raises(ValueError, match='storage.multipart_mb=1 must be >= 5'):
        open_store('s3://bucket/prefix', StorageConfig(multipart_mb=1))

def test_endpoint_resolution(monkeypatch):
    for key in ('AWS_ENDPOINT_URL_S3', 'AWS_ENDPOINT_URL', 'S3_ENDPOINT_URL'):
        monkeypatch.delenv(key, raising=False)
    assert StorageConfig().resolved_endpoint() is None
    monkeypatch.setenv('S3_ENDPOINT_URL', 'http://s3-env')
    assert StorageConfig().resolved_endpoint() == 'http://s3-env'
    monkeypatch.setenv('AWS_ENDPOINT_URL', 'http://aws-env')
    assert StorageConfig().resolved_endpoint() == 'http://aws-env'
    assert StorageConfig(endpoint_url='http://cfg').resolved_endpoint() == 'http://cfg'

def test_fetch_to_local_passes_local_paths_through(tmp_path):
    (tmp_path / 't.pkl').write_bytes(b'net')
    assert fetch_to_local(tmp_path / 't.pkl') == tmp_path / 't.pkl'
    assert fetch_to_local(f'file://{tmp_path}/t.pkl') == tmp_path / 't.pkl'
    with pytest.raises(FileNotFoundError, match='missing.pkl'):
        fetch_to_local(tmp_path / 'missing.pkl')

#----------------------------------------------------------------------------
# S3 specifics.

@pytest.mark.s3
def test_s3_multipart_and_pickling(s3_env, tmp_path):
    store = open_store(f's3://{s3_env.bucket}/{uuid.uuid4().hex}', StorageConfig(multipart_mb=5))
    data = os.urandom(11 << 20)
    (tmp_path / 'big').write_bytes(data)
    store.put_file(tmp_path / 'big', 'big')
    assert store.head('big')['ETag'].strip('"').endswith('-3') # three parts of 5 MiB
    assert store.read('big') == data
    assert store.client is not None              # a live client must not travel with the store
    clone = pickle.loads(pickle.dumps(store))
    assert isinstance(clone, S3Store) and clone._client is None and clone.read('big')[:10] == data[:10]

@pytest.mark.s3
def test_s3_endpoint_from_config_without_env(s3_endpoint, monkeypatch):
    monkeypatch.delenv('AWS_ENDPOINT_URL', raising=False)
    monkeypatch.setenv('AWS_ACCESS_KEY_ID', s3_endpoint.access_key)
    monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', s3_endpoint.secret_key)
    cfg = StorageConfig(endpoint_url=s3_endpoint.endpoint_url, region='us-east-1')
    store = open_store(f's3://{s3_endpoint.bucket}/{uuid.uuid4().hex}', cfg)
    store.put_bytes(b'x', 'k')
    assert store.read('k') == b'x'

@pytest.mark.s3
def test_fetch_to_local_caches_s3_objects(s3_env, tmp_path):
    prefix = f's3://{s3_env.bucket}/{uuid.uuid4().hex}'
    store, cfg = open_store(prefix), StorageConfig(cache_dir=str(tmp_path / 'cache'))
    store.put_bytes(b'teacher v1', 'nets/teacher.pkl')
    path = fetch_to_local(f'{prefix}/nets/teacher.pkl', cfg)
    assert path.read_bytes() == b'teacher v1' and path.is_relative_to(tmp_path / 'cache')
    stamp = path.stat().st_mtime_ns
    assert fetch_to_local(f'{prefix}/nets/teacher.pkl', cfg) == path and path.stat().st_mtime_ns == stamp # cache hit
    store.put_bytes(b'teacher v2!', 'nets/teacher.pkl')
    assert fetch_to_local(f'{prefix}/nets/teacher.pkl', cfg).read_bytes() == b'teacher v2!' # the remote changed
    with pytest.raises(FileNotFoundError, match='missing.pkl'):
        fetch_to_local(f'{prefix}/missing.pkl', cfg)

def test_urls_are_parsed_in_one_place(tmp_path):
    assert parse_url('s3://bucket/a/b') == ('s3', 'bucket/a/b')
    assert parse_url(f'file://{tmp_path}/x') == ('file', f'{tmp_path}/x') == parse_url(f'{tmp_path}/x')
    with pytest.raises(ValueError, match="unsupported URL scheme; use a local path, file:///abs/path or s3://"):
        parse_url('gs://bucket/x')
    (tmp_path / 'here').write_text('')
    assert not missing_local(tmp_path / 'here') and missing_local(f'file://{tmp_path}/gone')
    assert not missing_local('s3://bucket/unchecked')      # objects are checked when they are read

@pytest.mark.s3
def test_one_storage_section_serves_every_s3_consumer(s3_endpoint, monkeypatch, tmp_path):
    """`storage.*` set once (no endpoint in the environment): the shard stream, fetch_to_local (teacher, eval files)
    and the checkpoint manager all reach the endpoint without a StorageConfig of their own."""
    from cosim_dist import storage
    from cosim_dist.checkpoint import CheckpointManager
    from cosim_dist.config import load_config
    from cosim_dist.data import ShardStream
    from cosim_dist.tools.make_shards import main as make_shards
    for key in storage.ENDPOINT_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv('AWS_ACCESS_KEY_ID', s3_endpoint.access_key)
    monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', s3_endpoint.secret_key)
    monkeypatch.setattr(storage, '_default', storage.StorageConfig())          # restored after the test
    prefix = f's3://{s3_endpoint.bucket}/{uuid.uuid4().hex}'
    cfg = load_config([f'storage.endpoint_url={s3_endpoint.endpoint_url}', 'storage.region=us-east-1',
                       f'storage.cache_dir={tmp_path / "cache"}'])
    storage.configure(cfg.storage)
    make_shards(['--gmm', '24', '--out', f'{prefix}/shards', '--endpoint-url', s3_endpoint.endpoint_url])
    assert ShardStream(f'{prefix}/shards', batch_size=4).next_batch()[0].shape[0] == 4
    open_store(prefix).put_bytes(b'weights', 'nets/teacher.pkl')
    assert fetch_to_local(f'{prefix}/nets/teacher.pkl').read_bytes() == b'weights'
    ck = CheckpointManager(f'{prefix}/ckpt', tmp_path / 'staging', async_upload=False)
    (ck.stage(1) / 'x.bin').write_bytes(b'state')
    ck.commit(1)
    assert CheckpointManager(f'{prefix}/ckpt', tmp_path / 'other').latest().read('x.bin') == b'state'

@pytest.mark.s3
def test_s3_ranged_reads_of_a_short_object_come_back_short(s3_env):
    """As from a local file: a range past the end gives what exists (a truncated shard then fails verification and
    its commit is retired, instead of looking like an unreachable store)."""
    store = open_store(f's3://{s3_env.bucket}/{uuid.uuid4().hex}')
    store.put_bytes(bytes(range(100)), 'obj')
    assert store.read_range('obj', 10, 20) == bytes(range(10, 20))
    assert store.read_range('obj', 50, 150) == bytes(range(50, 100))
    assert store.read_range('obj', 200, 300) == b''
    with pytest.raises(FileNotFoundError):
        store.read_range('missing', 0, 10)
