"""Training engines: a network, its optimiser and the step around them.

`TorchEngine` is the single-process engine (plain torch Adam). It exposes the subset of the DeepSpeed
engine interface the trainer uses (`module`, `backward`, `step`, `state_dict`), so that DeepSpeed engines
drop in for multi-process ZeRO training."""

import torch

class TorchEngine:
    """One trained network with Adam; gradients are nan_to_num'ed before each step (Eq. L1)."""

    def __init__(self, module: torch.nn.Module, lr: float, betas: tuple[float, float], eps: float) -> None:
        self.module = module
        self.optimizer = torch.optim.Adam(module.parameters(), lr=lr, betas=betas, eps=eps)

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        for p in self.module.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {'module': self.module.state_dict(), 'optimizer': self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state['module'])
        self.optimizer.load_state_dict(state['optimizer'])
