"""``run_batch(runtime, job)`` in this process: the batch run of ``moe-coordinator`` driven by a typed
:class:`BatchJob`, no subprocess; one real worker (a WorkerServer on loopback in a thread) computes half the experts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from moevit.coordinator import cli
from moevit.coordinator.cli import BatchJob, run_batch
from moevit.coordinator.runtime import SplitRuntime
from moevit.deploy.topology import load_topology
from PIL import Image

from moevit.checkpoint import save_checkpoint
from moevit.data import load_image
from moevit.fuse import folded_copy
from tests.deploy import small_moe_model, write_topology
from tests.netutil import free_port, in_process_worker

LAYERS = (1, 5, 8)
SIZE = 64


def test_job_from_the_flags():
    args = cli._parser().parse_args(["--topology", "t.yaml", "--images", "cam01", "--out", "r.json", "--limit", "7",
                                     "--batch-size", "4", "--sequence-gap", "30", "--restart"])
    job = BatchJob.from_args(args, image_size=96)
    assert (job.images, job.data, job.out, job.limit, job.batch_size, job.sequence_gap, job.restart,
            job.image_size) == ("cam01", None, "r.json", 7, 4, 30.0, True, 96)
    with pytest.raises(AttributeError):
        job.out = "other.json"  # frozen: a job is a value


def test_run_batch_in_process_writes_results_then_resumes(tmp_path):
    model = small_moe_model(LAYERS, image_size=SIZE, calib_size=SIZE)
    path = save_checkpoint(model, tmp_path / "moe.safetensors")
    root = tmp_path / "cam01"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    placement = {layer: {"cam": [0, 1, 2], "north": [3, 4, 5]} for layer in LAYERS}
    with in_process_worker(path, {layer: [3, 4, 5] for layer in LAYERS}) as address:
        topo = write_topology(tmp_path, path, {"cam": free_port(), "north": int(address.rsplit(":", 1)[1])},
                              placement=placement)
        runtime = SplitRuntime.from_topology(load_topology(topo), wire="fp32")
        try:
            runtime.check_workers()
            job = BatchJob(image_size=SIZE, images=str(root), out=str(tmp_path / "results.json"), batch_size=3)
            summary = run_batch(runtime, job)
            assert (summary["images"], summary["ok"], summary["failed"], summary["reused"],
                    summary["classified_now"]) == (5, 4, 1, 0, 5)
            assert summary["per_site"]["north"]["calls"] > 0  # the worker computed its experts
            doc = json.loads((tmp_path / "results.json").read_text())
            by_file = {im["file"]: im for im in doc["images"]}
            assert sorted(by_file) == ["broken.jpg", "img0.png", "img1.png", "img2.png", "img3.png"]
            assert by_file["broken.jpg"]["moevit_failure_kind"] == "unreadable"
            ref = folded_copy(model)
            with torch.no_grad():
                for i in range(4):
                    want = int(ref(load_image(root / f"img{i}.png", SIZE)[None]).argmax())
                    assert by_file[f"img{i}.png"]["detections"][0]["classifications"][0][0] == str(want)
            again = run_batch(runtime, job)  # the same job: everything is reused, nothing classified
            assert (again["reused"], again["classified_now"], again["ok"]) == (5, 0, 4)
        finally:
            runtime.close()
