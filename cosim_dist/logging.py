"""Run logging: EDM2-style console status lines (one per logging interval), a tqdm bar only on a terminal, JSONL
scalars, wandb (offline by default; one run per invocation, grouped by run name) and PNG sample grids. Only rank 0
writes."""

import contextlib
import datetime
import json
import logging
import os
import pathlib
import resource
import secrets
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger('cosim_dist')

def setup_console(rank: int = 0) -> None:
    """Plain `[cosim_dist] message` lines on stderr from rank 0; warnings from every rank."""
    if log.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter('[cosim_dist] %(message)s'))
    log.addHandler(handler)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False

def peak_memory() -> int:
    """Peak bytes: CUDA max allocated when CUDA is in use, else the process's peak resident set (Linux: KiB)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

#----------------------------------------------------------------------------

class RunLogger:
    """Scalars to <run_dir>/<name>.jsonl and wandb, a status line per logging interval, and a progress bar counted
    in images when stderr is a terminal (logging.progress)."""

    def __init__(self, run_dir: pathlib.Path, name: str, config: dict[str, Any], wandb_mode: str = 'offline',
                 project: str = 'cosim-dist', progress: bool = True, rank: int = 0) -> None:
        self.enabled = rank == 0
        self.progress_enabled = progress and self.enabled and sys.stderr.isatty()
        self.bar: tqdm | None = None
        self.redirect = contextlib.ExitStack()        # log lines through tqdm.write while the bar is shown
        self.wandb = None
        self.total, self.last = 0, (0, time.time())   # images to reach; (images, time) of the last status line
        if not self.enabled:
            return
        self.jsonl = open(run_dir / f'{name}.jsonl', 'a')
        if wandb_mode != 'disabled':
            os.environ.setdefault('WANDB_SILENT', 'true')
            import wandb
            stamp = datetime.datetime.now(datetime.UTC).strftime('%Y%m%d-%H%M%S')
            run_id = f'{run_dir.name}-{name}-{stamp}-{secrets.token_hex(3)}'.replace('/', '_')
            self.wandb = wandb.init(project=project, name=f'{run_dir.name}-{name}', id=run_id, group=run_dir.name,
                                    job_type=name, dir=str(run_dir), config=config, mode=wandb_mode)

    def start(self, total_img: int, done_img: int, desc: str) -> None:
        self.total, self.last = total_img, (done_img, time.time())
        if self.progress_enabled:
            self.redirect.enter_context(logging_redirect_tqdm([log]))
            self.bar = tqdm(total=total_img, initial=done_img, desc=desc, unit='img', unit_scale=True,
                            dynamic_ncols=True, smoothing=0.1)

    def advance(self, nimg: int, **postfix: float) -> None:
        if self.bar is not None:
            self.bar.update(nimg)
            if postfix:
                self.bar.set_postfix({k: f'{v:.4g}' for k, v in postfix.items()}, refresh=False)

    def status(self, nimg: int, losses: dict[str, float], **extra: float) -> None:
        """One logging interval: `kimg 12.0  loss/aux 0.123  ...  s/kimg 3.21  img/s 311.5  mem 1.23 GiB  eta 0:12:34`
        on the console; the losses, images/s and `extra` as scalars."""
        if not self.enabled:
            return
        done, t0 = self.last
        now = time.time()
        rate = (nimg - done) / max(now - t0, 1e-9)
        self.last = (nimg, now)
        eta = datetime.timedelta(seconds=round(max(self.total - nimg, 0) / rate)) if rate > 0 else '?'
        fields = [f'kimg {nimg / 1000:.1f}', *(f'{k} {v:.4g}' for k, v in losses.items()),
                  f's/kimg {1000 / max(rate, 1e-9):.2f}', f'img/s {rate:.1f}', f'mem {peak_memory() / 2**30:.2f} GiB',
                  f'eta {eta}']
        log.info('  '.join(fields))
        self.scalars(nimg, losses | {'perf/img_per_s': rate} | extra)

    @contextlib.contextmanager
    def maintenance(self):
        """Time spent inside (checkpoints, snapshots) is left out of the next status line's s/kimg and images/s."""
        t0 = time.time()
        try:
            yield
        finally:
            done, since = self.last
            self.last = (done, since + time.time() - t0)

    def scalars(self, step_img: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({'nimg': step_img, 'time': time.time(), **values}) + '\n')
        self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step_img)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.redirect.close()
        if self.enabled:
            self.jsonl.close()
            if self.wandb is not None:
                self.wandb.finish()

#----------------------------------------------------------------------------

GRID_PADDING = 2                   # pixels between the cells of a sample grid (and around it)

def save_image_grid(images: torch.Tensor, path: pathlib.Path, rows: int, labels: Sequence[str] = ()) -> None:
    """Write uint8 images [N, C, H, W] as one RGB PNG grid with `rows` rows, `GRID_PADDING` white pixels apart and
    around, each row named by its entry of `labels` in a left margin (PIL's default font). Small images are enlarged
    (nearest neighbour) to at least 64 pixels so that the grid is readable."""
    from torchvision.utils import make_grid
    n, _, h, w = images.shape
    scale = max(1, 64 // max(h, w))
    x = images.cpu().repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    grid = make_grid(x, nrow=-(-n // rows), padding=GRID_PADDING, pad_value=255)   # 1 channel -> 3
    cells = Image.fromarray(grid[:3].permute(1, 2, 0).numpy())
    font = ImageFont.load_default()
    boxes = [font.getbbox(t) for t in labels]
    margin = max(b[2] for b in boxes) + 2 * GRID_PADDING if labels else 0
    canvas = Image.new('RGB', (margin + cells.width, cells.height), 'white')
    canvas.paste(cells, (margin, 0))
    draw, size = ImageDraw.Draw(canvas), h * scale
    for r, (text, box) in enumerate(zip(labels, boxes)):          # centred on its row
        y = GRID_PADDING + r * (size + GRID_PADDING) + (size - box[1] - box[3]) // 2
        draw.text((GRID_PADDING, y), text, fill='black', font=font)
    canvas.save(path)
