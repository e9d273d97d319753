"""Teacher load time: write a randomly initialised EDM2 network (default: L, 777.5M parameters) as an official-layout
pickle with fp16 weights (tests/test_teacher_io.py's writer), then time cosim_dist.teacher_io.load_network on it.

    python benchmarks/teacher_load.py                  # edm2-l
    python benchmarks/teacher_load.py --channels 448   # edm2-xxl
"""

import argparse
import importlib.util
import pathlib
import tempfile
import time

import torch

from cosim_dist.nets import build_network
from cosim_dist.teacher_io import load_network

REPO = pathlib.Path(__file__).resolve().parents[1]

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--channels', type=int, default=320, help='EDM2 model_channels (320 = L)')
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location('_teacher_io_tests', REPO / 'tests' / 'test_teacher_io.py')
    writer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(writer)
    kwargs = dict(img_resolution=64, img_channels=4, label_dim=1000, model_channels=args.channels, dropout=0.1)
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / 'edm2.pkl'
        net = build_network('edm2', **kwargs)
        writer.write_official(path, writer.official_snapshot('edm2', net), {**kwargs, 'use_fp16': True},
                              pathlib.Path(tmp) / 'marker')
        params = sum(p.numel() for p in net.parameters())
        del net
        size = path.stat().st_size
        start = time.perf_counter()
        loaded = load_network(path)
        seconds = time.perf_counter() - start
    assert sum(p.numel() for p in loaded.parameters()) == params
    print(f'edm2 model_channels={args.channels}: {params / 1e6:.1f}M parameters, pickle {size / 2**30:.2f} GiB '
          f'loaded in {seconds:.1f} s (torch threads {torch.get_num_threads()})')

if __name__ == '__main__':
    main()
