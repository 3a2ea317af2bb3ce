"""Mutual TLS and bearer tokens on a real gRPC server: who gets in, and what the others see."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from moevit_rpc.security import (
    TokenAuthInterceptor,
    channel_credentials,
    make_ca,
    make_site_cert,
    server_credentials,
    token_metadata,
    write_site_pki,
)
from moevit_rpc.serving import add_service
from moevit_rpc.v1 import expert_pb2, expert_pb2_grpc


class _Info(expert_pb2_grpc.ExpertServiceServicer):
    async def Info(self, request, context):  # noqa: N802
        return expert_pb2.InfoResponse(site="secure", version="v1")


@pytest.fixture
async def secure_server(tmp_path):
    entries = write_site_pki(tmp_path, {"server": "127.0.0.1", "client": "127.0.0.1"}, tokens=True)
    tls = entries["server"]["tls"]
    token = (tmp_path / "server.token").read_text().strip()
    server = grpc.aio.server(interceptors=[TokenAuthInterceptor(token)])
    add_service(server, _Info(), expert_pb2.DESCRIPTOR.services_by_name["ExpertService"])  # as the servers do
    hs = health.aio.HealthServicer()
    add_service(server, hs, health_pb2.DESCRIPTOR.services_by_name["Health"])
    port = server.add_secure_port("127.0.0.1:0", server_credentials(tls["ca"], tls["cert"], tls["key"]))
    await server.start()
    await hs.set("", health_pb2.HealthCheckResponse.SERVING)
    yield {"address": f"127.0.0.1:{port}", "dir": tmp_path, "token": token}
    await server.stop(0)


async def _info(address, creds=None, token=None):
    ch = grpc.aio.secure_channel(address, creds) if creds else grpc.aio.insecure_channel(address)
    async with ch:
        return await expert_pb2_grpc.ExpertServiceStub(ch).Info(expert_pb2.InfoRequest(), timeout=5,
                                                               metadata=token_metadata(token))


async def test_client_with_certificate_and_token_gets_in(secure_server):
    d = secure_server["dir"]
    creds = channel_credentials(d / "ca.pem", d / "client.pem", d / "client.key")
    assert (await _info(secure_server["address"], creds, secure_server["token"])).site == "secure"


async def test_wrong_or_missing_token_is_unauthenticated(secure_server):
    d = secure_server["dir"]
    creds = channel_credentials(d / "ca.pem", d / "client.pem", d / "client.key")
    for token in (None, "not-the-token"):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _info(secure_server["address"], creds, token)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_health_answers_without_a_token(secure_server):
    d = secure_server["dir"]
    creds = channel_credentials(d / "ca.pem", d / "client.pem", d / "client.key")
    async with grpc.aio.secure_channel(secure_server["address"], creds) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def _refused(address, creds, token):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _info(address, creds, token)
    # a TLS handshake that fails never opens a call: gRPC reports the connection as UNAVAILABLE
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_no_client_certificate_is_refused(secure_server):
    d = secure_server["dir"]
    await _refused(secure_server["address"], channel_credentials(d / "ca.pem"), secure_server["token"])


async def test_plaintext_client_is_refused(secure_server):
    await _refused(secure_server["address"], None, secure_server["token"])


async def test_certificate_from_another_ca_is_refused(secure_server, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    write_site_pki(other, {"client": "127.0.0.1"})
    creds = channel_credentials(secure_server["dir"] / "ca.pem", other / "client.pem", other / "client.key")
    await _refused(secure_server["address"], creds, secure_server["token"])


async def test_expired_certificate_is_refused(secure_server, tmp_path):
    d = secure_server["dir"]
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30)
    cert, key = make_site_cert((d / "ca.pem").read_bytes(), (d / "ca.key").read_bytes(), "client", ["127.0.0.1"],
                               days=1, not_before=past)
    (tmp_path / "old.pem").write_bytes(cert)
    (tmp_path / "old.key").write_bytes(key)
    creds = channel_credentials(d / "ca.pem", tmp_path / "old.pem", tmp_path / "old.key")
    await _refused(secure_server["address"], creds, secure_server["token"])


def test_keys_are_private(tmp_path):
    write_site_pki(tmp_path, {"a": "127.0.0.1"}, tokens=True)
    for name in ("ca.key", "a.key", "a.token"):
        assert (tmp_path / name).stat().st_mode & 0o077 == 0, name
    cert, _ = make_ca(days=1)
    assert cert.startswith(b"-----BEGIN CERTIFICATE-----")
