"""A newcomer's path (issue 22), walked as a user would: console scripts in real processes on real files.

Nothing silently wrong (unreadable files in --data mode are failures, never substitutes; class counts that differ
are refused by every command), every argument checked before anything starts, no lost work (resume with a smaller
--limit, moe-certs over an existing CA, another model's conversion report), output that says what happened.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from moevit.checkpoint import save_checkpoint
from tests.deploy import small_moe_model, write_topology
from tests.netutil import free_port, start_workers, stop

BIN = Path(sys.executable).parent
LABELS = ("a", "b", "c")


def run(prog: str, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """A console script as a user runs it."""
    return subprocess.run([str(BIN / prog), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def run_all(*calls: tuple) -> list[subprocess.CompletedProcess]:
    """:func:`run` of each call, (prog, *args) with an optional dict of run()'s keywords last, a few at a time: each
    is seconds of imports on one core, and none depends on another's outcome. The results in the calls' order. For
    commands refused at their checks: ones that go on to compute use every core's torch threads, and side by side
    they would only slow each other down."""
    def one(call: tuple) -> subprocess.CompletedProcess:
        kw = call[-1] if isinstance(call[-1], dict) else {}
        return run(*(call[:-1] if kw else call), **kw)

    with ThreadPoolExecutor(min(4, os.cpu_count() or 2)) as pool:
        return list(pool.map(one, calls))


def error_line(r: subprocess.CompletedProcess) -> str:
    """The one line a refused command prints (its stderr, stripped, must be exactly one line)."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def model3(tmp_path_factory) -> Path:
    """A 3-class MoE checkpoint at 32 px (layers 5 and 8, four experts each)."""
    m = small_moe_model((5, 8), num_experts=4, num_classes=3, labels=LABELS, image_size=32, calib_size=32)
    return save_checkpoint(m, tmp_path_factory.mktemp("model") / "moe.safetensors")


def _folder(root: Path, classes: int, per_class: int = 4, broken: dict[int, int] | None = None) -> Path:
    """An image folder, one sub-folder per class; ``broken`` class -> number of unreadable files in it."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
        for i in range((broken or {}).get(c, 0)):
            (d / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return root


def _topology(tmp: Path, model: Path, **kw) -> tuple[Path, dict[str, int]]:
    ports = {"cam": free_port(), "north": free_port(), "south": free_port()}
    return write_topology(tmp, model, ports, **kw), ports


# ----------------------------------------------------------------------------------------- 1: silently wrong


@pytest.mark.slow  # several console scripts, each loading torch
@pytest.mark.e2e
def test_class_count_that_differs_is_refused_by_eval_profile_and_coordinator(model3, tmp_path):
    data = f"folder:{_folder(tmp_path / 'five', 5)}"
    topo, _ = _topology(tmp_path, model3)
    for r in run_all(("moe-eval", "--model", model3, "--data", data, "--split", "train"),
                     ("moe-profile", "--model", model3, "--data", data, "--split", "train", "--out",
                      tmp_path / "s.json"),
                     ("moe-coordinator", "--topology", topo, "--data", data, "--split", "train", "--out",
                      tmp_path / "r.jsonl", {"env": {"TMPDIR": str(tmp_path)}})):
        assert r.returncode == 2, r.stderr
        assert "has 3 classes but folder:" in r.stderr and "has 5: the class counts differ" in r.stderr
        assert "started a local worker" not in r.stderr  # refused before any worker starts
    assert not (tmp_path / "s.json").exists() and not (tmp_path / "r.jsonl").exists()


@pytest.mark.slow  # several console scripts, each loading torch
def test_moe_eval_counts_only_what_it_evaluated_and_lists_what_it_skipped(model3, tmp_path):
    data = f"folder:{_folder(tmp_path / 'three', 3, per_class=5, broken={0: 3, 2: 2})}"
    r = run("moe-eval", "--model", model3, "--data", data, "--split", "train", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["skipped"]) + out["n"] == 16  # 80 % of the 20 files: the train split
    assert all("broken" in p for p in out["skipped"]) and out["skipped"]
    assert set(out["skipped_reasons"]) == set(out["skipped"])
    text = run("moe-eval", "--model", model3, "--data", data, "--split", "train")
    assert f"({out['n']} images at 32px; {len(out['skipped'])} unreadable left out)" in text.stdout
    assert text.stdout.count("unreadable, not evaluated:") == len(out["skipped"])


@pytest.mark.slow  # a few seconds on an idle machine; minutes beside a training run
def test_moe_eval_decodes_each_image_once(model3, tmp_path, monkeypatch, capsys):
    """One pass: every file of the split is decoded once (it was twice: a check of every file, then the
    evaluation), unreadable ones included; a calibrated model's ECE comes from the same pass."""
    import shutil

    import moevit.data
    from moevit.calibration import Calibration, write_calibration
    from moevit.cli.eval import main as eval_main

    model = Path(shutil.copy(model3, tmp_path / "m.safetensors"))
    write_calibration(model, Calibration(2.0, None, None, "val"))
    data = f"folder:{_folder(tmp_path / 'three', 3, per_class=5, broken={0: 3, 2: 2})}"
    decoded: list[str] = []
    read = moevit.data._read_image

    def counting(path, *args, **kw):
        decoded.append(str(path))
        return read(path, *args, **kw)

    monkeypatch.setattr(moevit.data, "_read_image", counting)
    assert eval_main(["--model", str(model), "--data", data, "--split", "train", "--json", "--batch-size", "4",
                      "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["skipped"]) + out["n"] == 16 and out["skipped"] and "calibration" in out
    assert sorted(decoded) == sorted(set(decoded)) and len(decoded) == 16


@pytest.mark.slow
@pytest.mark.e2e
def test_data_mode_reports_unreadable_files_as_failed_and_never_substitutes(model3, tmp_path):
    data = f"folder:{_folder(tmp_path / 'three', 3, per_class=4, broken={1: 4})}"
    topo, _ = _topology(tmp_path, model3)
    out = tmp_path / "r.jsonl"
    r = run("moe-coordinator", "--topology", topo, "--data", data, "--split", "eval", "--batch-size", "2",
            "--out", out, "--threads", "1", env={"TMPDIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    from moevit.data import open_dataset

    truth = open_dataset(data, image_size=32, split="eval")
    assert len(rows) == len(truth)
    bad = [i for i, p in enumerate(truth.paths) if "broken" in p.name]
    for i, row in enumerate(rows):
        if i in bad:  # its own failure, naming its file: no prediction borrowed from the next image
            assert row["error_kind"] == "unreadable" and "prediction" not in row
            assert str(truth.paths[i]) in row["error"]
        else:
            assert "error" not in row and row["true"] == truth.targets[i]
    assert bad, "the eval split holds some unreadable file"
    assert f"{len(rows) - len(bad)} classified (0 degraded), {len(bad)} failed" in r.stdout
    assert f"failed ({len(bad)} images): unreadable image" in r.stdout
    assert sum("FAILED: unreadable image" in ln for ln in (r.stdout + r.stderr).splitlines()) == len(bad)
    # the worker logs folder it made under TMPDIR is gone once the workers stopped cleanly (7)
    assert not list(tmp_path.glob("moevit-workers-*"))


# ------------------------------------------------------------------------------------ 2, 3: checked first


@pytest.mark.slow  # several console scripts, each loading torch
@pytest.mark.e2e
def test_coordinator_checks_every_input_before_any_worker_starts(model3, tmp_path):
    topo, _ = _topology(tmp_path, model3)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        cases = {
            ("--images", "/nonexistent/x"): "--images /nonexistent/x: not a folder",
            ("--data", "foldr:/x"): "unknown kind 'foldr'",
            ("--data", f"folder:{tmp_path}/none"): "is not a directory",
            ("--data", "digits", "--split", "tain"): "split 'tain' is not one of",
            ("--serve", f"127.0.0.1:{busy.getsockname()[1]}"): f"port {busy.getsockname()[1]} is in use",
            ("--serve", "127.0.0.1:70000"): "port 70000 is out of range",
            ("--data", "digits", "--image-size", "0"): "--image-size must be 8-2048 pixels",
            ("--data", "digits", "--max-megapixels", "0"): "--max-megapixels must be in (0, 100]",
        }
        results = run_all(*(("moe-coordinator", "--topology", topo, *args, {"env": {"TMPDIR": str(tmp_path)}})
                            for args in cases))
        for (args, expected), r in zip(cases.items(), results, strict=True):
            assert r.returncode == 2, (args, r.stderr)
            assert expected in error_line(r), (args, r.stderr)
            assert error_line(r).startswith("moe-coordinator: error: ")
    finally:
        busy.close()


@pytest.mark.e2e
def test_worker_refuses_an_address_it_would_not_listen_on(model3):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        cases = (("127.0.0.1:70000", "port 70000 is out of range 0-65535"),
                 ("localhost", "--listen 'localhost': no port; give HOST:PORT"),
                 (f"127.0.0.1:{port}", f"port {port} is in use by another process"))
        results = run_all(*(("moe-worker", "--listen", listen, "--model", model3, "--experts", "all",
                             {"timeout": 60}) for listen, _ in cases))
        for (_, expected), r in zip(cases, results, strict=True):
            assert r.returncode == 2, r.stderr
            assert error_line(r).startswith("moe-worker: error: --listen") and expected in error_line(r)
    finally:
        busy.close()


# ------------------------------------------------------------------------------------------- 4: lost work


@pytest.fixture(scope="module")
def workers(model3, tmp_path_factory):
    """Two workers started by hand, as the README shows, and a topology naming them (no spawning needed)."""
    tmp = tmp_path_factory.mktemp("hand")
    topo, ports = _topology(tmp, model3)
    procs = start_workers(str(model3), {n: f"127.0.0.1:{ports[n]}" for n in ("north", "south")})
    yield topo
    for p in procs.values():
        stop(p)


def _images(root: Path, n: int = 6) -> Path:
    root.mkdir()
    for i in range(n):
        Image.new("RGB", (40, 30), (40 * i, 100, 200 - 30 * i)).save(root / f"img{i}.jpg")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.e2e
def test_a_run_with_a_smaller_limit_keeps_the_results_already_made(workers, tmp_path, suffix):
    imgs, out = _images(tmp_path / "imgs"), tmp_path / f"results{suffix}"

    def files() -> set[str]:
        if suffix == ".json":
            return {im["file"] for im in json.loads(out.read_text())["images"]}
        return {json.loads(line)["file"] for line in out.read_text().splitlines()}

    r = run("moe-coordinator", "--topology", workers, "--images", imgs, "--out", out, "--no-spawn")
    assert r.returncode == 0, r.stderr[-2000:]
    assert files() == {f"img{i}.jpg" for i in range(6)}
    r = run("moe-coordinator", "--topology", workers, "--images", imgs, "--out", out, "--no-spawn", "--limit", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert files() == {f"img{i}.jpg" for i in range(6)}, "results of the first run were lost"
    assert "keeping the results of 4 images of earlier runs" in r.stderr


@pytest.mark.slow
@pytest.mark.e2e
def test_without_out_the_user_is_told_nothing_is_saved_and_failed_files_are_named(workers, tmp_path):
    imgs = _images(tmp_path / "imgs", 3)
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    Image.new("RGB", (8, 8)).save(imgs / "x.tif")
    Image.new("RGB", (8, 8)).save(imgs / "x.gif")
    (imgs / "._img0.jpg").write_bytes(b"macOS sidecar")
    taxa = tmp_path / "taxa.csv"
    taxa.write_text("label,common_name,scientific_name\n1,red fox,Vulpes vulpes\n")
    r = run("moe-coordinator", "--topology", workers, "--images", imgs, "--no-spawn", "--taxa", taxa)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warning: no --out: nothing is saved" in r.stderr
    assert "skipping 3 files that are not .jpg/.jpeg/.png/.bmp/.webp images: 1 .gif, 1 .tif, 1 hidden" in r.stderr
    assert "--taxa" in r.stderr and "no class(es) of the model (a, b, c) match a taxon" in r.stderr
    assert "broken.jpg: FAILED: unreadable image" in r.stdout + r.stderr
    assert "4 images: 3 classified (0 degraded), 1 failed" in r.stdout
    assert "failed (1 images): unreadable image" in r.stdout
    # workers on this machine, started by hand: the coordinator leaves them a core each (6)
    threads = max(1, torch.get_num_threads() - 2)
    assert f"{threads} torch thread(s)" in r.stderr


@pytest.mark.slow  # several console scripts, each loading torch
def test_moe_certs_never_replaces_a_ca_and_says_when_it_cannot_write(model3, tmp_path):
    topo, _ = _topology(tmp_path, model3)
    pki = tmp_path / "pki"
    assert run("moe-certs", "--topology", topo, "--out", pki).returncode == 0
    ca = (pki / "ca.pem").read_bytes()
    r = run("moe-certs", "--topology", topo, "--out", pki)
    assert r.returncode == 2 and "already holds a CA (ca.pem, ca.key)" in error_line(r)
    assert (pki / "ca.pem").read_bytes() == ca
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run("moe-certs", "--topology", topo, "--out", blocker / "pki")
    assert r.returncode == 2 and error_line(r).startswith(f"moe-certs: error: --out {blocker / 'pki'}: cannot write")


@pytest.mark.slow  # several console scripts, each loading torch
def test_moe_analyze_refuses_a_report_of_another_conversion(model3, tmp_path):
    from moevit.checkpoint import load_checkpoint
    from moevit.convert import conversion_fingerprint

    model = load_checkpoint(model3)
    data = f"folder:{_folder(tmp_path / 'three', 3)}"
    layers = {"5": {"affinity_before": [[0.25] * 4] * 3}, "8": {"affinity_before": [[0.25] * 4] * 3}}
    cases = (("other", "0123456789abcdef", "is of conversion 0123456789abcdef, but"),
             ("old", None, "has no conversion fingerprint"))
    for name, fp, _ in cases:
        (tmp_path / f"{name}.json").write_text(json.dumps({"layers": layers,
                                                           **({"conversion_fingerprint": fp} if fp else {})}))
    results = run_all(*(("moe-analyze", "--model", model3, "--data", data, "--out", tmp_path / name, "--report",
                         tmp_path / f"{name}.json") for name, _, _ in cases))
    for (_, _, expected), r in zip(cases, results, strict=True):
        assert r.returncode == 2 and expected in r.stderr, r.stderr
    # the conversion fingerprint survives fine-tuning (what moe-analyze is run on) while the model's changes
    before = conversion_fingerprint(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    opt.step()
    assert conversion_fingerprint(model) == before
    other = small_moe_model((5, 8), num_experts=4, num_classes=3, labels=LABELS, image_size=32, calib_size=32, seed=1)
    assert conversion_fingerprint(other) != before


# -------------------------------------------------------------------------------- 5: TLS mismatch explained


@pytest.mark.slow
@pytest.mark.e2e
def test_a_plaintext_coordinator_facing_a_tls_worker_is_told_tls_may_be_the_cause(model3, tmp_path):
    topo, ports = _topology(tmp_path, model3)
    pki = tmp_path / "pki"
    assert run("moe-certs", "--topology", topo, "--out", pki).returncode == 0
    from moevit.coordinator.local import spawn_worker

    w = spawn_worker(["--listen", f"127.0.0.1:{ports['north']}", "--model", str(model3), "--experts", "all",
                      "--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "north.pem"), "--tls-key",
                      str(pki / "north.key")])
    try:
        deadline = time.monotonic() + 120
        while True:  # listening (a plaintext health check cannot tell more of a TLS worker)
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", ports["north"])) == 0:
                    break
            assert w.poll() is None and time.monotonic() < deadline, "the TLS worker did not start"
            time.sleep(0.2)
        doc = yaml.safe_load(topo.read_text())
        doc["sites"].pop("south")
        doc["links"] = [ln for ln in doc["links"] if "south" not in ln["between"]]
        topo.write_text(yaml.safe_dump(doc))
        r = run("moe-coordinator", "--topology", topo, "--data", "synthetic:classes=3,per_class=3,size=32",
                "--no-spawn", timeout=120)
    finally:
        stop(w)
    assert r.returncode == 2
    assert "no SERVING health within" in r.stderr and "a TLS worker never answers a plaintext coordinator" in r.stderr


# ---------------------------------------------------------------------------------------- 7: small breakages


@pytest.mark.slow  # several console scripts, each loading torch
def test_numbers_that_cannot_work_are_one_line_errors(model3, tmp_path):
    cases = (
            ("moevit-info", [model3, "--image-size", "0"], "--image-size must be 8-2048 pixels, got 0"),
            ("moevit-info", [model3, "--image-size", "-64"], "--image-size must be 8-2048 pixels, got -64"),
            ("moevit-info", [model3, "--image-size", "100000"], "--image-size must be 8-2048 pixels, got 100000"),
            ("moe-eval", ["--model", model3, "--data", "digits", "--batch-size", "0"], "--batch-size must be >= 1"),
            ("moe-train", ["--data", "digits", "--epochs", "0", "--out", tmp_path / "t"], "--epochs must be >= 1"))
    results = run_all(*((prog, *args) for prog, args, _ in cases))
    for (prog, args, expected), r in zip(cases, results, strict=True):
        assert r.returncode == 2, (prog, args, r.stderr)
        assert expected in error_line(r), (prog, args, r.stderr)
    assert not (tmp_path / "t").exists()


@pytest.mark.slow  # two moe-train processes
def test_config_files_cannot_set_or_see_test_hooks(tmp_path):
    cases = (({"bogus": 1}, "unknown training options: ['bogus']"),
             ({"kill_at_step": 3}, "unknown training options: ['kill_at_step']"))
    for i, (body, _) in enumerate(cases):
        (tmp_path / f"c{i}.json").write_text(json.dumps(body))
    results = run_all(*(("moe-train", "--data", "synthetic:classes=2,per_class=4,size=16", "--config",
                         tmp_path / f"c{i}.json", "--out", tmp_path / f"t{i}", "--epochs", "1")
                        for i in range(len(cases))))
    for (_, expected), r in zip(cases, results, strict=True):
        assert r.returncode == 2 and expected in r.stderr and "kill_at_step'" not in r.stderr.split("known:")[1]


@pytest.mark.slow
def test_synthetic_size_is_the_training_size_and_a_resume_names_what_differs(tmp_path):
    out = tmp_path / "run"
    data = "synthetic:classes=2,per_class=5,size=32"
    r = run("moe-train", "--data", data, "--epochs", "1", "--batch-size", "4", "--out", out, "--no-progress",
            "--threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    from moevit.checkpoint import read_config

    assert read_config(out / "last.safetensors").image_size == 32
    r = run("moe-train", "--data", data, "--epochs", "1", "--batch-size", "4", "--out", out, "--no-progress",
            "--image-size", "48")
    assert r.returncode == 2
    assert "holds a run whose model differs in image_size 32 (this run: 48)" in error_line(r)


# ------------------------------------------------------------------------------------ 8: the split pays off


@pytest.mark.slow
def test_the_split_example_is_placed_within_memory_and_the_whole_model_strategies_say_why_not(tmp_path):
    """examples/sites-split.yaml with a model of the demo's exact shape: the partitioner calls the whole model on
    the camera infeasible, the simulator reports local and offload-image as not fitting and simulates split."""
    root = Path(__file__).resolve().parents[1] / "examples"
    model = small_moe_model((1, 5, 8), num_experts=8, expert_hidden=64, num_classes=10,
                            labels=tuple(str(i) for i in range(10)), image_size=64, calib_size=64)
    path = save_checkpoint(model, tmp_path / "moe.safetensors")
    for name in ("sites-split.yaml", "sites-split-ample.yaml", "sweep-split.yaml"):
        text = (root / name).read_text()
        (tmp_path / name).write_text(text.replace("model: runs/demo/moe.safetensors", f"model: {path}"))
    stats, placement = tmp_path / "stats.json", tmp_path / "placement.yaml"
    r = run("moe-profile", "--model", path, "--data", "digits", "--images", "32", "--out", stats, "--threads", "1")
    assert r.returncode == 0, r.stderr
    r = run("moe-partition", "--topology", tmp_path / "sites-split.yaml", "--stats", stats, "--objective",
            "latency", "--out", placement)
    assert r.returncode == 0, r.stderr
    assert "all-on-coordinator" in r.stdout and "infeasible (memory: cam-mcu: needs 5.30 MB, has 4.40 MB)" in r.stdout
    r = run("moe-sim", "--topology", tmp_path / "sites-split.yaml", "--stats", stats, "--placement", placement,
            "--sweep", tmp_path / "sweep-split.yaml", "--out", tmp_path / "sim", "--no-ray", "--no-plots")
    assert r.returncode == 0, r.stderr
    assert "local-moe not simulated: does not fit: the whole MoE model needs 5.30 MB on cam-mcu" in r.stdout
    assert "local-dense not simulated: does not fit: the dense model needs 4.56 MB on cam-mcu" in r.stdout
    assert "offload-image not simulated: does not fit: the whole MoE model needs 5.30 MB on relay-mcu" in r.stdout
    rows = json.loads((tmp_path / "sim" / "results.json").read_text())
    rows = rows["scenarios"]
    ran = {(r_["params"]["topology"], r_["params"]["strategy"]) for r_ in rows if r_.get("error") is None}
    assert ("mcu", "split") in ran and ("ample-memory", "local-moe") in ran and ("mcu", "local-moe") not in ran
