"""moe-train and moe-eval as a user runs them: random search with a reusable best configuration, JSON metrics."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from moevit.cli.train import SEARCH_SPACE

SPEC = "synthetic:classes=3,per_class=16,size=32"


def _run(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_search_writes_a_table_and_a_reusable_best_config(tmp_path):
    # One batch per epoch (the 34 search-train images; 38 train): what a step costs here is mostly per step, not per
    # image, so batches of 8 made the search 62 s of CPU and 286 s wall at load 4-5 (76 s CPU, 277 s at load 10-12)
    # against _run's 300 s; with one batch, 27 s CPU, 56 s wall at load 3-4. Still two trials of different sampled
    # rates, ranked on val, the best reused.
    r = _run("moevit.cli.train", "--data", SPEC, "--image-size", "32", "--epochs", "1", "--batch-size", "64",
             "--search", "2", "--out", str(tmp_path / "s"), "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "s" / "search.csv").open()))
    assert len(rows) == 2 and set(SEARCH_SPACE) <= set(rows[0]) and "val_top1" in rows[0]
    assert float(rows[0]["val_top1"]) >= float(rows[1]["val_top1"])  # best first
    assert rows[0]["lr_head"] != rows[1]["lr_head"]  # each trial drew its own rates
    best = json.loads((tmp_path / "s" / "best_config.json").read_text())
    assert best["lr_head"] == pytest.approx(float(rows[0]["lr_head"]))
    assert "val_top1" in r.stdout and "best val top-1" in r.stdout
    # reused: the run's config.json carries the searched rates
    r2 = _run("moevit.cli.train", "--data", SPEC, "--image-size", "32", "--epochs", "1", "--batch-size", "64",
              "--config", str(tmp_path / "s" / "best_config.json"), "--out", str(tmp_path / "final"), "--no-progress")
    assert r2.returncode == 0, r2.stderr[-2000:]
    used = json.loads((tmp_path / "final" / "config.json").read_text())
    assert used["lr_head"] == pytest.approx(best["lr_head"]) and used["mixup"] == best["mixup"]

    ev = _run("moevit.cli.eval", "--model", str(tmp_path / "final" / "best.safetensors"), "--data", SPEC, "--json")
    assert ev.returncode == 0, ev.stderr
    out = json.loads(ev.stdout)
    assert 0 <= out["top1"] <= out["top5"] <= 1 and out["params"] > 1e6 and out["macs"] > 0
    assert out["image_size"] == 32 and len(out["per_class"]) == 3


@pytest.mark.slow
def test_bad_flags_are_one_clear_line(tmp_path):
    with ThreadPoolExecutor(2) as pool:  # two independent processes, seconds of imports each: at once
        train = pool.submit(_run, "moevit.cli.train", "--data", "nonsense:x", "--out", str(tmp_path / "x"))
        ev = pool.submit(_run, "moevit.cli.eval", "--model", str(tmp_path / "missing.safetensors"), "--data", "digits")
    r = train.result()
    assert r.returncode == 2 and "nonsense" in r.stderr and "Traceback" not in r.stderr
    r = ev.result()
    assert r.returncode == 2 and "no such checkpoint" in r.stderr


def test_a_data_fraction_out_of_range_is_refused_before_any_data_is_read(tmp_path, capsys):
    from moevit.cli.train import main

    assert main(["--data", "digits", "--out", str(tmp_path / "x"), "--train-fraction", "0"]) == 2
    err = capsys.readouterr().err
    assert "--train-fraction must be in (0, 1], got 0.0" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
