"""Packaging: the lock file pins every declared dependency; the wheel holds the package with its config groups and
nothing else at top level; installed (not editable) into a fresh venv, its console scripts work from a directory
outside the checkout."""

import json
import os
import pathlib
import re
import shutil
import site
import subprocess
import sys
import tomllib
import zipfile

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ('cosim-launch', 'cosim-make-shards', 'cosim-encode-latents', 'cosim-ref-stats')
CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / 'cosim_dist' / 'configs').glob('*/*.yaml'))

def normalise(name: str) -> str:
    return re.sub(r'[-_.]+', '-', name).lower()       # PEP 503

def test_constraints_pin_every_declared_dependency():
    project = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']
    declared = [*project['dependencies'], *(r for extra in project['optional-dependencies'].values() for r in extra)]
    pins: dict[str, str] = {}
    for line in (REPO / 'constraints.txt').read_text().splitlines():
        if line.strip() and not line.startswith('#'):
            name, sep, version = line.partition('==')
            assert sep and version and normalise(name) not in pins, f'constraints.txt: {line!r}'
            pins[normalise(name)] = version
    names = {normalise(re.match(r'[A-Za-z0-9._-]+', r).group()) for r in declared}
    assert names - pins.keys() == set(), 'declared in pyproject.toml but not pinned in constraints.txt'

#----------------------------------------------------------------------------
# The wheel and a fresh venv holding it (slow: a build, a venv, the scripts' imports).

def clean_env(venv: pathlib.Path | None = None) -> dict[str, str]:
    """This environment without any path that would import the checkout (tests run with PYTHONPATH=<checkout>)."""
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME', 'PYTHONSTARTUP')}
    if venv is not None:
        env['PATH'] = f'{venv / "bin"}{os.pathsep}{env.get("PATH", "")}'
        env['VIRTUAL_ENV'] = str(venv)
    return env

@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> pathlib.Path:
    """The project's wheel, built from a copy of the tree (an in-tree build would reuse a stale build/ directory)."""
    src, out = tmp_path_factory.mktemp('src') / 'cosim-dist', tmp_path_factory.mktemp('wheel')
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns('.git', '__pycache__', 'build', '*.egg-info', 'runs',
                                                             'wandb', 'logs', '.whl', '.pytest_cache'))
    build = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-index', '--no-deps',
                            '--no-build-isolation', '-w', str(out), str(src)],
                           capture_output=True, text=True, env=clean_env(), timeout=300)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-3000:]
    (whl,) = out.glob('cosim_dist-*.whl')
    return whl

@pytest.fixture(scope='module')
def venv(wheel, tmp_path_factory) -> pathlib.Path:
    """A fresh venv with the wheel installed (--no-deps) and this interpreter's site-packages appended by a .pth file:
    a path line of a .pth is added to sys.path without being processed as a site directory, so the .pth files there
    (the dev install's editable finder among them) stay inactive."""
    venv = tmp_path_factory.mktemp('venv') / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True, timeout=120)
    python = venv / 'bin' / 'python'
    purelib = subprocess.run([str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                             capture_output=True, text=True, check=True, env=clean_env()).stdout.strip()
    dirs = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    (pathlib.Path(purelib) / '_test_dependencies.pth').write_text(''.join(f'{d}\n' for d in dirs))
    install = subprocess.run([sys.executable, '-m', 'pip', '--python', str(python), 'install', '-q', '--no-deps',
                              '--no-index', str(wheel)], capture_output=True, text=True, env=clean_env(), timeout=300)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-3000:]
    return venv

def run(venv: pathlib.Path, cwd: pathlib.Path, *cmd: str) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=clean_env(venv), timeout=300)
    assert out.returncode == 0, f'{" ".join(cmd)}: exit {out.returncode}\n{out.stdout[-2000:]}{out.stderr[-3000:]}'
    return out

@pytest.mark.slow
def test_wheel_holds_the_package_and_its_configs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split('/')[0] for n in names} == {'cosim_dist', 'cosim_dist-0.1.0.dist-info'}   # no launchers/ etc.
    assert sorted(n for n in names if n.startswith('cosim_dist/configs/')) == CONFIGS and len(CONFIGS) >= 10
    for package in ('cosim_dist/launchers', 'cosim_dist/tools', 'cosim_dist/nets', 'cosim_dist/eval'):
        assert f'{package}/__init__.py' in names
    entry_points = zipfile.ZipFile(wheel).read('cosim_dist-0.1.0.dist-info/entry_points.txt').decode()
    assert all(f'{script} = ' in entry_points for script in SCRIPTS)

@pytest.mark.slow
def test_console_scripts_of_a_fresh_install(venv, tmp_path):
    # The installed copy is the one imported (not the checkout, not the dev install's editable finder); the
    # cosim-launch entry point parses and resolves a config from the package data without importing torch.
    probe = ('import importlib.metadata as md, json, sys\n'
             'dist = md.distribution("cosim-dist")\n'
             'cli = next(e for e in dist.entry_points if e.name == "cosim-launch").load()\n'
             'try:\n    cli(["--dry-run", "model=edm2-l", "data.path=s3://bucket/in512"])\n'
             'except SystemExit as e:\n    code = e.code\n'
             'import cosim_dist\n'
             'print(json.dumps(dict(code=code, file=cosim_dist.__file__, dist=str(dist.locate_file("")),\n'
             '    torch="torch" in sys.modules, editable=[repr(f) for f in sys.meta_path if "editable" in repr(f)])))')
    report = json.loads(run(venv, tmp_path, str(venv / 'bin' / 'python'), '-c', probe).stdout.splitlines()[-1])
    assert report['code'] == 0 and not report['torch'] and report['editable'] == []
    for path in (report['file'], report['dist']):
        assert pathlib.Path(path).resolve().is_relative_to(venv.resolve()), path
    # `--nproc N` ranks of an installed copy import it from site-packages: no PYTHONPATH of their own
    probe = ('import subprocess\nfrom cosim_dist.launchers import local\ncalls = []\n'
             'subprocess.run = lambda cmd, env: calls.append(env.get("PYTHONPATH")) or '
             'subprocess.CompletedProcess(cmd, 0)\n'
             'local.launch_processes(2, [])\nprint(calls)')
    assert run(venv, tmp_path, str(venv / 'bin' / 'python'), '-c', probe).stdout.splitlines()[-1] == '[None]'

    for script in SCRIPTS:
        assert (venv / 'bin' / script).is_file()
        assert f'usage: {script}' in run(venv, tmp_path, script, '--help').stdout
    # configs ship as package data: the published teacher group and its data group resolve outside a checkout
    cfg = yaml.safe_load(run(venv, tmp_path, 'cosim-launch', '--dry-run', 'model=edm2-l',
                             'data.path=s3://bucket/in512').stdout)
    assert cfg['groups'] == {'model': 'edm2-l', 'data': 'imagenet512'} and cfg['model']['net']['model_channels'] == 320
    # a data tool does real work from the install
    run(venv, tmp_path, 'cosim-make-shards', '--gmm', '16', '--out', 'shards', '--samples-per-shard', '8')
    assert sorted(p.name for p in (tmp_path / 'shards').iterdir()) == ['manifest.parquet', 'shard-000000.tar',
                                                                      'shard-000001.tar']
