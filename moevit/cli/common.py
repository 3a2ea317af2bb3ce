"""Shared pieces of the console scripts: error reporting, thread settings, model loading."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from moevit.checkpoint import CheckpointError


def run_cli(prog: str, body: Callable[[], int | None]) -> int:
    """Run ``body``, turning the errors a user can fix into one clear line and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format=f"{prog}: %(levelname)s: %(message)s")
    try:
        return int(body() or 0)
    except (CheckpointError, ValueError, FileNotFoundError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


def existing_file(path: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return p


class StageBar:
    """A progress bar over named stages: call it with each stage's name as the stage starts."""

    def __init__(self, total: int, desc: str) -> None:
        self.bar = tqdm(total=total, desc=desc, unit="stage", dynamic_ncols=True)
        self.started = False

    def __call__(self, name: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_postfix_str(name)

    def close(self) -> None:
        if self.started:
            self.bar.update(1)
        self.bar.close()
