"""Which process this is, from the launcher's environment alone: readable before torch is imported (`cli.entry`)."""
from __future__ import annotations

import os


def launched() -> bool:
    """True inside a worker that torchrun (or another launcher setting RANK and WORLD_SIZE) started."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def local_rank(default: int = 0) -> int:
    """This worker's index on its node (the launcher's LOCAL_RANK), else `default`."""
    return int(os.environ.get("LOCAL_RANK", default))
