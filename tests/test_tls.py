"""Mutual TLS and bearer tokens on real ``moe-worker`` processes and on the coordinator's Classify server.

Two workers run for the whole module, with a PKI made by ``write_site_pki`` (one CA, a certificate per site,
SANs 127.0.0.1/localhost): ``north`` started the way the coordinator's launcher starts it (``--topology --site``,
TLS and token from sites.yaml), ``south`` with ``--listen`` and the ``--tls-*``/``--token-file`` flags.

What a refused client really sees: a missing or wrong token gets UNAUTHENTICATED (the call reached the worker).
Every TLS failure (no client certificate, one from another CA, an expired one, a plaintext client of a TLS
server, a server certificate the client does not trust) fails the handshake, so no call ever opens and grpc
reports UNAVAILABLE; the tests assert UNAVAILABLE for that reason, not because the worker chose the code.
"""

from __future__ import annotations

import datetime as dt
import io
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from moevit.deploy.topology import TLSFiles, load_topology
from moevit.worker import cli

from moevit.calibration import default_for as default_calibration
from moevit_rpc.channels import check_tls_files, open_channel
from moevit_rpc.security import (
    channel_credentials,
    make_site_cert,
    token_metadata,
    write_site_pki,
)
from moevit_rpc.tensors import proto_to_tensor
from moevit_rpc.v1 import expert_pb2, expert_pb2_grpc
from tests.netutil import READY_CHANNEL_OPTIONS, free_port
from tests.test_worker import DIMS, RPC_TIMEOUT, WorkerProcess, model_file, request  # noqa: F401 (a fixture)

SERVING = health_pb2.HealthCheckResponse.SERVING
UNAVAILABLE, UNAUTHENTICATED = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED
STARTUP_S = 60.0  # two workers import torch at once on possibly two loaded cores


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca.pem/ca.key and <site>.pem/.key/.token for cam (the coordinator), north and south."""
    d = tmp_path_factory.mktemp("pki")
    write_site_pki(d, {"cam": "127.0.0.1", "north": "127.0.0.1", "south": "127.0.0.1"}, tokens=True)
    return d


def files(d: Path, site: str) -> TLSFiles:
    return TLSFiles(d / "ca.pem", d / f"{site}.pem", d / f"{site}.key")


def creds(d: Path, site: str) -> grpc.ChannelCredentials:
    return channel_credentials(*files(d, site).__dict__.values())


def token(d: Path, site: str) -> str:
    return (d / f"{site}.token").read_text().strip()


@pytest.fixture(scope="module")
def topology_file(pki, model_file) -> Path:  # noqa: F811 (the imported fixture)
    device = {"gflops": 5, "memory_mb": 256, "active_w": 3, "idle_w": 1}
    # dict(device): one dict per site, or safe_dump writes a YAML anchor, which topology files refuse
    sites = {name: {"address": f"127.0.0.1:{free_port()}", "device": dict(device),
                    "token_file": str(pki / f"{name}.token"),
                    "tls": {k: str(v) for k, v in files(pki, name).__dict__.items()}} for name in ("cam", "north")}
    path = pki / "sites.yaml"
    path.write_text(yaml.safe_dump({"model": str(model_file), "coordinator": "cam", "sites": sites,
                                    "links": [{"between": ["cam", "north"], "bandwidth_mbps": 20, "latency_ms": 4}]}))
    return path


def wait_serving_tls(worker: WorkerProcess, credentials: grpc.ChannelCredentials) -> None:
    """WorkerProcess.wait_serving, over TLS (its own check is plaintext, which a TLS worker refuses)."""
    deadline = time.monotonic() + STARTUP_S
    with grpc.secure_channel(worker.address, credentials, options=READY_CHANNEL_OPTIONS) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if worker.proc.poll() is not None:
                pytest.fail(f"worker exited with {worker.proc.returncode}:\n{worker.log()}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status == SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    pytest.fail(f"worker not SERVING over TLS within {STARTUP_S} s:\n{worker.log()}")


@pytest.fixture(scope="module")
def workers(pki, topology_file, model_file):  # noqa: F811 (the imported fixture)
    north = load_topology(topology_file).site("north").address
    south = f"127.0.0.1:{free_port()}"
    sec = ["--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "south.pem"), "--tls-key", str(pki / "south.key"),
           "--token-file", str(pki / "south.token")]
    procs = {  # both start before either is waited for: the imports overlap
        "north": WorkerProcess(["--topology", str(topology_file), "--site", "north", "--threads", "1"], north),
        "south": WorkerProcess(["--listen", south, "--model", str(model_file), "--experts", "8:0", "--site", "south",
                                "--threads", "1", *sec], south),
    }
    try:
        for w in procs.values():
            wait_serving_tls(w, creds(pki, "cam"))
        yield procs
    finally:
        for w in procs.values():
            w.close()


# ----------------------------------------------------------------------------------------------- helpers


def info(address: str, credentials: grpc.ChannelCredentials | None, tok: str | None) -> expert_pb2.InfoResponse:
    ch = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with ch:
        return expert_pb2_grpc.ExpertServiceStub(ch).Info(expert_pb2.InfoRequest(), timeout=RPC_TIMEOUT,
                                                          metadata=token_metadata(tok))


def refused(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == code, e.value.details()
    return e.value.details() or ""


def run_experts(channel: grpc.Channel, fingerprint: str, tok: str | None) -> None:
    """Layer-8 tokens through expert 1 (hosted on north) answer with the right shape."""
    x = torch.randn(7, DIMS[8])
    resp = expert_pb2_grpc.ExpertServiceStub(channel).RunExperts(
        request(fingerprint, 8, [(1, x, "fp32")]), timeout=RPC_TIMEOUT, metadata=token_metadata(tok))
    assert proto_to_tensor(resp.outputs[0].tokens).shape == x.shape


# ---------------------------------------------------------------------------------------------- workers


def test_coordinator_channel_with_its_own_certificate_and_the_sites_token(workers, pki, topology_file):
    # exactly how the coordinator calls a worker: open_channel with the COORDINATOR site's files, and the
    # CALLED site's token as per-call metadata
    topo = load_topology(topology_file)
    north = topo.site("north")
    with open_channel(north.address, tls=topo.site(topo.coordinator).tls, max_message_mb=8) as ch:
        resp = expert_pb2_grpc.ExpertServiceStub(ch).Info(expert_pb2.InfoRequest(), timeout=RPC_TIMEOUT,
                                                          metadata=token_metadata(north.token()))
        assert resp.site == "north" and [(hl.layer, list(hl.experts)) for hl in resp.layers] == [(5, [1, 3]),
                                                                                                (8, [1, 3])]
        run_experts(ch, resp.model_fingerprint, north.token())
    # the --listen worker, dialled by name: the certificates also carry DNS:localhost
    port = workers["south"].address.rsplit(":", 1)[1]
    assert info(f"localhost:{port}", creds(pki, "cam"), token(pki, "south")).site == "south"
    for w in workers.values():
        assert "tls=on token=on" in w.log()


def test_split_inference_over_mutual_tls_with_tokens(workers, topology_file):
    """The coordinator's runtime, configured only by sites.yaml (its own certificate, each site's token), checks
    the TLS workers and classifies exactly as the in-process model does."""
    from moevit.coordinator.runtime import SplitRuntime

    from moevit.checkpoint import load_checkpoint
    from moevit.fuse import fold_batchnorm

    topo = load_topology(topology_file)
    rt = SplitRuntime.from_topology(topo, wire="fp32")
    try:
        assert set(rt.check_workers()) == {"north"}
        size = rt.model.config.image_size
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        res = rt.classify(x)
        ref = load_checkpoint(topo.model).eval()
        fold_batchnorm(ref)  # as the coordinator runs the trunk
        with torch.no_grad():
            torch.testing.assert_close(res.logits, ref(x), atol=1e-5, rtol=1e-5)
        assert not res.degraded.any()
        assert all(t["calls"] > 0 for t in rt.traffic().values())
    finally:
        rt.close()


def _expired(pki: Path, out: Path) -> grpc.ChannelCredentials:
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30)
    cert, key = make_site_cert((pki / "ca.pem").read_bytes(), (pki / "ca.key").read_bytes(), "cam", ["127.0.0.1"],
                               days=1, not_before=past)
    (out / "old.pem").write_bytes(cert)
    (out / "old.key").write_bytes(key)
    return channel_credentials(pki / "ca.pem", out / "old.pem", out / "old.key")


def _other_ca(out: Path) -> Path:
    write_site_pki(out / "other", {"cam": "127.0.0.1"})
    return out / "other"


CASES = {
    "no client certificate": (lambda pki, tmp: channel_credentials(pki / "ca.pem"), UNAVAILABLE),
    "certificate of another CA": (lambda pki, tmp: channel_credentials(
        pki / "ca.pem", _other_ca(tmp) / "cam.pem", tmp / "other" / "cam.key"), UNAVAILABLE),
    "expired certificate": (_expired, UNAVAILABLE),
    "plaintext client": (lambda pki, tmp: None, UNAVAILABLE),
    "client not trusting the worker's CA": (lambda pki, tmp: creds(_other_ca(tmp), "cam"), UNAVAILABLE),
}


@pytest.mark.parametrize("site", ["north", "south"])
@pytest.mark.parametrize("case", CASES)
def test_tls_failures_are_refused_at_the_handshake(workers, pki, tmp_path, site, case):
    make, code = CASES[case]
    credentials = make(pki, tmp_path)
    # the right token is sent: only the TLS side is wrong
    refused(lambda: info(workers[site].address, credentials, token(pki, site)), code)


@pytest.mark.parametrize("given", [None, "not-the-token", "south"], ids=["missing", "wrong", "another-sites"])
def test_missing_or_wrong_token_is_unauthenticated(workers, pki, given):
    tok = token(pki, given) if given == "south" else given
    details = refused(lambda: info(workers["north"].address, creds(pki, "cam"), tok), UNAUTHENTICATED)
    assert "bearer token" in details


def test_health_needs_tls_but_no_token(workers, pki):
    for w in workers.values():
        with grpc.secure_channel(w.address, creds(pki, "cam")) as ch:
            assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                        timeout=RPC_TIMEOUT).status == SERVING
        with grpc.insecure_channel(w.address) as ch:
            refused(lambda ch=ch: health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                                       timeout=RPC_TIMEOUT), UNAVAILABLE)


def test_workers_keep_serving_after_the_refusals(workers, pki):
    # runs after the refusal tests above (file order): neither worker died or stopped answering
    for site, w in workers.items():
        assert w.proc.poll() is None, w.log()
        with grpc.secure_channel(w.address, creds(pki, "cam")) as ch:
            assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                        timeout=RPC_TIMEOUT).status == SERVING
            fingerprint = info(w.address, creds(pki, "cam"), token(pki, site)).model_fingerprint
            if site == "north":
                run_experts(ch, fingerprint, token(pki, site))
        assert "Traceback" not in w.log()


# ------------------------------------------------------------------------------------ coordinator's checks


def test_open_channel_refuses_unusable_own_files(pki, tmp_path):
    # the coordinator fails at once, naming the file, instead of seeing UNAVAILABLE from every worker
    _expired(pki, tmp_path)
    bad = {
        "expired on": TLSFiles(pki / "ca.pem", tmp_path / "old.pem", tmp_path / "old.key"),
        "does not belong": TLSFiles(pki / "ca.pem", pki / "cam.pem", pki / "north.key"),
        "not signed by the CA": TLSFiles(pki / "ca.pem", _other_ca(tmp_path) / "cam.pem", tmp_path / "other/cam.key"),
        "no such": TLSFiles(pki / "ca.pem", pki / "cam.pem", tmp_path / "missing.key"),
        "not a PEM certificate": TLSFiles(pki / "cam.key", pki / "cam.pem", pki / "cam.key"),
    }
    for words, tls in bad.items():
        with pytest.raises(ValueError, match=words):
            open_channel("127.0.0.1:1", tls=tls, max_message_mb=8)
    check_tls_files(files(pki, "cam"))


# ------------------------------------------------------------------------------------------- worker CLI


@pytest.mark.parametrize("argv, words", [
    (["--tls-ca", "{pki}/ca.pem"], "--tls-ca without --tls-cert, --tls-key: mutual TLS needs all three"),
    (["--tls-ca", "{pki}/ca.pem", "--tls-cert", "{pki}/north.pem", "--tls-key", "{tmp}/nope.key"],
     "nope.key: no such key file"),
    (["--tls-ca", "{pki}/ca.pem", "--tls-cert", "{pki}/north.pem", "--tls-key", "{pki}/south.key"],
     "does not belong to the certificate"),
    (["--token-file", "{tmp}/nope.token"], "nope.token: no such token file"),
    (["--token-file", "{tmp}"], "cannot read the token file"),
    (["--token-file", "{tmp}/empty.token"], "the token file is empty"),
], ids=["partial-tls", "missing-key", "wrong-key", "missing-token", "token-is-a-folder", "empty-token"])
def test_worker_cli_security_mistakes_are_one_line_exit_2(model_file, pki, tmp_path, capsys, argv,  # noqa: F811
                                                          words):
    (tmp_path / "empty.token").write_text("\n")
    argv = [a.format(pki=pki, tmp=tmp_path) for a in argv]
    assert cli.main(["--listen", "127.0.0.1:0", "--model", str(model_file), "--experts", "8:0", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-worker: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert words in err


def test_worker_cli_flags_override_the_sites_tls_and_token(pki, tmp_path):
    site_plan = cli._Plan(Path("m"), None, "127.0.0.1:0", "north", tls=files(pki, "north"),
                          token_file=pki / "north.token")
    args = cli._parser().parse_args([])
    assert cli._security(args, site_plan) == (files(pki, "north"), token(pki, "north"))
    args = cli._parser().parse_args(["--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "south.pem"),
                                     "--tls-key", str(pki / "south.key"), "--token-file", str(pki / "south.token")])
    assert cli._security(args, site_plan) == (files(pki, "south"), token(pki, "south"))
    assert cli._security(cli._parser().parse_args([]), cli._Plan(Path("m"), None, "x:1", "x")) == (None, None)


# ------------------------------------------------------------------------------------- Classify server


class _Runtime:
    """Just what the Classify servicer uses of a SplitRuntime: the security under test is in front of it."""

    fingerprint = "stub"
    model = SimpleNamespace(config=SimpleNamespace(labels=("a", "b", "c")))
    calibration = default_calibration(("a", "b", "c"))  # no temperature: softmax of the logits

    def classify(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.tensor([[0.0, 2.0, 1.0]]).expand(len(x), 3),
                               degraded=torch.zeros(len(x), dtype=torch.bool))


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


async def test_classify_server_with_the_coordinator_sites_tls_and_token(pki, topology_file):
    from moevit.coordinator.cli import _classify_security
    from moevit.coordinator.server import start_server

    credentials, tok = _classify_security(load_topology(topology_file))
    assert credentials is not None and tok == token(pki, "cam")
    running = await start_server(_Runtime(), "127.0.0.1:0", image_size=16, credentials=credentials, token=tok)
    req = expert_pb2.ClassifyRequest(image=_png(), name="x", top_k=2)

    async def classify(channel_creds: grpc.ChannelCredentials | None, t: str | None) -> expert_pb2.ClassifyResponse:
        ch = (grpc.aio.secure_channel(running.address, channel_creds) if channel_creds
              else grpc.aio.insecure_channel(running.address))
        async with ch:
            return await expert_pb2_grpc.ClassifierServiceStub(ch).Classify(req, timeout=RPC_TIMEOUT,
                                                                            metadata=token_metadata(t))

    async def code(channel_creds: grpc.ChannelCredentials | None, t: str | None) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await classify(channel_creds, t)
        return e.value.code()

    try:
        resp = await classify(creds(pki, "north"), tok)  # any site's certificate of the CA is a client's
        assert [p.label for p in resp.top] == ["b", "c"] and resp.name == "x"
        assert await code(None, tok) == UNAVAILABLE  # plaintext
        assert await code(channel_credentials(pki / "ca.pem"), tok) == UNAVAILABLE  # no client certificate
        assert await code(creds(pki, "north"), None) == UNAUTHENTICATED
        assert await code(creds(pki, "north"), token(pki, "north")) == UNAUTHENTICATED  # another site's token
        async with grpc.aio.secure_channel(running.address, creds(pki, "north")) as ch:
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT)
        assert health.status == SERVING
        assert (await classify(creds(pki, "north"), tok)).top[0].label == "b"  # still serving after the refusals
    finally:
        await running.stop(0)


@pytest.mark.parametrize("text", ["two words\n", "  \n", "caf\u00e9\n", "x" * 5000])
def test_one_token_rule_for_the_worker_and_the_coordinator(tmp_path, text):
    """A token file the worker refuses, the Classify server and the coordinator's calls refuse too (the Classify
    server used to accept any non-empty text)."""
    from moevit.deploy.config import ConfigError
    from moevit.deploy.topology import Device, Site

    from moevit_rpc.channels import read_token

    token_file = tmp_path / "site.token"
    token_file.write_text(text, encoding="utf-8")
    site = Site("cam", "127.0.0.1:50051", Device(1.0, 64.0, 1.0, 0.5), token_file=token_file)
    with pytest.raises(cli.CliError, match="site.token"):
        cli._read_token(token_file)  # the worker
    with pytest.raises(ConfigError, match=r"sites\.cam\.token_file"):
        site.token()  # the coordinator: the Classify server's token and the token it sends each site
    with pytest.raises(ValueError):
        read_token(token_file)
    token_file.write_text("  s3cret-Token_1  \n", encoding="utf-8")
    assert site.token() == cli._read_token(token_file) == read_token(token_file) == "s3cret-Token_1"


def test_token_and_tls_files_share_one_bounded_read(tmp_path):
    """Token files (4 KiB) and TLS files (1 MiB) are read by one helper: at most the cap plus a byte, a missing or
    oversized file named with what it should be and how to make one; and reading a token loads no grpc."""
    import subprocess
    import sys

    from moevit_rpc.channels import read_token

    big = tmp_path / "big"
    big.write_bytes(b"x" * ((1 << 20) + 1))
    with pytest.raises(ValueError, match=r"big: larger than 4,096 bytes; not a token file \(moe-certs --tokens "
                                         r"makes one\)$"):
        read_token(big)
    with pytest.raises(ValueError, match=r"nope: no such token file \(moe-certs --tokens makes one\)$"):
        read_token(tmp_path / "nope")
    tls = TLSFiles(big, big, big)
    with pytest.raises(ValueError, match=r"big: larger than 1,048,576 bytes; not a CA certificate file \(make one "
                                         r"with moe-certs\)$"):
        check_tls_files(tls)
    with pytest.raises(ValueError, match=r"nope: no such CA certificate file \(make one with moe-certs\)$"):
        check_tls_files(TLSFiles(tmp_path / "nope", big, big))
    with pytest.raises(ValueError, match=r"cannot read the token file: Is a directory$"):
        read_token(tmp_path)
    (tmp_path / "t").write_text("tok\n")
    code = ("import sys; from moevit_rpc.channels import read_token; assert read_token(sys.argv[1]) == 'tok';"
            "sys.exit(bool([m for m in sys.modules if m.split('.')[0] == 'grpc']))")
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path / "t")]).returncode == 0


def test_attack_clients_take_their_channel_options_from_moevit_rpc():
    """One source for channel options: the attack clients (sim/attacks.py, bench/soak_attacks.py) use the plain
    options of moevit_rpc.channels at 128 MiB, which every long-lived channel extends with reconnect and keepalive."""
    from moevit.sim.attacks import CHANNEL_OPTIONS

    from moevit_rpc.channels import channel_options, plain_channel_options

    assert CHANNEL_OPTIONS == plain_channel_options(128)
    assert dict(CHANNEL_OPTIONS) == {"grpc.max_send_message_length": 128 << 20,
                                     "grpc.max_receive_message_length": 128 << 20, "grpc.enable_http_proxy": 0}
    full = dict(channel_options())
    assert dict(plain_channel_options()).items() <= full.items() and full["grpc.keepalive_time_ms"] == 2000
