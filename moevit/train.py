"""Fine-tuning loop of the paper (§3.2.2): AdamW over three parameter groups, flip, MixUp, classifier dropout,
cosine schedule with warm-up, evaluation each epoch, safetensors checkpoints and exact resume.

Resume is exact because every random choice of a step (batch order, flips, MixUp, dropout) is drawn from a
generator seeded by (seed, epoch, step), never from state that a restart would lose.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset
from tqdm import tqdm

from moevit.checkpoint import load_checkpoint, save_checkpoint
from moevit.deploy.files import atomic_path
from moevit.mobilevitv2 import MobileViTV2
from moevit.moe.layer import MoELayer

GROUPS = ("moe", "head", "rest")


@dataclass
class TrainConfig:
    """Hyperparameters of one run. Learning rates and weight decays per parameter group."""

    epochs: int = 10
    batch_size: int = 32
    lr_moe: float = 1e-3
    lr_head: float = 2e-3
    lr_rest: float = 5e-4
    wd_moe: float = 0.01
    wd_head: float = 0.05
    wd_rest: float = 0.05
    warmup_epochs: float = 1.0
    mixup: float = 0.0  # Beta(α, α) parameter; 0 disables MixUp
    mixup_prob: float = 1.0
    flip: float = 0.5
    label_smoothing: float = 0.0
    seed: int = 0
    save_every: int = 50  # steps between mid-epoch checkpoints (resume loses at most this many)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training options: {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def param_groups(model: MobileViTV2, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Three AdamW groups: MoE layers, classifier, everything else (each with its own lr and weight decay)."""
    moe_ids = {id(p) for m in model.modules() if isinstance(m, MoELayer) for p in m.parameters()}
    head_ids = {id(p) for p in model.head.parameters()}
    groups: dict[str, list[torch.nn.Parameter]] = {g: [] for g in GROUPS}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        groups["moe" if id(p) in moe_ids else "head" if id(p) in head_ids else "rest"].append(p)
    return [{"name": g, "params": groups[g], "lr": getattr(cfg, f"lr_{g}"), "weight_decay": getattr(cfg, f"wd_{g}")}
            for g in GROUPS if groups[g]]


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to zero."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _gen(*keys: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(hash(keys) & 0x7FFF_FFFF_FFFF)
    return g


def _collate(dataset: Dataset, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in idx]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)


@torch.no_grad()
def evaluate(model: MobileViTV2, dataset: Dataset, *, batch_size: int = 64, num_classes: int | None = None,
             progress: bool = False) -> dict[str, Any]:
    """top-1, top-5 and per-class accuracy (fractions) and the mean loss of ``model`` on ``dataset``."""
    model.eval()
    order = list(range(len(dataset)))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    zs, ys = [], []
    for idx in tqdm(batches, desc="eval", disable=not progress, leave=False):
        x, y = _collate(dataset, idx)
        zs.append(model(x))
        ys.append(y)
    n_cls = num_classes or model.config.num_classes
    if not zs:
        return scores(torch.zeros(0, n_cls), torch.zeros(0, dtype=torch.long), n_cls)
    return scores(torch.cat(zs), torch.cat(ys), n_cls)


def scores(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """top-1, top-5 and per-class accuracy (fractions; a class without images: None) and the mean loss of
    ``logits`` [N, C] against ``labels`` [N]."""
    labels = labels.long()
    total = len(labels)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit1 = top[:, 0] == labels
    per_cls_n = torch.bincount(labels, minlength=num_classes).float()
    per_cls_hit = torch.bincount(labels[hit1], minlength=num_classes).float()
    per_class = [float(h / n) if n else None for h, n in zip(per_cls_hit, per_cls_n, strict=True)]
    return {"top1": int(hit1.sum()) / max(1, total), "top5": int((top == labels[:, None]).any(dim=1).sum())
            / max(1, total), "loss": float(F.cross_entropy(logits.float(), labels, reduction="sum")) / max(1, total),
            "per_class": per_class, "n": total}


class Trainer:
    """Trains ``model`` on ``train_set``, evaluating on ``eval_set`` each epoch, writing into ``out``.

    Files in ``out``: ``last.safetensors`` and ``best.safetensors`` (models), ``train_state.safetensors``
    (optimizer and position, for resume), ``metrics.jsonl`` (one line per epoch), ``config.json``.
    """

    def __init__(self, model: MobileViTV2, train_set: Dataset, eval_set: Dataset | None, cfg: TrainConfig,
                 out: str | Path, *, progress: bool = True, log: Callable[[str], None] = print) -> None:
        self.model, self.train_set, self.eval_set, self.cfg = model, train_set, eval_set, cfg
        self.out = Path(out)
        self.progress, self.log = progress, log
        self.num_classes = model.config.num_classes
        self.opt = torch.optim.AdamW(param_groups(model, cfg), betas=(0.9, 0.999))
        self.steps_per_epoch = max(1, len(train_set) // cfg.batch_size)  # drop_last: BatchNorm needs > 1
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup_steps = int(cfg.warmup_epochs * self.steps_per_epoch)
        self.step = 0
        self.best = -1.0
        self.best_step = 0  # the step of best.safetensors
        self.history: list[dict[str, Any]] = []

    # -- persistence -----------------------------------------------------------------------------------------
    def _save_state(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.model, self.out / "last.safetensors", extra={"step": str(self.step)})
        tensors: dict[str, torch.Tensor] = {}
        sd = self.opt.state_dict()
        for pid, st in sd["state"].items():
            for k, v in st.items():
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu() if torch.is_tensor(v) else torch.tensor(v)
        meta = {"step": self.step, "best": self.best, "best_step": self.best_step, "cfg": asdict(self.cfg),
                "param_groups": sd["param_groups"]}
        with atomic_path(self.out / "train_state.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})

    def try_resume(self) -> bool:
        """Continue from ``out``'s last checkpoint if there is one; returns whether it did."""
        state_path, model_path = self.out / "train_state.safetensors", self.out / "last.safetensors"
        if not (state_path.exists() and model_path.exists()):
            return False
        from safetensors import safe_open

        with safe_open(str(state_path), framework="pt") as f:
            meta = json.loads(f.metadata()["meta"])
        tensors = load_file(str(state_path))
        saved = load_checkpoint(model_path, verify=True)
        if saved.config.to_dict() != self.model.config.to_dict():
            was, now = saved.config.to_dict(), self.model.config.to_dict()
            diff = ", ".join(f"{k} {was.get(k)!r} (this run: {now.get(k)!r})" for k in sorted({*was, *now})
                             if was.get(k) != now.get(k))
            raise ValueError(f"{self.out}: holds a run whose model differs in {diff}; use a new --out, or the "
                             "settings of that run to resume it")
        self.model.load_state_dict(saved.state_dict())
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in tensors.items():
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = v
        self.opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.step, self.best = int(meta["step"]), float(meta["best"])
        self.best_step = int(meta.get("best_step", 0))
        metrics = self.out / "metrics.jsonl"
        if metrics.exists():
            self.history = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        self.log(f"resuming {self.out} at step {self.step}/{self.total_steps}")
        return True

    # -- one step --------------------------------------------------------------------------------------------
    def _batch(self, epoch: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        perm = torch.randperm(len(self.train_set), generator=_gen(self.cfg.seed, epoch))
        idx = perm[i * self.cfg.batch_size:(i + 1) * self.cfg.batch_size].tolist()
        return _collate(self.train_set, idx)

    def _augment(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.flip > 0:
            flip = torch.rand(len(x), generator=g) < self.cfg.flip
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        target = F.one_hot(y, self.num_classes).float()
        if self.cfg.mixup > 0 and float(torch.rand(1, generator=g)) < self.cfg.mixup_prob:
            lam = float(torch.distributions.Beta(self.cfg.mixup, self.cfg.mixup).sample())
            perm = torch.randperm(len(x), generator=g)
            x = lam * x + (1 - lam) * x[perm]
            target = lam * target + (1 - lam) * target[perm]
        if self.cfg.label_smoothing > 0:
            target = target * (1 - self.cfg.label_smoothing) + self.cfg.label_smoothing / self.num_classes
        return x, target

    def train_step(self, epoch: int, i: int) -> float:
        self.model.train()
        g = _gen(self.cfg.seed, epoch, i, 1)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))  # dropout and Beta draws
        x, y = self._batch(epoch, i)
        x, target = self._augment(x, y, g)
        f = lr_factor(self.step, self.total_steps, self.warmup_steps)
        for group in self.opt.param_groups:
            group["lr"] = getattr(self.cfg, f"lr_{group['name']}") * f
        loss = torch.sum(-target * F.log_softmax(self.model(x), dim=1), dim=1).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1
        return float(loss.detach())

    # -- the run ---------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(asdict(self.cfg), indent=2))
        spe = self.steps_per_epoch
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, unit="step",
                   desc="train", dynamic_ncols=True)
        t0, seen = time.perf_counter(), 0
        while self.step < self.total_steps:
            epoch, i = divmod(self.step, spe)
            loss = self.train_step(epoch, i)
            seen += self.cfg.batch_size
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
            if self.step % spe == 0:
                self._end_epoch(epoch, time.perf_counter() - t0, seen)
            elif self.cfg.save_every and self.step % self.cfg.save_every == 0:
                self._save_state()
        bar.close()
        return self.history[-1] if self.history else {}

    def _end_epoch(self, epoch: int, elapsed: float, seen: int) -> None:
        row: dict[str, Any] = {"epoch": epoch + 1, "step": self.step, "images_per_s": seen / max(elapsed, 1e-9)}
        if self.eval_set is not None and len(self.eval_set):
            row.update(evaluate(self.model, self.eval_set, batch_size=max(64, self.cfg.batch_size)))
        metric = row.get("top1", -float(epoch))
        self.history.append(row)
        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        if metric > self.best:
            self.best = metric
            self.best_step = self.step
            save_checkpoint(self.model, self.out / "best.safetensors", extra={"epoch": str(epoch + 1)})
        self._save_state()
        if "top1" in row:
            self.log(f"epoch {epoch + 1}/{self.cfg.epochs}: top-1 {row['top1']:.3f}  top-5 {row['top5']:.3f}  "
                     f"eval loss {row['loss']:.3f}  ({row['images_per_s']:.0f} img/s)")
