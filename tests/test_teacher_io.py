"""Network files (cosim_dist/teacher_io.py): official EDM / EDM2 / SiD pickles written here in the official
persistence layout, refusal of anything else, our snapshots and the safetensors export."""

import contextlib
import copy
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from cosim_dist import teacher_io
from cosim_dist.nets import build_network

#----------------------------------------------------------------------------
# The official layout (docs/ALGORITHM.md, "Reference facts"): every persistent object pickles as a call to
# torch_utils.persistence._reconstruct_persistent_obj(meta), meta = {type, version, module_src, class_name, state}
# with state = the object's __dict__ plus _init_args/_init_kwargs; plain ModuleDicts pickle by value; EDM2 wraps
# everything in a dnnlib.util.EasyDict. Stand-ins for NVIDIA's modules exist in sys.modules only while writing.

def _reconstruct_persistent_obj(meta):
    raise AssertionError('the loader must never call torch_utils.persistence')

class EasyDict(dict):
    pass

class Persistent:
    """A non-module persistent object (loss_fn, encoder, augment_pipe)."""

    def __init__(self, class_name: str, **state) -> None:
        self.class_name, self.state = class_name, state

OFFICIAL_NAMES = {'SongUNetPrecond': 'EDMPrecond', 'DhariwalUNetPrecond': 'EDMPrecond', 'EDM2Precond': 'Precond'}

class OfficialPickler(pickle.Pickler):
    def __init__(self, file, module_src: str, init_kwargs: dict) -> None:
        super().__init__(file)
        self.module_src, self.init_kwargs = module_src, init_kwargs

    def reducer_override(self, obj):
        if isinstance(obj, Persistent):
            name, state = obj.class_name, dict(obj.state, _init_args=(), _init_kwargs={})
        elif isinstance(obj, torch.nn.Module) and type(obj).__module__.startswith('cosim_dist.'):
            name = OFFICIAL_NAMES.get(type(obj).__name__, type(obj).__name__)
            state = {k: v for k, v in obj.__dict__.items() if k != 'init_kwargs'}
            state.update(_init_args=(), _init_kwargs=self.init_kwargs if name in OFFICIAL_NAMES.values() else {})
        else:
            return NotImplemented
        meta = dict(type='class', version=6, module_src=self.module_src, class_name=name, state=state)
        return _reconstruct_persistent_obj, (meta,), None

@contextlib.contextmanager
def nvidia_modules():
    modules = {name: types.ModuleType(name)
               for name in ('torch_utils', 'torch_utils.persistence', 'dnnlib', 'dnnlib.util')}
    modules['torch_utils.persistence']._reconstruct_persistent_obj = _reconstruct_persistent_obj
    modules['dnnlib.util'].EasyDict = EasyDict
    _reconstruct_persistent_obj.__module__, EasyDict.__module__ = 'torch_utils.persistence', 'dnnlib.util'
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name in modules:
            del sys.modules[name]

def write_official(path: os.PathLike, data, init_kwargs: dict, marker: os.PathLike) -> None:
    """Pickle data in the official layout; every record's module_src would create `marker` if it were executed."""
    with nvidia_modules(), open(path, 'wb') as f:
        OfficialPickler(f, f'open({str(marker)!r}, "w").write("executed")\n', init_kwargs).dump(data)

def official_snapshot(kind: str, net: torch.nn.Module):
    """The top-level object of an EDM (fp32), EDM2 (EasyDict, fp16) or SiD pickle around net."""
    if kind == 'edm':
        return dict(ema=net, loss_fn=Persistent('EDMLoss', P_mean=-1.2, P_std=1.2, sigma_data=0.5),
                    augment_pipe=Persistent('AugmentPipe', p=0.12), dataset_kwargs=dict(path='cifar10-32x32.zip'))
    if kind == 'edm2':
        encoder = Persistent('StabilityVAEEncoder', vae_name='stabilityai/sd-vae-ft-mse', _vae=None,
                             scale=np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28]), bias=np.float32([0.1] * 4))
        return EasyDict(dataset_kwargs=EasyDict(path='img512-sd.zip'), encoder=encoder,
                        loss_fn=Persistent('EDM2Loss', P_mean=-0.4, P_std=1.0), ema=copy.deepcopy(net).half())
    return dict(ema=net)

# (our arch, our kwargs, extra constructor arguments the official training scripts record, pickle kind)
DDPMPP = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
              channel_mult_noise=1, resample_filter=[1, 1], use_fp16=False)
SMALL = dict(img_resolution=16, model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
CIFAR = dict(img_channels=3, augment_dim=9, dropout=0.13, **SMALL)
CASES = {
    'edm-cifar10-cond': ('songunet', dict(label_dim=10, **CIFAR), DDPMPP, 'edm'),
    'edm-in64': ('dhariwalunet', dict(img_channels=3, label_dim=10, dropout=0.1, **SMALL),
                 dict(model_type='DhariwalUNet', use_fp16=True), 'edm'),
    'edm2': ('edm2', dict(img_channels=4, label_dim=10, dropout=0.0, **SMALL), dict(use_fp16=True), 'edm2'),
    'sid-cifar10-uncond': ('songunet', dict(label_dim=0, **CIFAR), DDPMPP, 'sid'),
}

def random_net(arch: str, kwargs: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_network(arch, **kwargs).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    return net

#----------------------------------------------------------------------------
# Official pickles.

@pytest.mark.parametrize('case', CASES)
def test_official_pickle_loads_into_our_network(case, tmp_path):
    arch, kwargs, official_extra, kind = CASES[case]
    net = random_net(arch, kwargs)
    data = official_snapshot(kind, net)
    write_official(tmp_path / 'net.pkl', data, {**kwargs, **official_extra}, tmp_path / 'marker')
    loaded = teacher_io.load_network(tmp_path / 'net.pkl')
    assert not (tmp_path / 'marker').exists()               # module_src was never executed
    assert type(loaded) is type(net) and not loaded.training
    assert loaded.init_kwargs == build_network(arch, **kwargs).init_kwargs
    reference = data['ema'].float()                          # EDM2: the fp16 weights, widened
    state = loaded.state_dict()
    assert state.keys() == reference.state_dict().keys()
    for k, v in reference.state_dict().items():
        assert state[k].dtype == torch.float32 and torch.equal(state[k], v), k
    assert not any(p.requires_grad for p in loaded.parameters())
    x, sigma = torch.randn(2, kwargs['img_channels'], 16, 16), torch.tensor([0.5, 5.0])
    labels = torch.eye(kwargs['label_dim'])[:2] if kwargs['label_dim'] else None
    assert torch.equal(loaded(x, sigma, labels), reference.eval()(x, sigma, labels))

def test_forbidden_global_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / 'pwned'

    class Exploit:
        def __reduce__(self):
            return os.system, (f'touch {marker}',)
    (tmp_path / 'evil.pkl').write_bytes(pickle.dumps(dict(ema=Exploit())))
    with pytest.raises(pickle.UnpicklingError,
                       match=rf'{os.system.__module__}\.system: not in the teacher_io allow-list'):
        teacher_io.load_network(tmp_path / 'evil.pkl')
    assert not marker.exists()

def test_unknown_class_is_refused_by_name(tmp_path):
    (tmp_path / 'plain.pkl').write_bytes(pickle.dumps(dict(ema=torch.nn.Linear(2, 2))))
    with pytest.raises(pickle.UnpicklingError, match=r'torch\.nn\.modules\.linear\.Linear'):
        teacher_io.load_network(tmp_path / 'plain.pkl')

def test_unsupported_architecture_options_are_named(tmp_path):
    arch, kwargs, official_extra, kind = CASES['edm-cifar10-cond']
    write_official(tmp_path / 'ncsn.pkl', official_snapshot(kind, random_net(arch, kwargs)),
                   {**kwargs, **official_extra, 'embedding_type': 'fourier'}, tmp_path / 'marker')
    with pytest.raises(ValueError, match="embedding_type='fourier' is not supported"):
        teacher_io.load_network(tmp_path / 'ncsn.pkl')

def test_missing_file_and_urls(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=rf'{tmp_path}/nope.pkl does not exist: download'):
        teacher_io.load_network(f'file://{tmp_path}/nope.pkl')
    with pytest.raises(ValueError, match='unsupported URL scheme'):
        teacher_io.load_network('https://example.com/edm.pkl')
    arch, kwargs, official_extra, kind = CASES['edm2']
    write_official(tmp_path / 'edm2.pkl', official_snapshot(kind, random_net(arch, kwargs)),
                   {**kwargs, **official_extra}, tmp_path / 'marker')
    from cosim_dist import storage
    fetched = []
    monkeypatch.setattr(storage, 'fetch_to_local', lambda url: fetched.append(url) or tmp_path / 'edm2.pkl')
    assert type(teacher_io.load_network('s3://bucket/edm2.pkl')).__name__ == 'EDM2Precond'
    assert fetched == ['s3://bucket/edm2.pkl']

#----------------------------------------------------------------------------
# Our own formats.

def test_snapshot_and_export_round_trip(tmp_path):
    arch, kwargs, _, _ = CASES['edm2']
    net = random_net(arch, {**kwargs, 'aux_t_embed': 'gated'})
    extra = dict(kimg=1234, sigma_rel=torch.tensor(0.085), grid=[80.0, 0.17])
    teacher_io.save_snapshot(tmp_path / 'snap.pt', net, extra)
    teacher_io.export_safetensors(net, tmp_path / 'export')
    assert sorted(p.name for p in (tmp_path / 'export').iterdir()) == ['config.json', 'model.safetensors']
    snap, snap_extra = teacher_io.load_snapshot(tmp_path / 'snap.pt')
    assert snap_extra['kimg'] == 1234 and torch.equal(snap_extra['sigma_rel'], extra['sigma_rel'])
    for loaded in (snap, teacher_io.load_export(tmp_path / 'export'),
                   teacher_io.load_network(tmp_path / 'snap.pt'), teacher_io.load_network(tmp_path / 'export')):
        assert type(loaded) is type(net) and loaded.init_kwargs == net.init_kwargs and not loaded.training
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())
