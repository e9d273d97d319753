"""Local launcher: run a task in this process (CPU, or one GPU if present)."""

from cosim_dist.config import Config
from cosim_dist.logging import setup_console

def launch_local(cfg: Config) -> None:
    setup_console()
    from cosim_dist import tasks
    tasks.run(cfg)
