"""Object storage behind one small protocol: local directories (plain paths or `file://`) and S3 (`s3://bucket/prefix`
on AWS or any S3-compatible endpoint: SeaweedFS, MinIO, Ceph RGW, R2, GCS interop).

A store is rooted at a URL and addressed by '/'-separated keys relative to that root. Every write is atomic per key
(local: a temporary file renamed into place; S3: a single PUT or a completed multipart upload), and reading a missing
key raises FileNotFoundError on both backends. Local keys whose last component starts with '.' are reserved for
temporaries and never listed.

S3 credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, `StorageConfig.profile` or
the default profile, instance roles). The endpoint is `StorageConfig.endpoint_url`, else the first of the environment
variables AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, S3_ENDPOINT_URL, else AWS itself. One StorageConfig per process
(`configure`, from the `storage.*` config section) serves every consumer that is not handed its own. S3 clients are
created lazily per process, so stores can be pickled into DataLoader workers and forked processes.
"""

import dataclasses
import hashlib
import io
import os
import pathlib
import shutil
import uuid
from collections.abc import Callable
from typing import BinaryIO, Protocol

ENDPOINT_ENV = ('AWS_ENDPOINT_URL_S3', 'AWS_ENDPOINT_URL', 'S3_ENDPOINT_URL')

#----------------------------------------------------------------------------
# Configuration.

@dataclasses.dataclass(kw_only=True)
class StorageConfig:
    # S3 endpoint, e.g. http://127.0.0.1:8333; null: the first of $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL,
    # $S3_ENDPOINT_URL, else AWS
    endpoint_url: str | None = None
    # S3 region; null: boto3's default chain ($AWS_REGION, profile), 'us-east-1' if unset
    region: str | None = None
    profile: str | None = None      # AWS profile for the credentials (null: boto3's chain: env, default profile, role)
    # attempts per S3 request, with boto3's adaptive retry mode (backoff + client-side rate limiting)
    max_attempts: int = 10
    multipart_mb: int = 64          # objects larger than this are transferred in parts of this size (S3 minimum: 5)
    max_concurrency: int = 8        # threads per multipart transfer
    # where fetch_to_local keeps S3 downloads; null: $COSIM_CACHE, else ~/.cache/cosim_dist
    cache_dir: str | None = None

    def problems(self, key: str = 'storage') -> list[str]:
        """Bad values, one line each, named `<key>.<field>`."""
        return ([f'{key}.max_attempts={self.max_attempts} must be >= 1'] if self.max_attempts < 1 else []) + \
            ([f'{key}.multipart_mb={self.multipart_mb} must be >= 5 (the S3 minimum part size)']
             if self.multipart_mb < 5 else []) + \
            ([f'{key}.max_concurrency={self.max_concurrency} must be >= 1'] if self.max_concurrency < 1 else [])

    def resolved_endpoint(self) -> str | None:
        """The S3 endpoint URL in effect (None: AWS)."""
        return self.endpoint_url or next((os.environ[k] for k in ENDPOINT_ENV if os.environ.get(k)), None)

#----------------------------------------------------------------------------
# The protocol.

class ObjectStore(Protocol):
    url: str # the root, e.g. '/data/in512' or 's3://bucket/datasets/in512'

    def put_file(self, path: str | os.PathLike, key: str) -> None: ...     # upload a local file
    def put_bytes(self, data: bytes, key: str) -> None: ...                 # store bytes
    def create(self, data: bytes, key: str) -> bool: ...                    # store bytes only if the key is new
    def get_file(self, key: str, path: str | os.PathLike) -> None: ...     # download to a local path (atomic)
    def read(self, key: str) -> bytes: ...                                  # whole object in memory
    def read_range(self, key: str, start: int, end: int) -> bytes: ...      # bytes [start, end) of an object
    def open(self, key: str) -> BinaryIO: ...                               # streaming read; close it after use
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = '') -> list[str]: ...                      # sorted keys starting with prefix
    def delete(self, key: str) -> None: ...                                 # no error if missing

#----------------------------------------------------------------------------
# URLs: a local path, file:///abs/path or s3://bucket/key (the only place that parses them).

def parse_url(url: str | os.PathLike) -> tuple[str, str]:
    """('s3', 'bucket/key') or ('file', local path); any other scheme is an error naming the accepted forms."""
    url = os.fspath(url)
    if url.startswith('s3://'):
        return 's3', url.removeprefix('s3://')
    if '://' in url and not url.startswith('file://'):
        raise ValueError(f'{url!r}: unsupported URL scheme; use a local path, file:///abs/path or s3://bucket/prefix')
    return 'file', url.removeprefix('file://')

def missing_local(url: str | os.PathLike) -> bool:
    """Whether `url` names a local path that does not exist (objects in a store are checked when they are read)."""
    scheme, rest = parse_url(url)
    return scheme == 'file' and not pathlib.Path(rest).expanduser().exists()

_default = StorageConfig()          # the process's S3 settings (`configure`), used wherever none is passed

def configure(cfg: StorageConfig) -> None:
    """Set the S3 settings of this process once (the `storage.*` config section): every `s3://` consumer (data,
    teacher, checkpoints, evaluation files) that is given no StorageConfig of its own uses them."""
    global _default
    _default = checked(cfg)

def checked(cfg: StorageConfig | None) -> StorageConfig:
    """`cfg` (default: the configured one), or a ValueError listing its bad values."""
    cfg = cfg or _default
    if problems := cfg.problems():
        raise ValueError('; '.join(problems))
    return cfg

def open_store(url: str | os.PathLike, cfg: StorageConfig | None = None) -> ObjectStore:
    """The store rooted at `url`: a local path, `file:///abs/path` or `s3://bucket[/prefix]`."""
    scheme, rest = parse_url(url)
    return S3Store(os.fspath(url), checked(cfg)) if scheme == 's3' else LocalStore(rest)

def write_atomic(path: pathlib.Path, write: Callable[[pathlib.Path], None]) -> None:
    """Create `path` by writing a hidden temporary next to it and renaming it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.{uuid.uuid4().hex[:8]}.tmp')
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

#----------------------------------------------------------------------------
# Local directories.

class LocalStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = pathlib.Path(root).expanduser().absolute()
        self.url = str(self.root)

    def _path(self, key: str) -> pathlib.Path:
        return self.root / key

    def put_file(self, path: str | os.PathLike, key: str) -> None:
        write_atomic(self._path(key), lambda tmp: shutil.copyfile(path, tmp))

    def put_bytes(self, data: bytes, key: str) -> None:
        write_atomic(self._path(key), lambda tmp: tmp.write_bytes(data))

    def create(self, data: bytes, key: str) -> bool:
        """Create-only write: a complete temporary hard-linked into place fails if the key exists."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f'.{path.name}.{uuid.uuid4().hex[:8]}.tmp')
        try:
            tmp.write_bytes(data)
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        write_atomic(pathlib.Path(path), lambda tmp: shutil.copyfile(self._path(key), tmp))

    def read(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def read_range(self, key: str, start: int, end: int) -> bytes:
        with open(self._path(key), 'rb') as f:
            f.seek(start)
            return f.read(end - start)

    def open(self, key: str) -> BinaryIO:
        return open(self._path(key), 'rb')

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = '') -> list[str]:
        if not self.root.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in self.root.rglob('*')
                if p.is_file() and not p.name.startswith('.'))
        return sorted(k for k in keys if k.startswith(prefix))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

#----------------------------------------------------------------------------
# S3 through boto3.

def _is_missing(err: Exception) -> bool:
    return getattr(err, 'response', {}).get('Error', {}).get('Code') in ('404', 'NoSuchKey', 'NotFound')

class S3Store:
    def __init__(self, url: str, cfg: StorageConfig) -> None:
        bucket, _, prefix = parse_url(url)[1].partition('/')
        if not bucket:
            raise ValueError(f'{url!r}: an S3 URL needs a bucket, e.g. s3://bucket/prefix')
        self.bucket, self.prefix, self.cfg = bucket, prefix.strip('/'), cfg
        self.url = f's3://{bucket}/{self.prefix}'.rstrip('/')
        self._client, self._pid = None, None

    def __getstate__(self) -> dict:
        return {**self.__dict__, '_client': None, '_pid': None} # boto3 clients are neither picklable nor fork-safe

    @property
    def client(self):
        if self._client is None or self._pid != os.getpid():
            import boto3
            from botocore.config import Config
            retries = {'mode': 'adaptive', 'max_attempts': self.cfg.max_attempts}
            session = boto3.session.Session(profile_name=self.cfg.profile)
            self._client = session.client('s3', endpoint_url=self.cfg.resolved_endpoint(), region_name=self.cfg.region,
                                          config=Config(retries=retries))
            self._pid = os.getpid()
        return self._client

    @property
    def transfer(self):
        from boto3.s3.transfer import TransferConfig
        part = self.cfg.multipart_mb << 20
        return TransferConfig(multipart_threshold=part, multipart_chunksize=part,
                              max_concurrency=self.cfg.max_concurrency)

    def _key(self, key: str) -> str:
        return f'{self.prefix}/{key}' if self.prefix else key

    def _missing(self, key: str) -> FileNotFoundError:
        return FileNotFoundError(f'{self.url}/{key} does not exist (endpoint {self.cfg.resolved_endpoint() or "AWS"})')

    def put_file(self, path: str | os.PathLike, key: str) -> None:
        self.client.upload_file(os.fspath(path), self.bucket, self._key(key), Config=self.transfer)

    def put_bytes(self, data: bytes, key: str) -> None:
        self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(key), Config=self.transfer)

    def create(self, data: bytes, key: str) -> bool:
        """Create-only write (`If-None-Match: *`): False if the key already exists."""
        import botocore.exceptions
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch='*')
        except botocore.exceptions.ClientError as e:
            if e.response.get('Error', {}).get('Code') in ('PreconditionFailed', '412', 'ConditionalRequestConflict'):
                return False
            raise
        return True

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        import botocore.exceptions
        try:
            write_atomic(pathlib.Path(path),
                         lambda tmp: self.client.download_file(self.bucket, self._key(key), str(tmp),
                                                               Config=self.transfer))
        except botocore.exceptions.ClientError as e:
            raise (self._missing(key) if _is_missing(e) else e) from e

    def read(self, key: str) -> bytes:
        import botocore.exceptions
        buf = io.BytesIO() # download_fileobj retries broken streams and fetches large objects in parallel ranges
        try:
            self.client.download_fileobj(self.bucket, self._key(key), buf, Config=self.transfer)
        except botocore.exceptions.ClientError as e:
            raise (self._missing(key) if _is_missing(e) else e) from e
        return buf.getvalue()

    def read_range(self, key: str, start: int, end: int) -> bytes:
        """A ranged GET. A broken or short body is fetched again (up to max_attempts); a body that stays short, or a
        range past the end of the object (416), is returned short, as a local file would be: the object is shorter."""
        import botocore.exceptions
        data, why = b'', ''
        for _ in range(self.cfg.max_attempts if end > start else 0):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=self._key(key), Range=f'bytes={start}-{end - 1}')
                data = body['Body'].read()
            except botocore.exceptions.ClientError as e:
                if _is_missing(e):
                    raise self._missing(key) from e
                if e.response.get('Error', {}).get('Code') == 'InvalidRange':
                    return b''
                raise
            except (botocore.exceptions.ResponseStreamingError, botocore.exceptions.IncompleteReadError) as e:
                why = f'{type(e).__name__}: {e}'
                continue
            if len(data) == end - start:
                return data
        if why and not data:
            raise OSError(f'{self.url}/{key}: bytes {start}-{end} could not be read ({why})')
        return data

    def open(self, key: str) -> BinaryIO:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))['Body']
        except self.client.exceptions.NoSuchKey as e:
            raise self._missing(key) from e

    def head(self, key: str) -> dict:
        """The object's metadata (ContentLength, ETag, ...)."""
        import botocore.exceptions
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except botocore.exceptions.ClientError as e:
            raise (self._missing(key) if _is_missing(e) else e) from e

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except FileNotFoundError:
            return False
        return True

    def list(self, prefix: str = '') -> list[str]:
        root = f'{self.prefix}/' if self.prefix else ''
        pages = self.client.get_paginator('list_objects_v2').paginate(Bucket=self.bucket, Prefix=root + prefix)
        return sorted(obj['Key'][len(root):] for page in pages for obj in page.get('Contents', []))

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a local file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()

#----------------------------------------------------------------------------
# Local copies of remote files (teacher pickles, reference statistics).

def fetch_to_local(url: str | os.PathLike, cfg: StorageConfig | None = None) -> pathlib.Path:
    """A local path holding the file at `url`. Local paths are returned as they are; `s3://` objects are downloaded
    once into the cache (`cfg.cache_dir`) and downloaded again only when the remote ETag or size changes."""
    (scheme, rest), cfg = parse_url(url), checked(cfg)
    if scheme == 'file':
        path = pathlib.Path(rest).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f'{os.fspath(url)} does not exist')
        return path
    bucket, _, key = rest.partition('/')
    store = S3Store(f's3://{bucket}', cfg)
    head = store.head(key)
    cache = pathlib.Path(cfg.cache_dir or os.environ.get('COSIM_CACHE') or '~/.cache/cosim_dist').expanduser()
    path = cache / 's3' / bucket / key
    stamp = path.with_name(f'.{path.name}.etag') # the ETag of the cached copy
    if (path.is_file() and path.stat().st_size == head['ContentLength']
        and stamp.is_file() and stamp.read_text() == head['ETag']):
        return path
    store.get_file(key, path)
    write_atomic(stamp, lambda tmp: tmp.write_text(head['ETag']))
    return path
