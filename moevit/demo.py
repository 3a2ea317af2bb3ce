"""``make demo``: the main job end to end on this machine.

For now (before training and split inference land) it builds an MoE MobileViTV2-0.5, saves it, and prints what
the checkpoint holds.
"""

from __future__ import annotations

from pathlib import Path

import moevit
from moevit.checkpoint import save_checkpoint
from moevit.cli.info import describe


def main() -> None:
    out = Path("runs/demo")
    model = moevit.create_model("mobilevitv2_050", num_classes=10, moe=moevit.MoEConfig(layers=(8,), num_experts=16))
    path = save_checkpoint(model, out / "moe-untrained.safetensors")
    print(describe(str(path)))


if __name__ == "__main__":
    main()
