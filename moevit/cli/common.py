"""Shared pieces of the console scripts: error reporting, thread settings, model loading."""

from __future__ import annotations

import torch
from tqdm import tqdm

from moevit.cli.runner import run_cli  # noqa: F401 (re-exported: the scripts import it from here)


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


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
