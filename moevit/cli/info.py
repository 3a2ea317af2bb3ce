"""``moevit-info FILE``: what a checkpoint holds: parameters, MACs per image, and its MoE layers."""

from __future__ import annotations

import argparse
import sys

from moevit.checkpoint import load_checkpoint, model_fingerprint
from moevit.cli.runner import run_cli
from moevit.flops import count_macs, count_params


def describe(path: str, image_size: int = 256) -> str:
    model = load_checkpoint(path)
    cfg = model.config
    lines = [
        f"file          {path}",
        f"architecture  {cfg.arch}  ({cfg.num_classes} classes)",
        f"fingerprint   {model_fingerprint(model)}",
        f"parameters    {count_params(model):,}",
        f"MACs/image    {count_macs(model, image_size):,}  at {image_size}x{image_size}",
    ]
    moe = model.moe_layers()
    if not moe:
        lines.append("MoE layers    none (dense)")
    else:
        m = cfg.moe
        lines.append(f"MoE           layers {list(m.layers)}, top-{m.top_k}, gate {m.gate}, correction {m.correction}")
        lines.append(f"  {'layer':>5} {'dim':>4} {'experts':>7} {'K':>4} {'params/expert':>13} {'layer params':>12}")
        for i, layer in moe.items():
            per_expert = sum(p[0].numel() for p in layer.experts.parameters())
            total = sum(p.numel() for p in layer.parameters())
            lines.append(f"  {i:>5} {layer.experts.dim:>4} {layer.num_experts:>7} {layer.experts.hidden:>4} "
                         f"{per_expert:>13,} {total:>12,}")
    if cfg.labels:
        shown = ", ".join(cfg.labels[:10]) + (" …" if len(cfg.labels) > 10 else "")
        lines.append(f"labels        {shown}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="moevit-info", description=__doc__)
    ap.add_argument("file", help="a moevit .safetensors checkpoint")
    ap.add_argument("--image-size", type=int, default=256, help="input side for the MAC count (default 256)")
    args = ap.parse_args(argv)
    if not 8 <= args.image_size <= 2048:  # 0 or less cannot be counted; 100000 px would need terabytes
        print(f"moevit-info: error: --image-size must be 8-2048 pixels, got {args.image_size}", file=sys.stderr)
        return 2
    return run_cli("moevit-info", lambda: print(describe(args.file, args.image_size)))


if __name__ == "__main__":
    sys.exit(main())
