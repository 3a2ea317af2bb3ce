"""Training: the recipe learns, parameter groups carry their rates, a killed run resumes to the same weights."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

import moevit
from moevit.checkpoint import load_checkpoint
from moevit.data import open_dataset
from moevit.train import TrainConfig, Trainer, evaluate, lr_factor, param_groups

SPEC = "synthetic:classes=3,per_class=24,size=32"


def _sets(size=32):
    return (open_dataset(SPEC, image_size=size, split="train", seed=0),
            open_dataset(SPEC, image_size=size, split="eval", seed=0))


def _moe_model():
    torch.manual_seed(0)
    return moevit.create_model("mobilevitv2_050", num_classes=3,
                               moe=moevit.MoEConfig(layers=(7, 8), num_experts=2, expert_hidden=8))


def test_parameter_groups_carry_the_requested_rates():
    cfg = TrainConfig(lr_moe=1e-2, lr_head=2e-2, lr_rest=3e-3, wd_moe=0.1, wd_head=0.2, wd_rest=0.3)
    model = _moe_model()
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert {n: (g["lr"], g["weight_decay"]) for n, g in groups.items()} == {
        "moe": (1e-2, 0.1), "head": (2e-2, 0.2), "rest": (3e-3, 0.3)}
    moe_params = {id(p) for layer in model.moe_layers().values() for p in layer.parameters()}
    assert {id(p) for p in groups["moe"]["params"]} == moe_params
    assert {id(p) for p in groups["head"]["params"]} == {id(model.head.fc.weight), id(model.head.fc.bias)}
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(model.parameters()))
    # and the optimizer applies them through the schedule
    train, _ = _sets()
    tr = Trainer(model, train, None, cfg, "/tmp/unused-moevit-test", progress=False)
    tr.train_step(0, 0)
    f = lr_factor(0, tr.total_steps, tr.warmup_steps)
    assert {g["name"]: g["lr"] for g in tr.opt.param_groups} == pytest.approx(
        {"moe": 1e-2 * f, "head": 2e-2 * f, "rest": 3e-3 * f})


def test_warmup_then_cosine():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10) == pytest.approx(0.0)


@pytest.mark.slow
def test_short_training_learns_and_beats_chance(tmp_path):
    train, held_out = _sets()
    model = moevit.create_model("mobilevitv2_050", num_classes=3)
    before = evaluate(model, held_out)
    cfg = TrainConfig(epochs=6, batch_size=12, lr_rest=3e-3, lr_head=5e-3, warmup_epochs=0.5, mixup=0.2, seed=0)
    Trainer(model, train, held_out, cfg, tmp_path, progress=False).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # top-1, not the loss: on a handful of held-out images an over-confident mistake can outweigh the loss of
    # several right answers, so the loss of a model that learned can still sit above the untrained one's
    assert len(rows) == 6 and rows[-1]["top1"] > before["top1"]
    assert rows[-1]["top1"] > 0.6  # chance is 1/3
    best = load_checkpoint(tmp_path / "best.safetensors")
    assert evaluate(best, held_out)["top1"] == pytest.approx(max(r["top1"] for r in rows))


class _Killed(Exception):
    """Stands for the process dying: raised right after a step, before anything of that step is saved."""


class _DiesAt(Trainer):
    """A Trainer whose run ends abruptly once ``die_at`` steps are done (a test-only subclass: the production
    config has no kill switch)."""

    def __init__(self, *args: Any, die_at: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.die_at = die_at

    def train_step(self, epoch: int, i: int) -> float:
        loss = super().train_step(epoch, i)
        if self.step >= self.die_at:
            raise _Killed
        return loss


@pytest.mark.slow
def test_resume_after_a_kill_gives_the_same_weights(tmp_path):
    train, held_out = _sets()
    cfg = TrainConfig(epochs=2, batch_size=12, save_every=3, mixup=0.4, seed=3)
    full = _moe_model()
    Trainer(full, train, held_out, cfg, tmp_path / "full", progress=False).fit()

    # killed after step 7 (4 steps per epoch): the last checkpoint is the periodic one at step 6
    with pytest.raises(_Killed):
        _DiesAt(_moe_model(), train, held_out, cfg, tmp_path / "cut", progress=False, die_at=7).fit()
    resumed = _moe_model()
    tr = Trainer(resumed, train, held_out, cfg, tmp_path / "cut", progress=False)
    assert tr.try_resume() and tr.step == 6
    tr.fit()
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    rows = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]
