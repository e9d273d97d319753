"""Shared pytest fixtures."""

import importlib.util
import pathlib
import sys

import pytest

def load_helper(relpath: str):
    """Import a helper module of tests/ by path (tests/ is not a package: pytest runs with --import-mode=importlib, and
    an unrelated `tests` package may be installed in site-packages)."""
    path = pathlib.Path(__file__).parent / relpath
    name = f'_cosim_tests_{path.stem}'
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]

#----------------------------------------------------------------------------
# A real S3 endpoint on 127.0.0.1 (SeaweedFS), one per test session.

@pytest.fixture(scope='session')
def s3_endpoint(tmp_path_factory):
    """S3Endpoint (endpoint_url, access_key, secret_key, bucket) of a SeaweedFS server running for the session."""
    with load_helper('services/seaweedfs.py').serve(tmp_path_factory.mktemp('seaweedfs')) as ep:
        yield ep

@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """s3_endpoint, with AWS_* environment variables pointing boto3 at it for the duration of the test."""
    for key, value in s3_endpoint.env().items():
        monkeypatch.setenv(key, value)
    return s3_endpoint

#----------------------------------------------------------------------------
# A real Slurm of two nodes on this machine (scripts/slurm_testbed.sh), one per test session.

@pytest.fixture(scope='session')
def slurm_cluster():
    """SlurmTestbed (nodes, host address, cpus, low and high partitions) of the running two-node Slurm testbed."""
    yield from load_helper('services/slurm.py').testbed_session()

@pytest.fixture(scope='session')
def cluster_s3(slurm_cluster, tmp_path_factory):
    """A SeaweedFS S3 endpoint the testbed's nodes reach (on the host's bridge address): their only shared store."""
    with load_helper('services/seaweedfs.py').serve(tmp_path_factory.mktemp('cluster-s3'), ip=slurm_cluster.addr) as ep:
        yield ep

#----------------------------------------------------------------------------
# Random-weight files for the real feature extractors and the VAE (no official weights exist on this machine).

@pytest.fixture(scope='session')
def inception_weights(tmp_path_factory) -> pathlib.Path:
    """A Kaiming-initialised torch-fidelity Inception-V3 state dict with the official keys, as a .pth file."""
    return load_helper('helpers/random_weights.py').write_inception(tmp_path_factory.mktemp('inception')
                                                                    / 'inception.pth')

@pytest.fixture(scope='session')
def dinov2_weights(tmp_path_factory) -> pathlib.Path:
    """A Kaiming-initialised DINOv2 ViT-L/14 state dict with the official parameter names."""
    path = tmp_path_factory.mktemp('dinov2') / 'dinov2_vitl14_pretrain.pth'
    return load_helper('helpers/random_weights.py').write_dinov2(path)

@pytest.fixture(scope='session')
def tiny_vae(tmp_path_factory) -> str:
    """A randomly initialised AutoencoderKL directory with one downsampling (32x32 pixels <-> 4x16x16 latents)."""
    helper = load_helper('helpers/random_weights.py')
    return helper.write_vae(tmp_path_factory.mktemp('vae'), helper.TINY_VAE)

@pytest.fixture(scope='session')
def route_probe():
    """tests/helpers/route_probe.py: a small elastic state, its holdings per rank and the per-rank resume."""
    return load_helper('helpers/route_probe.py')
