"""The generator's EMA (Eq. L1, step 3) on each rank's own elements of G: under ZeRO-3 its partitions, so the EMA
step gathers nothing; the full EMA network is gathered only when it is used (snapshots, checkpoints, the end of
training). Where a rank holds all of G, the EMA's elements are views of the EMA network itself (no second copy)."""

import torch

from . import cosim

class GeneratorEMA:
    def __init__(self, engine, device: torch.device) -> None:
        G = engine.module
        self.engine = engine
        self.net = type(G)(**G.init_kwargs).to(device).eval().requires_grad_(False)   # all of it after sync()
        params = dict(self.net.named_parameters())
        self.local: dict[str, torch.Tensor] = {}                # this rank's elements, flat
        self.range: dict[str, tuple[int, int]] = {}             # which elements of the flattened parameter
        for name, (values, (start, end)) in engine.local_parameters().items():
            whole = end - start == params[name].numel()
            self.local[name] = params[name].data.view(-1) if whole else torch.empty_like(values)
            self.local[name].copy_(values)
            self.range[name] = (start, end)
        self.synced = False
        self.sync()

    def update(self, beta: float) -> None:
        """Eq. L1 (EMA) on this rank's elements: no collective."""
        cosim.ema_update(self.local.values(), (v for v, _ in self.engine.local_parameters().values()), beta)
        self.synced = False

    def sync(self) -> None:
        """Collective (under ZeRO-3 every rank gathers every parameter): the full EMA network, and G's buffers."""
        if self.synced:
            return
        params = dict(self.net.named_parameters())
        for name, local in self.local.items():
            full = self.engine.gather_local(name, local)
            if full.data_ptr() != params[name].data_ptr():
                params[name].data.copy_(full.reshape(params[name].shape))
        for e, b in zip(self.net.buffers(), self.engine.module.buffers(), strict=True):
            e.copy_(b.reshape(e.shape))
        self.synced = True

    def get_full(self, name: str) -> torch.Tensor:
        """Collective under ZeRO-3: parameter `name` of the EMA, flat (for a checkpoint)."""
        return self.engine.gather_local(name, self.local[name])

    def set_local(self, name: str, values: torch.Tensor) -> None:
        """This rank's elements of parameter `name` (from a checkpoint)."""
        self.local[name].copy_(values)
        self.synced = False
