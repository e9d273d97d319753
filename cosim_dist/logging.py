"""Run logging: console status, tqdm progress with images/s and ETA, JSONL scalars, wandb (offline by
default) and PNG sample grids. Only rank 0 writes."""

import json
import logging
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

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

#----------------------------------------------------------------------------

class RunLogger:
    """Scalars to <run_dir>/<name>.jsonl and wandb; a progress bar counted in images."""

    def __init__(self, run_dir: pathlib.Path, name: str, config: dict[str, Any], wandb_mode: str = 'offline',
                 project: str = 'cosim-dist', progress: bool = True, rank: int = 0) -> None:
        self.enabled = rank == 0
        self.progress_enabled = progress and self.enabled
        self.bar: tqdm | None = None
        self.wandb = None
        if not self.enabled:
            return
        self.jsonl = open(run_dir / f'{name}.jsonl', 'a')
        if wandb_mode != 'disabled':
            os.environ.setdefault('WANDB_SILENT', 'true')
            import wandb
            self.wandb = wandb.init(project=project, name=f'{run_dir.name}-{name}', dir=str(run_dir), config=config,
                                    mode=wandb_mode, resume='allow', id=f'{run_dir.name}-{name}'.replace('/', '_'))

    def start(self, total_img: int, done_img: int, desc: str) -> None:
        if self.progress_enabled:
            self.bar = tqdm(total=total_img, initial=done_img, desc=desc, unit='img', unit_scale=True,
                            dynamic_ncols=True, smoothing=0.1)

    def advance(self, nimg: int, **postfix: float) -> None:
        if self.bar is not None:
            self.bar.update(nimg)
            if postfix:
                self.bar.set_postfix({k: f'{v:.4g}' for k, v in postfix.items()}, refresh=False)

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
