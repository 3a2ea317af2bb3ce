"""Degraded results re-scored once their sites are back, with the correction written and published (issue 23).

Pure pieces first: a correction keeps the record it replaces; the queue's bounds (limit, max age), health gate and
back-off; MegaDetector output round-trips a correction (resume); an event is revised only when a correction changes
its label; correction messages have idempotent ids.

Then real runs. ``run_batch`` in this process, against a worker server on loopback: the worker is down while the
images are classified (all degraded, naming the site), comes back during ``--rescore-wait``, and the corrections are
appended to the ``.jsonl`` output; a ``.json`` output is corrected by the next run with the same ``--out``. Last, a
real worker process killed with SIGKILL mid-run under ``moe-coordinator --mqtt``: the run ends degraded, the worker
is restarted, and the same command publishes the corrections to a real mosquitto. A deduplicating consumer sees each
corrected record exactly once, and the results file holds each correction with the record it replaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import torch
from moevit.coordinator import results as res
from moevit.coordinator.cli import BatchJob, run_batch
from moevit.coordinator.corrections import (
    RescoreQueue,
    correct,
    image_key,
    original_of,
    revise_events,
    summary_lines,
)
from moevit.coordinator.events import events_from_megadetector
from moevit.coordinator.outbox import Outbox
from moevit.coordinator.runtime import SplitRuntime
from moevit.coordinator.uplink import Uplink, parse_mqtt_url
from moevit.deploy.topology import load_topology
from PIL import Image

from moevit.checkpoint import save_checkpoint
from moevit.data import load_image
from moevit.fuse import folded_copy
from tests.deploy import small_moe_model, write_topology
from tests.netutil import free_port, start_worker, stop
from tests.test_results import check_megadetector

LABELS = ("fox", "deer", "boar")
LAYERS = (1, 5, 8)
SIZE = 64


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def _rec(file: str, top, *, degraded: bool = False, t: str = "2024-05-01T06:00:00", at: str | None = None,
         sites=("north",)) -> dict:
    rec = res.ImageRecord(file, "fp", prediction=top[0][0], label=LABELS[top[0][0]], confidence=top[0][1],
                          top5=[list(p) for p in top], degraded=degraded,
                          extra={"datetime": t, "time_source": "exif:DateTimeOriginal", "time_flags": []})
    if degraded:
        rec.degraded_sites, rec.degraded_at = list(sites), at or "2026-12-01T10:00:00+00:00"
    return rec.to_json()


# ------------------------------------------------------------------------------------------------ pure pieces


def test_a_correction_keeps_the_record_it_replaces():
    orig = _rec("a/1.jpg", [(0, 0.6), (1, 0.4)], degraded=True)
    fix = correct(orig, _rec("a/1.jpg", [(1, 0.7), (0, 0.3)]))
    assert (fix["prediction"], fix["label"], fix["degraded"], fix["revision"]) == (1, "deer", False, 1)
    assert fix["corrects"] == {"prediction": 0, "label": "fox", "confidence": 0.6, "top5": [[0, 0.6], [1, 0.4]],
                               "degraded": True, "degraded_sites": ["north"],
                               "degraded_at": "2026-12-01T10:00:00+00:00"}
    assert "degraded_sites" not in fix and original_of(fix) == orig
    # the record's own key order, and a line that reads back as itself
    assert list(fix)[:8] == ["file", "model", "prediction", "label", "confidence", "top5", "degraded", "revision"]
    line = json.dumps(fix)
    assert json.dumps(res.ImageRecord.from_json(json.loads(line)).to_json()) == line
    again = correct(fix, _rec("a/1.jpg", [(2, 0.5), (1, 0.5)]))
    assert again["revision"] == 2 and again["corrects"]["revision"] == 1
    with pytest.raises(ValueError, match="not degraded"):
        correct(orig, _rec("a/1.jpg", [(1, 0.7)], degraded=True))
    with pytest.raises(ValueError, match="another image"):
        correct(orig, _rec("a/2.jpg", [(1, 0.7)]))


def test_the_queue_waits_for_the_sites_backs_off_and_is_bounded():
    now = [10_000.0]
    q = RescoreQueue(limit=2, max_age_s=100, clock=lambda: now[0], retry_s=5, max_retry_s=20)
    up = {"north": False, "south": False}
    assert not q.add(_rec("ok", [(0, 0.9)]))  # not degraded: nothing to re-score
    assert q.add(_rec("a", [(0, 0.9)], degraded=True, at=_iso(9_990)))
    assert q.add(_rec("b", [(0, 0.9)], degraded=True, at=_iso(9_995)))
    assert q.add(_rec("c", [(0, 0.9)], degraded=True, at=_iso(9_998)))
    assert "a" not in q and q.overflow == {"a"}, "over the limit, the oldest leaves"
    assert q.ready(up.__getitem__) == [], "north is down"
    up["north"] = True
    assert [w.file for w in q.ready(up.__getitem__)] == ["b", "c"]
    assert [w.file for w in q.ready(up.__getitem__, 1)] == ["b"]
    q.still_degraded("b", ["north", "south"])  # degraded again, now lacking south too
    assert [w.file for w in q.ready(up.__getitem__)] == ["c"]
    now[0] += 5
    assert [w.file for w in q.ready(up.__getitem__)] == ["c"], "b waits for south"
    up["south"] = True
    assert [w.file for w in q.ready(up.__getitem__)] == ["b", "c"]
    q.still_degraded("b")
    assert q.ready(up.__getitem__)[0].file == "c" and q._waiting["b"].next_try == now[0] + 10  # doubled
    q.still_degraded("b")
    q.still_degraded("b")
    assert q._waiting["b"].next_try == now[0] + 20, "capped at max_retry_s"
    q.done("c")
    assert q.add(_rec("d", [(0, 0.9)], degraded=True, at=_iso(now[0])), hold=True)
    assert [w.file for w in q.ready(up.__getitem__)] == [], "just degraded: held for retry_s"
    now[0] = 10_096
    assert [w.file for w in q.ready(up.__getitem__)] == ["d"], "b is past max_age_s: it stays degraded"
    assert not q.add(_rec("e", [(0, 0.9)], degraded=True, at=_iso(9_000)))  # too old to queue
    r = q.report()
    assert (r["corrected"], r["waiting"], r["expired"], r["overflow"]) == (1, 1, 2, 1)
    assert r["expired_sites"] == ["north", "south"] and r["waiting_for"] == ["north"]
    lines = "\n".join(summary_lines(r))
    assert "re-scored: 1 degraded image(s)" in lines
    assert "still degraded: 1 image(s) wait for site(s) north" in lines
    assert "stay degraded: 2 image(s) whose site(s) north, south did not come back within --rescore-max-age 100 s" \
           in lines
    assert "stay degraded: 1 image(s) beyond the re-score queue's limit (--rescore-limit 2" in lines
    q.give_up("d", "unreadable image: gone")
    assert "stay degraded: 1 image(s) that could not be read again: unreadable image: gone" in "\n".join(
        summary_lines(q.report()))
    with pytest.raises(ValueError, match="--rescore-limit"):
        RescoreQueue(limit=-1)


def test_megadetector_output_keeps_a_correction_and_its_original(tmp_path):
    fixed = correct(_rec("a/1.jpg", [(0, 0.6), (1, 0.4)], degraded=True), _rec("a/1.jpg", [(1, 0.7), (0, 0.3)]))
    records = [fixed, _rec("a/2.jpg", [(1, 0.6), (0, 0.4)], degraded=True, t="2024-05-01T06:00:10"),
               _rec("a/3.jpg", [(2, 0.8), (0, 0.2)], t="2024-05-01T06:00:20")]
    doc = res.build_megadetector(records, labels=LABELS, fingerprint="fp")
    check_megadetector(doc)
    ims = {im["file"]: im for im in doc["images"]}
    assert ims["a/1.jpg"]["moevit_revision"] == 1 and ims["a/1.jpg"]["moevit_corrects"]["degraded"] is True
    assert ims["a/1.jpg"]["detections"][0]["classifications"][0] == ["1", 0.7]
    assert ims["a/2.jpg"]["moevit_degraded_sites"] == ["north"] and "moevit_revision" not in ims["a/2.jpg"]
    assert res.records_from_megadetector(doc) == records
    out = tmp_path / "results.json"
    res.write_json_atomic(out, doc)
    assert res.load_previous(out, "fp") == {r["file"]: r for r in records}, "a resumed run reads them back"


def test_an_event_is_revised_only_when_a_correction_changes_its_label():
    def build(recs):
        return res.build_megadetector(recs, labels=LABELS, fingerprint="fp")

    a1 = _rec("cam/a1.jpg", [(0, 0.9), (1, 0.1)], degraded=True, t="2024-05-01T06:00:00")
    b1 = _rec("cam/b1.jpg", [(2, 0.8), (0, 0.2)], degraded=True, t="2024-05-01T09:00:00")
    others = [_rec("cam/a2.jpg", [(0, 0.6), (1, 0.4)], t="2024-05-01T06:00:10"),
              _rec("cam/a3.jpg", [(1, 0.55), (0, 0.45)], t="2024-05-01T06:00:20"),
              _rec("cam/b2.jpg", [(2, 0.9), (1, 0.1)], t="2024-05-01T09:00:05")]
    before = {e.event_id: e for e in events_from_megadetector(build([a1, b1, *others]))}
    assert {e.degraded for e in before.values()} == {True} and before["cam-seq0001"].top[0][0] == 0
    # a1's correction moves burst A from fox (0) to deer (1); b1's leaves burst B boar (2)
    fixed = [correct(a1, _rec("cam/a1.jpg", [(1, 0.9), (0, 0.1)], t=a1["datetime"])),
             correct(b1, _rec("cam/b1.jpg", [(2, 0.7), (0, 0.3)], t=b1["datetime"]))]
    events = {e.event_id: e for e in revise_events([*fixed, *others], build)}
    a, b = events["cam-seq0001"], events["cam-seq0002"]
    assert (a.top[0][0], a.revision, a.degraded) == (1, 1, False)
    assert a.message_id == before["cam-seq0001"].message_id[:-1] + "1", "the same event, a new revision"
    assert (b.top[0][0], b.revision) == (2, 0)
    assert b.message_id == before["cam-seq0002"].message_id, "unchanged label: the id already sent, not sent again"
    assert revise_events([a1, b1, *others], build) == list(before.values())


def test_corrections_go_to_the_outbox_under_idempotent_ids(tmp_path):
    fix = correct(_rec("cam01/1.jpg", [(0, 0.6)], degraded=True), _rec("cam01/1.jpg", [(1, 0.7)]))
    up = Uplink(parse_mqtt_url("mqtt://127.0.0.1:1/t"), Outbox(tmp_path / "o.sqlite"))  # never started
    assert up.corrections([fix, _rec("cam01/2.jpg", [(0, 0.9)])], res.sequence_group) == 1
    assert up.corrections([fix], res.sequence_group) == 0, "the same correction again: a no-op"
    (m,) = up.outbox.pending()
    assert m.id == f"{image_key('fp', 'cam01/1.jpg')}-img-r1" and m.topic == "t/corrections/cam01"
    body = json.loads(m.payload)
    assert (body["type"], body["image"], body["revision"], body["prediction"]) == ("correction",
                                                                                   image_key("fp", "cam01/1.jpg"), 1, 1)
    assert body["corrects"]["degraded"] is True
    assert up.corrections([correct(fix, _rec("cam01/1.jpg", [(2, 0.8)]))], res.sequence_group) == 1  # revision 2
    up.outbox.close()


@pytest.mark.parametrize(("flag", "value", "words"), [("--rescore-limit", "-1", "--rescore-limit must be >= 0"),
                                                      ("--rescore-max-age", "-5", "--rescore-max-age must be >= 0"),
                                                      ("--rescore-wait", "nan", "--rescore-wait must be >= 0")])
def test_bad_rescore_flags_are_one_line_errors(tmp_path, capsys, flag, value, words):
    from moevit.coordinator import cli

    (tmp_path / "img").mkdir()
    sites = Path(__file__).resolve().parents[1] / "examples" / "sites.yaml"
    assert cli.main(["--topology", str(sites), "--images", str(tmp_path / "img"), flag, value]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


# ----------------------------------------------------------------------------------- run_batch in this process


@contextlib.contextmanager
def _worker(model_path: Path, hosted: dict[int, list[int]], port: int) -> Iterator[None]:
    """A worker server on 127.0.0.1:port on an event loop in a thread of this process."""
    from moevit.worker.backends import TorchBackend
    from moevit.worker.server import WorkerServer, load_hosted

    banks, fingerprint, _ = load_hosted(model_path, hosted)
    server = WorkerServer(TorchBackend(banks), fingerprint, arch="test", address=f"127.0.0.1:{port}", grace=0)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
    try:
        yield
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)


@pytest.mark.slow
def test_run_batch_rescores_degraded_images_once_the_worker_is_back(tmp_path, capsys):
    """north (half the experts) is down while 6 images are classified under fallback skip: all degraded, naming
    north. It comes back during --rescore-wait: the 6 are classified again on the split path (the fault-free
    model's answers) and appended to the .jsonl as corrections. Then a .json run while north is down, and the same
    job again once it is back: the resumed run corrects the 6 it reads back; a third changes nothing."""
    model = small_moe_model(LAYERS, image_size=SIZE, calib_size=SIZE)
    path = save_checkpoint(model, tmp_path / "moe.safetensors")
    root = tmp_path / "cam01"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    ref = folded_copy(model)
    with torch.no_grad():
        want = {f"img{i}.png": int(ref(load_image(root / f"img{i}.png", SIZE)[None]).argmax()) for i in range(6)}
    north = free_port()
    hosted = {layer: [3, 4, 5] for layer in LAYERS}
    topo = write_topology(tmp_path, path, {"cam": free_port(), "north": north}, fallback="skip",
                          placement={layer: {"cam": [0, 1, 2], "north": [3, 4, 5]} for layer in LAYERS})
    runtime = SplitRuntime.from_topology(load_topology(topo), wire="fp32")
    try:
        runtime.check_workers(wait_s=0.2)  # north down: tolerated under skip
        out = tmp_path / "results.jsonl"
        came_back = threading.Event()

        def restart_when_classified() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if out.exists() and len(res.read_jsonl(out)[0]) >= 6:
                    with _worker(path, hosted, north):
                        came_back.set()
                        done.wait(60)
                    return
                time.sleep(0.02)

        done = threading.Event()
        helper = threading.Thread(target=restart_when_classified, daemon=True)
        helper.start()
        from moevit.coordinator.metrics import CoordinatorMetrics

        metrics = CoordinatorMetrics()
        metrics.instrument(runtime)
        try:
            s = run_batch(runtime, BatchJob(image_size=SIZE, images=str(root), out=str(out), batch_size=3,
                                            rescore_wait=60), metrics=metrics)
        finally:
            done.set()
            helper.join(30)
        assert came_back.is_set()
        lines = res.read_jsonl(out)[0]
        first, fixes = lines[:6], lines[6:]
        assert all(r["degraded"] and r["degraded_sites"] == ["north"] and "degraded_at" in r for r in first)
        assert sorted(r["file"] for r in fixes) == sorted(want), "each image corrected once"
        for r in fixes:
            assert r["revision"] == 1 and not r["degraded"] and r["corrects"]["degraded"] is True
            assert r["prediction"] == want[r["file"]], "the correction is the fault-free split answer"
        assert (s["degraded"], s["rescore"]["corrected"], s["rescore"]["waiting"]) == (0, 6, 0)
        assert metrics.registry.get_sample_value("moevit_coordinator_images_total", {"outcome": "corrected"}) == 6
        assert "re-scored: 6 degraded image(s)" in capsys.readouterr().out

        # .json: north down for the run, back for the next one with the same --out
        job = BatchJob(image_size=SIZE, images=str(root), out=str(tmp_path / "results.json"), batch_size=3)
        s = run_batch(runtime, job)
        assert s["degraded"] == 6 and s["rescore"]["waiting"] == 6
        assert "still degraded: 6 image(s) wait for site(s) north" in capsys.readouterr().out
        with _worker(path, hosted, north):
            assert runtime.clients["north"].watch.wait_up(10)
            s = run_batch(runtime, job)
            assert (s["reused"], s["classified_now"], s["degraded"], s["rescore"]["corrected"]) == (6, 0, 0, 6)
            doc = json.loads(Path(job.out).read_text())
            check_megadetector(doc)
            for im in doc["images"]:
                assert im["moevit_revision"] == 1 and not im["moevit_degraded"]
                assert im["moevit_corrects"]["degraded_sites"] == ["north"]
                assert im["detections"][0]["classifications"][0][0] == str(want[im["file"]])
            s = run_batch(runtime, job)  # everything done: nothing re-scored again
            assert (s["reused"], s["rescore"]["corrected"]) == (6, 0)
            assert json.loads(Path(job.out).read_text())["images"] == doc["images"]
    finally:
        runtime.close()


# ------------------------------------------------------------------------- real processes and a real broker


def _jpeg(path: Path, when: datetime, colour) -> None:
    from moevit.coordinator import fieldmeta

    exif = Image.Exif()
    exif[fieldmeta.EXIF_IFD] = {fieldmeta.TAG_DATETIME_ORIGINAL: when.strftime("%Y:%m:%d %H:%M:%S"),
                                fieldmeta.TAG_BODY_SERIAL: "S1"}
    Image.new("RGB", (48, 36), colour).save(path, exif=exif)


@pytest.mark.slow
def test_a_killed_worker_comes_back_and_the_corrections_reach_the_broker_once(tmp_path):
    """moe-coordinator --mqtt over 24 frames (4 bursts) with every expert on north (fallback skip). north is killed
    with SIGKILL after the first few images: the run ends with the rest degraded, and their event summaries go to
    mosquitto flagged degraded. north is restarted and the same command runs again: it re-scores the degraded
    images and publishes their corrections, plus a new revision of each event whose label changed. A deduplicating
    consumer ends with each correction exactly once, equal to the results file's record, which keeps the original
    in moevit_corrects; the outbox sent each message once."""
    from tests.test_uplink import MOSQUITTO, Broker, Consumer

    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (make test installs it)")
    model = small_moe_model(LAYERS, num_classes=3, labels=LABELS, image_size=SIZE, calib_size=SIZE)
    path = save_checkpoint(model, tmp_path / "moe.safetensors")
    images = tmp_path / "images" / "cam01"
    images.mkdir(parents=True)
    colours = [(200, 30, 30), (30, 60, 220), (40, 170, 60), (230, 210, 40)]
    for burst, colour in enumerate(colours):
        for k in range(6):
            _jpeg(images / f"b{burst}_{k}.jpg", datetime(2024, 5, 1, 6 + burst, 0, 2 * k), colour)
    ports = {"cam": free_port(), "north": free_port()}
    topo = write_topology(tmp_path, path, ports, fallback="skip",
                          placement={layer: {"north": list(range(6))} for layer in LAYERS})
    north = f"127.0.0.1:{ports['north']}"
    mqtt_port = free_port()
    (tmp_path / "broker").mkdir()
    broker = Broker(tmp_path / "broker", mqtt_port).start()
    consumer = Consumer(mqtt_port, "t/#")
    payloads: dict[str, dict] = {}
    keep = consumer.c.on_message

    def on_message(client, userdata, msg) -> None:
        body = json.loads(msg.payload)
        payloads.setdefault(body["id"], body)
        keep(client, userdata, msg)

    consumer.c.on_message = on_message
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "moevit.coordinator.cli", "--topology", str(topo), "--images",
           str(tmp_path / "images"), "--out", str(out), "--batch-size", "2", "--no-spawn", "--threads", "1",
           "--mqtt", f"mqtt://127.0.0.1:{mqtt_port}/t", "--mqtt-wait", "30"]

    def build(recs):
        return res.build_megadetector(recs, labels=LABELS, fingerprint=recs[0]["model"])

    worker = start_worker(str(path), north)
    coord = None
    try:
        coord = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        partial = res.partial_path(out)
        deadline = time.monotonic() + 120
        while not (partial.exists() and len(res.read_jsonl(partial)[0]) >= 4):
            assert coord.poll() is None, coord.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        worker.send_signal(signal.SIGKILL)  # mid-run
        worker.wait(timeout=10)
        stdout, stderr = coord.communicate(timeout=180)
        assert coord.returncode == 0, stderr[-3000:]
        first = {r["file"]: r for r in res.records_from_megadetector(json.loads(out.read_text()))}
        degraded = sorted(f for f, r in first.items() if r["degraded"])
        assert degraded and all(first[f]["degraded_sites"] == ["north"] for f in degraded)
        assert f"still degraded: {len(degraded)} image(s) wait for site(s) north" in stdout
        events_before = events_from_megadetector(build(list(first.values())), deployment="cam")
        assert any(e.degraded for e in events_before)
        assert consumer.wait_for(len(events_before)) == {e.message_id for e in events_before}

        worker = start_worker(str(path), north)  # north is back: the same command corrects the degraded images
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"re-scored: {len(degraded)} degraded image(s)" in r.stdout
        doc = json.loads(out.read_text())
        check_megadetector(doc)
        records = {rec["file"]: rec for rec in res.records_from_megadetector(doc)}
        assert sorted(f for f, rec in records.items() if rec.get("revision")) == degraded
        for f in degraded:  # the results file shows both: the correction, and the record it replaced
            assert records[f]["revision"] == 1 and not records[f]["degraded"]
            assert records[f]["corrects"] == {k: first[f][k] for k in records[f]["corrects"]}
            assert records[f]["corrects"]["degraded"] is True
        want = {f"{image_key(records[f]['model'], f)}-img-r1": records[f] for f in degraded}
        events = revise_events(list(records.values()), build, deployment="cam")
        revised = [e for e in events if e.revision]
        expected = set(want) | {e.message_id for e in events_before} | {e.message_id for e in revised}
        got = consumer.wait_for(len(expected), timeout=60)
        assert got == expected
        for mid, rec in want.items():  # what the consumer keeps is the results file's corrected record
            body = payloads[mid]
            assert (body["type"], body["revision"]) == ("correction", 1)
            # (the per-image strategy is in the record, not in MegaDetector output)
            assert {k: v for k, v in body.items() if k not in ("type", "id", "image", "strategy")} == rec
        assert all(not payloads[e.message_id]["degraded"] for e in revised)
        with consumer.lock:
            raw = list(consumer.ids)
        print(f"\n{len(degraded)} of 24 images degraded and corrected; {len(raw)} messages, {len(raw) - len(got)} "
              f"raw duplicates; events revised: {len(revised)} of {len(events)}")

        # each message was queued once, whatever each run queued again (a rerun: test_run_batch_rescores_...)
        box = Outbox(f"{out}.outbox.sqlite")
        assert box.counts() == {"pending": 0, "delivered": len(expected)}
        box.close()
    finally:
        if coord is not None and coord.poll() is None:
            coord.kill()
        stop(worker)
        consumer.close()
        broker.stop()
