"""Network files: official EDM / EDM2 / SiD pickles read without NVIDIA's code, our own snapshots, and the pickle-free
export (safetensors + JSON) of a distilled generator.

Official pickles (docs/ALGORITHM.md, "Reference facts") hold
`torch_utils.persistence` records {module_src, class_name, state}. A restricted unpickler maps each record to plain
data and refuses every global outside an explicit allow-list; `module_src` is never executed. The architecture comes
from the recorded constructor arguments (`_init_kwargs`), the weights from the records' parameters and buffers.
"""

import collections
import io
import json
import os
import pathlib
import pickle
import zipfile

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import storage
from .nets import ARCHS, build_network

#----------------------------------------------------------------------------
# Restricted unpickling: persistence records and containers become plain data.

class PersistentRecord:
    """Stands for `torch_utils.persistence._reconstruct_persistent_obj(meta)`: keeps the class name and the object's
    state (`__dict__`), drops the module source."""

    def __init__(self, meta: dict) -> None:
        self.class_name, self.state = meta['class_name'], meta['state']

class ContainerRecord:
    """Stands for a plain torch container (ModuleDict, ModuleList, Sequential) pickled by value: keeps its state."""

    def __setstate__(self, state: dict) -> None:
        self.state = state

class EasyDict(dict):
    """Stands for `dnnlib.util.EasyDict`, the top-level object of EDM2 pickles."""

def _load_storage(data: bytes):
    """`torch.storage._load_from_bytes` with weights_only=True (the legacy storage format needs nothing else)."""
    return torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)

try:
    from numpy._core import multiarray as _np_multiarray  # numpy >= 2
except ImportError:
    from numpy.core import multiarray as _np_multiarray

ALLOWED = {
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): PersistentRecord,
    ('dnnlib.util', 'EasyDict'): EasyDict,
    ('torch.nn.modules.container', 'ModuleDict'): ContainerRecord,
    ('torch.nn.modules.container', 'ModuleList'): ContainerRecord,
    ('torch.nn.modules.container', 'Sequential'): ContainerRecord,
    ('torch.storage', '_load_from_bytes'): _load_storage,
    ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('builtins', 'set'): set,
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
    **{(m, name): getattr(_np_multiarray, name)                       # numpy arrays and scalars (EDM2 encoder)
       for m in ('numpy.core.multiarray', 'numpy._core.multiarray') for name in ('_reconstruct', 'scalar')},
}

class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f'refusing to load {module}.{name}: not in the teacher_io allow-list '
                                         f'(official EDM, EDM2 and SiD pickles need nothing else)')
        return ALLOWED[module, name]

#----------------------------------------------------------------------------
# Records -> (architecture, kwargs, state_dict).

_DROPPED = ('use_fp16', 'sigma_min', 'sigma_max')  # precision and sampler clamps, not architecture
_FIXED = {                                          # official options our nets implement for one value only
    'songunet': dict(embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
                     decoder_type='standard', resample_filter=[1, 1], label_dropout=0),
    'dhariwalunet': dict(label_dropout=0),
    'edm2': dict(resample_filter=[1, 1]),
}

def architecture(record: PersistentRecord) -> tuple[str, dict]:
    """(ARCHS key, constructor kwargs) of an official EDMPrecond or EDM2 Precond record, from `_init_kwargs`."""
    if record.state.get('_init_args'):
        raise ValueError(f'{record.class_name} was built with positional arguments {record.state["_init_args"]}; '
                         f'expected keyword arguments only')
    kwargs = {k: v for k, v in dict(record.state['_init_kwargs']).items() if k not in _DROPPED}
    if record.class_name == 'EDMPrecond':
        model_type = kwargs.pop('model_type', 'DhariwalUNet')
        if model_type not in ('SongUNet', 'DhariwalUNet'):
            raise ValueError(f'EDMPrecond with model_type={model_type!r} is not supported (SongUNet, DhariwalUNet)')
        arch = model_type.lower()
    elif record.class_name == 'Precond':
        arch = 'edm2'
    else:
        raise ValueError(f'network class {record.class_name!r} is not supported (EDMPrecond, EDM2 Precond)')
    for key, value in _FIXED[arch].items():
        if key in kwargs and (list(kwargs[key]) if isinstance(value, list) else kwargs[key]) != value:
            raise ValueError(f'{record.class_name}: {key}={kwargs[key]!r} is not supported (only {value!r})')
        kwargs.pop(key, None)
    return arch, kwargs

def record_state_dict(record: PersistentRecord | ContainerRecord, prefix: str = '') -> dict[str, torch.Tensor]:
    """The `state_dict()` of the module a record stands for: persistent, non-None parameters and buffers, named
    by their path of `_modules` keys."""
    state, out = record.state, {}
    skip = state.get('_non_persistent_buffers_set', set())
    for group in ('_parameters', '_buffers'):
        out.update({prefix + k: v for k, v in state.get(group, {}).items() if v is not None and k not in skip})
    for name, child in state.get('_modules', {}).items():
        if child is not None:
            if not isinstance(child, (PersistentRecord, ContainerRecord)):
                raise ValueError(f'module {prefix}{name} is a {type(child).__name__}, not a module record')
            out.update(record_state_dict(child, f'{prefix}{name}.'))
    return out

#----------------------------------------------------------------------------
# Locating files: local paths, file:// and s3:// URLs.

def local_path(path_or_url: str | os.PathLike) -> pathlib.Path:
    scheme, rest = storage.parse_url(path_or_url)
    if scheme == 's3':
        return storage.fetch_to_local(path_or_url)
    path = pathlib.Path(rest).expanduser()
    if not path.exists():
        raise FileNotFoundError(f'network file {path} does not exist: download the official .pkl (or copy the '
                                f'snapshot) there, or pass its correct local path, file:// or s3:// URL')
    return path

def _uninitialised(arch: str, kwargs: dict) -> torch.nn.Module:
    """The network with allocated but unset weights (all of them are loaded next; saves a random init)."""
    with torch.device('meta'):
        net = build_network(arch, **kwargs)
    return net.to_empty(device='cpu')

def _frozen(net: torch.nn.Module) -> torch.nn.Module:
    return net.float().eval().requires_grad_(False)

#----------------------------------------------------------------------------
# Entry point.

def load_network(path_or_url: str | os.PathLike) -> torch.nn.Module:
    """Our preconditioned denoiser (fp32, eval mode, frozen) from an official EDM / EDM2 / SiD pickle (the 'ema'
    network), one of our snapshots (save_snapshot) or an export directory (export_safetensors)."""
    return load_network_and_extra(path_or_url)[0]

def load_network_and_extra(path_or_url: str | os.PathLike) -> tuple[torch.nn.Module, dict]:
    """load_network's network and, for our snapshots, their `extra` metadata (else {})."""
    path = local_path(path_or_url)
    if path.is_dir():
        return load_export(path), {}
    if zipfile.is_zipfile(path):
        return load_snapshot(path)
    with open(path, 'rb') as f:
        data = RestrictedUnpickler(f).load()
    ema = data.get('ema') if isinstance(data, dict) else None
    if not isinstance(ema, PersistentRecord):
        raise ValueError(f'{path} holds no official network under "ema" '
                         f'(found {sorted(data) if isinstance(data, dict) else type(data).__name__})')
    arch, kwargs = architecture(ema)
    net = _uninitialised(arch, kwargs)
    state = record_state_dict(ema)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f'{path}: {ema.class_name} weights do not match architecture {arch!r} {kwargs}: '
                         f'{len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}')
    return _frozen(net), {}

#----------------------------------------------------------------------------
# Our own formats. Snapshot: torch.save of {arch, init_kwargs, state_dict, extra}, read with weights_only=True.
# Export: model.safetensors + config.json {arch, init_kwargs}, no pickle at all.

def arch_name(net: torch.nn.Module) -> str:
    """The ARCHS key of net's class."""
    for name, cls in ARCHS.items():
        if type(net) is cls:
            return name
    raise ValueError(f'{type(net).__name__} is not registered in cosim_dist.nets.ARCHS')

def save_snapshot(path: str | os.PathLike, net: torch.nn.Module, extra: dict | None = None) -> None:
    """Atomically write net (architecture, constructor kwargs, weights) and `extra` (plain data and tensors)."""
    data = dict(arch=arch_name(net), init_kwargs=net.init_kwargs, state_dict=net.state_dict(), extra=extra or {})
    storage.write_atomic(pathlib.Path(path), lambda tmp: torch.save(data, tmp))

def load_snapshot(path: str | os.PathLike) -> tuple[torch.nn.Module, dict]:
    """(net in fp32, eval mode, frozen; extra) from a save_snapshot file."""
    data = torch.load(local_path(path), map_location='cpu', weights_only=True)
    net = _uninitialised(data['arch'], data['init_kwargs'])
    net.load_state_dict(data['state_dict'])
    return _frozen(net), data.get('extra', {})

def export_safetensors(net: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Write `model.safetensors` (weights) and `config.json` (arch, init_kwargs) into directory."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, directory / 'model.safetensors')
    (directory / 'config.json').write_text(json.dumps(dict(arch=arch_name(net), init_kwargs=net.init_kwargs), indent=2))

def load_export(directory: str | os.PathLike) -> torch.nn.Module:
    """The net of an export_safetensors directory, fp32, eval mode, frozen."""
    directory = local_path(directory)
    config = json.loads((directory / 'config.json').read_text())
    net = _uninitialised(config['arch'], config['init_kwargs'])
    net.load_state_dict(load_file(directory / 'model.safetensors'))
    return _frozen(net)
