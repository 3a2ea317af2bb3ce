"""Issue 21: untrusted inputs that used to end a run or pass as results, each against real processes or files.

Worker answers (NaN, a column too many) from a worker process that lies; EXIF that ends a batch run; 16-bit images;
two runs on one ``--out``; a full disk.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from moevit.coordinator import fieldmeta
from moevit.coordinator import results as res
from moevit.coordinator.local import free_port, wait_serving, write_topology
from moevit.sim.attacks import small_model, stop
from PIL import Image

from moevit.data import load_image

REPO_ROOT = Path(__file__).resolve().parent.parent

LYING_WORKER = textwrap.dedent("""
    import asyncio, sys, torch
    from moevit.worker.backends import TorchBackend
    from moevit.worker.server import WorkerServer, load_hosted
    from moevit.worker.service import ExpertServicer
    from moevit_rpc.tensors import proto_to_tensor, tensor_to_proto

    model, address, mode = sys.argv[1:4]
    honest = ExpertServicer.answer

    async def answer(self, request):  # the worker computes, then lies about the result
        resp = await honest(self, request)
        y = proto_to_tensor(resp.packed.tokens)
        y = torch.full_like(y, float("nan")) if mode == "nan" else torch.cat([y, y[:, :1]], dim=1)
        resp.packed.tokens.CopyFrom(tensor_to_proto(y, "fp32"))
        return resp

    ExpertServicer.answer = answer
    banks, fingerprint, _ = load_hosted(model, None)
    server = WorkerServer(TorchBackend(banks), fingerprint, arch="lying", address=address)
    asyncio.run(server.run_until_signal())
""")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return small_model(tmp_path_factory.mktemp("untrusted"))


@pytest.fixture(scope="module")
def liars(model):
    """mode -> address of a lying worker process ("nan", "wide"), started together and shared by the tests below:
    a liar keeps no state between calls (it computes, then lies), so each test meets the same liar a fresh one is."""
    path, _ = model
    procs, addresses = [], {}
    try:
        for mode in ("nan", "wide"):
            addresses[mode] = f"127.0.0.1:{free_port()}"
            procs.append(subprocess.Popen([sys.executable, "-c", LYING_WORKER, str(path), addresses[mode], mode],
                                          cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        for proc, address in zip(procs, addresses.values(), strict=True):
            wait_serving(address, proc, timeout=120)
        yield addresses
    finally:
        for proc in procs:
            stop(proc)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["nan", "wide"])
def test_a_lying_workers_answer_is_a_site_failure(model, liars, mode):
    """Item 5: a worker answering NaN (before: 0 degraded, 0 failed, "conf": NaN in the output) or one column too
    many (before: a RuntimeError traceback) gives SiteError INTERNAL, the failure the dispatcher sends to the next
    replica or the fallback, never outputs."""
    from moevit.coordinator.sites import SiteClient, SiteError

    _, fingerprint = model
    address = liars[mode]
    for stream in (True, False):
        client = SiteClient("liar", address, fingerprint=fingerprint, wire="fp32", watch=False, stream=stream)
        try:
            call = client.start(8, [(0, torch.randn(5, 128)), (2, torch.randn(3, 128))])
            with pytest.raises(SiteError) as err:
                call.result()
        finally:
            client.close()
        assert err.value.code == grpc.StatusCode.INTERNAL
        assert ("NaN" if mode == "nan" else "shape [8, 129], expected [8, 128]") in str(err.value)
        assert client.traffic.failures == 1


def test_records_and_results_are_strict_json(tmp_path):
    """Item 5: a NaN never reaches a results file as invalid JSON: it is refused where records are written."""
    with res.ResultLog(tmp_path / "log.jsonl") as log, pytest.raises(ValueError):
        log.append([{"file": "a.jpg", "confidence": float("nan")}])
    with pytest.raises(ValueError):
        res.write_json_atomic(tmp_path / "r.json", {"conf": float("inf")})
    assert not (tmp_path / "r.json").exists()


def _exif(offset: str) -> Image.Exif:
    exif = Image.Exif()
    exif[fieldmeta.EXIF_IFD] = {fieldmeta.TAG_DATETIME_ORIGINAL: "2024:05:01 06:00:00",
                                fieldmeta.TAG_OFFSET_TIME_ORIGINAL: offset}
    return exif


@pytest.mark.parametrize("offset", ["+24:00", "-99:99", "+23:59x"])
def test_an_offset_that_is_no_time_zone_is_read_without_one(tmp_path, offset, caplog):
    path = tmp_path / "x.jpg"
    Image.new("RGB", (16, 16)).save(path, exif=_exif(offset))
    meta = fieldmeta.read_image_meta(path)
    assert meta.datetime == "2024-05-01T06:00:00" and meta.time_source == fieldmeta.SOURCE_EXIF_ORIGINAL
    if offset != "+23:59x":
        assert str(path) in caplog.text and "not a time zone" in caplog.text


def test_metadata_that_breaks_the_reader_gives_the_file_time_and_a_warning(tmp_path, caplog, monkeypatch):
    path = tmp_path / "x.jpg"
    Image.new("RGB", (16, 16)).save(path, exif=_exif("+02:00"))

    def broken(*_a, **_k):
        raise OverflowError("date value out of range")

    monkeypatch.setattr(fieldmeta, "parse_exif_datetime", broken)  # whatever a value does to the parsing
    meta = fieldmeta.read_image_meta(path)
    assert meta.time_source == fieldmeta.SOURCE_MTIME and fieldmeta.FLAG_UNPARSEABLE in meta.time_flags
    assert str(path) in caplog.text and "OverflowError" in caplog.text


@pytest.fixture(scope="module")
def field(model, tmp_path_factory):
    """A topology (coordinator cam + worker w), the worker process, and an image folder with a hostile EXIF
    offset, a 16-bit PNG and a normal JPEG."""
    tmp = tmp_path_factory.mktemp("field")
    path, _ = model
    ports = {"cam": free_port(), "w": free_port()}
    topology = write_topology(tmp, path, ports, placement={8: {"cam": [2, 3], "w": [0, 1]},
                                                           5: {"cam": [0, 1], "w": [2, 3]}})
    worker = subprocess.Popen([sys.executable, "-m", "moevit.worker.cli", "--listen", f"127.0.0.1:{ports['w']}",
                               "--model", str(path), "--experts", "8:0-1,5:2-3", "--threads", "1"], cwd=REPO_ROOT,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    images = tmp / "images"
    images.mkdir()
    Image.new("RGB", (48, 36), (120, 80, 40)).save(images / "bad_offset.jpg", exif=_exif("+24:00"))
    Image.new("RGB", (48, 36), (40, 80, 120)).save(images / "plain.jpg")
    grey = np.linspace(0, 65535, 48 * 36).reshape(36, 48).astype(np.uint16)
    Image.fromarray(grey).save(images / "wide16.png")
    try:
        wait_serving(f"127.0.0.1:{ports['w']}", worker, timeout=120)
        yield {"tmp": tmp, "topology": topology, "images": images, "worker": f"127.0.0.1:{ports['w']}"}
    finally:
        stop(worker)


def _run(field, out: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moevit.coordinator.cli", "--topology", str(field["topology"]),
                           "--images", str(field["images"]), "--out", str(out), "--no-spawn", "--threads", "1",
                           "--image-size", "64"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_a_bad_exif_offset_is_named_classified_and_resumes(field):
    """Item 4: OffsetTimeOriginal "+24:00" used to end the run (exit 2, no file named) and every resume."""
    out = field["tmp"] / "exif" / "results.json"
    r = _run(field, out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bad_offset.jpg" in r.stderr and "not a time zone" in r.stderr
    ims = {im["file"]: im for im in json.loads(out.read_text())["images"]}
    assert ims["bad_offset.jpg"]["detections"] and ims["bad_offset.jpg"]["datetime"] == "2024-05-01T06:00:00"
    res.partial_path(out).write_text("")  # a resume: every image is reused from results.json
    r = _run(field, out)
    assert r.returncode == 0 and "resuming" in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_a_second_run_on_the_same_out_is_refused_while_the_first_holds_it(field):
    """Item 8: two runs on one --out both reported success and one's results were lost. The lock is held by a
    process standing in for the first run (the same OutputLock); the second run is refused at once, naming the
    file and the holder; once the holder exits (even by kill -9) a run goes through."""
    out = field["tmp"] / "locked" / "results.json"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from moevit.coordinator.results import "
                               "OutputLock; lock = OutputLock(sys.argv[1]); print('held', flush=True); "
                               "time.sleep(600)", str(out)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = _run(field, out, timeout=60)
        assert r.returncode == 2, r.stderr[-2000:]
        assert f"{out} is being written by another run (pid {holder.pid}" in r.stderr
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    r = _run(field, out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.exists() and not out.with_name(out.name + res.LOCK_SUFFIX).exists()


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    """Item 7: an I;16 PNG decoded 99.6 % saturated. Now 16-bit, 32-bit integer and float images give what their
    8-bit equivalent gives (within rounding)."""
    ramp = np.linspace(0, 1, 64 * 48).reshape(48, 64)
    eight = io.BytesIO()
    Image.fromarray((ramp * 255).round().astype(np.uint8)).save(eight, "PNG")
    reference = load_image(eight.getvalue(), 32)
    for mode, array in (("I;16", (ramp * 65535).round().astype(np.uint16)),
                        ("I", (ramp * 65535).round().astype(np.int32)),
                        ("F", ramp.astype(np.float32))):
        path = tmp_path / f"wide_{mode.replace(';', '')}.{'png' if mode == 'I;16' else 'tif'}"
        Image.fromarray(array, mode=mode if mode != "I;16" else None).save(path)
        with Image.open(path) as im:
            assert im.mode in ("I;16", "I", "F")
        x = load_image(path, 32)
        assert (x - reference).abs().max() < 0.05, mode


def test_a_full_disk_leaves_no_temporary_file_and_names_the_file(tmp_path):
    """A write that runs out of space (here a file-size limit: EFBIG, as ENOSPC would) leaves no stray temporary
    file, and the error names the file."""
    out = tmp_path / "results.json"
    code = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        from moevit.coordinator import results as res
        try:
            res.write_json_atomic({str(out)!r}, {{"images": ["x" * 100] * 1000}})
        except OSError as e:
            print(e)
            sys.exit(3)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    assert f"cannot write {out}" in r.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags", [["--token-file", "/dev/zero"],
                                   ["--tls-ca", "/dev/zero", "--tls-cert", "/dev/zero", "--tls-key", "/dev/zero"]])
def test_token_and_tls_files_are_read_with_a_size_limit(model, flags):
    """Before: /dev/zero as a token or TLS file was read until memory ran out (8.7 GB). Now: one line, exit 2."""
    r = subprocess.run([sys.executable, "-m", "moevit.worker.cli", "--listen", "127.0.0.1:0", "--model",
                        str(model[0]), "--experts", "all", *flags], cwd=REPO_ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "/dev/zero: larger than" in r.stderr and "Traceback" not in r.stderr


def test_moe_certs_keeps_an_existing_ca_and_never_writes_through_a_symlink(model, tmp_path):
    """moe-certs replaced an existing CA silently and wrote a key through a symlink planted in --out."""
    topology = write_topology(tmp_path, model[0], {"cam": free_port(), "w": free_port()})
    out = tmp_path / "pki"

    def certs(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "moevit.coordinator.certs", "--topology", str(topology),
                               "--out", str(out), "--tokens", *extra], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=60)

    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("not yours\n")
    (out / "w.key").symlink_to(victim)
    (out / "w.token").symlink_to(victim)
    assert certs().returncode == 0
    assert victim.read_text() == "not yours\n"
    for name in ("w.key", "w.token", "ca.key"):
        assert not (out / name).is_symlink() and (out / name).stat().st_mode & 0o777 == 0o600, name
    ca = (out / "ca.pem").read_bytes()
    r = certs()
    assert r.returncode == 2 and "already holds a CA" in r.stderr and "--replace-ca" in r.stderr
    assert (out / "ca.pem").read_bytes() == ca
    assert certs("--replace-ca").returncode == 0 and (out / "ca.pem").read_bytes() != ca


HONEST = {8: {"cam": [2, 3], "w": [0, 1]}, 5: {"cam": [0, 1], "w": [2, 3]}}


def _placed_run(tmp: Path, model_path: Path, name: str, placement: dict, addresses: dict[str, str]
                ) -> tuple[subprocess.CompletedProcess, dict]:
    """A batch run (``moe-coordinator --data``, 40 images) with ``placement`` over the workers at ``addresses``;
    (the finished process, its results.json read as strict JSON)."""
    ports = {"cam": free_port(), **{site: 0 for site in placement[8] if site != "cam"}}
    topology = write_topology(tmp, model_path, ports, name=f"{name}.yaml", placement=placement,
                              addresses={s: addresses[s] for s in ports if s != "cam"})
    out = tmp / name / "results.json"
    r = subprocess.run([sys.executable, "-m", "moevit.coordinator.cli", "--topology", str(topology), "--data",
                        "synthetic:classes=5,per_class=10,size=64", "--split", "train", "--out", str(out),
                        "--no-spawn", "--threads", "1", "--image-size", "64", "--batch-size", "4"], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    def strict(constant: str) -> None:
        raise AssertionError(f"{out} holds {constant}: not strict JSON")

    return r, json.loads(out.read_text(), parse_constant=strict)


@pytest.fixture(scope="module")
def honest_alone(model, field, tmp_path_factory):
    """The run on the honest worker alone (``field``'s worker: the same experts of the same model), which each
    lying run below must equal; the same for both liars, so run once."""
    return _placed_run(tmp_path_factory.mktemp("honest"), model[0], "honest", HONEST, {"w": field["worker"]})


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["nan", "wide"])
def test_a_lying_worker_beside_an_honest_replica_leaves_the_results_to_the_honest_one(model, field, liars,
                                                                                      honest_alone, tmp_path, mode):
    """Item 5 end to end: a batch run (``moe-coordinator --data``) over a lying worker ("liar": NaN, or a column too
    many) and an honest replica ("w") of the same experts, with fallback ``fail``. The liar comes first in the
    placement's order, so it is called; each of its answers is a site failure retried on the honest replica. The
    run's results equal a run on the honest worker alone: nothing degraded or failed, the same accuracy, the same
    predictions and confidences, in strict JSON."""
    alone, expected = honest_alone
    both, got = _placed_run(tmp_path, model[0], "lying", {8: {"cam": [2, 3], "liar": [0, 1], "w": [0, 1]},
                                                          5: {"cam": [0, 1], "liar": [2, 3], "w": [2, 3]}},
                            {"w": field["worker"], "liar": liars[mode]})
    summary = [line for line in both.stdout.splitlines() if " images: " in line]
    assert summary == [line for line in alone.stdout.splitlines() if " images: " in line], both.stdout
    assert summary[0].endswith("classified (0 degraded), 0 failed"), both.stdout
    accuracy = [line for line in both.stdout.splitlines() if line.startswith("accuracy ")]
    assert accuracy and accuracy == [line for line in alone.stdout.splitlines() if line.startswith("accuracy ")]
    liar_calls = next(int(line.split()[2]) for line in both.stdout.splitlines() if line.startswith("liar "))
    retried = next(int(line.split(", ")[1].split()[0]) for line in both.stdout.splitlines()
                   if line.startswith("rpc: "))
    assert liar_calls >= 1 and retried >= 1, both.stdout  # the liar was asked, and its answers went elsewhere
    assert len(got["images"]) == len(expected["images"]) == 40
    for a, b in zip(got["images"], expected["images"], strict=True):
        assert a["file"] == b["file"] and not a.get("degraded") and "error" not in a, a
        assert [d["category"] for d in a["detections"]] == [d["category"] for d in b["detections"]], (a, b)
        assert np.allclose([d["conf"] for d in a["detections"]], [d["conf"] for d in b["detections"]], atol=1e-5)
