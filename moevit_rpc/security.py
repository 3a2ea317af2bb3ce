"""Transport security shared by coordinator and workers: mutual TLS credentials, bearer tokens, and a small CA
for tests and small deployments (``moe-certs``).

Mutual TLS: every site's server presents its certificate and requires a client certificate signed by the same CA.
A client without one, with one from another CA, or with an expired one fails the TLS handshake (the client sees
UNAVAILABLE with the handshake error; gRPC gives no status to a connection that never opened). A plaintext client
of a TLS server fails the same way. Bearer tokens are checked per call: a missing or wrong token gets
UNAUTHENTICATED. The health service answers without a token so that probes work.
"""

from __future__ import annotations

import datetime as dt
import hmac
import ipaddress
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from moevit_rpc.channels import read_limited

HEALTH_PREFIX = "/grpc.health.v1.Health/"


# ------------------------------------------------------------------------------------------------ credentials


def _read(path: Path) -> bytes:
    return read_limited(path, "TLS")


def server_credentials(ca: Path, cert: Path, key: Path) -> grpc.ServerCredentials:
    """TLS server credentials that require and verify a client certificate signed by ``ca``."""
    return grpc.ssl_server_credentials([(_read(key), _read(cert))], root_certificates=_read(ca),
                                       require_client_auth=True)


def channel_credentials(ca: Path, cert: Path | None = None, key: Path | None = None) -> grpc.ChannelCredentials:
    """TLS channel credentials trusting ``ca``, presenting ``cert``/``key`` when given (mutual TLS)."""
    return grpc.ssl_channel_credentials(root_certificates=_read(ca),
                                        private_key=_read(key) if key else None,
                                        certificate_chain=_read(cert) if cert else None)


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but health checks unless it carries ``authorization: Bearer <token>``."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        # The refusal answers like the method it stands in for (one answer or a stream of them), and always as a
        # request-streaming handler: gRPC's handling of a method with one request receives the whole message (and
        # copies it on the event loop) before calling the handler, so a caller without the token could make the
        # server take in up to the message cap for each refusal (measured: 117-135 ms of a worker's CPU per 32 MiB
        # request). Refused this way the message is never received.
        self._deny = {(False, False): grpc.stream_unary_rpc_method_handler(deny),
                      (False, True): grpc.stream_stream_rpc_method_handler(deny),
                      (True, False): grpc.stream_unary_rpc_method_handler(deny),
                      (True, True): grpc.stream_stream_rpc_method_handler(deny)}

    async def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        if handler_call_details.method.startswith(HEALTH_PREFIX):
            return await continuation(handler_call_details)
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        handler = await continuation(handler_call_details)
        if hmac.compare_digest(given.encode(), self._expected):  # constant time: no timing oracle on the token
            return handler
        if handler is None:  # no such method: the caller learns no more than UNAUTHENTICATED
            return self._deny[(False, False)]
        return self._deny[(handler.request_streaming, handler.response_streaming)]


# ------------------------------------------------------------------------------------------------------- a CA


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "moevit"), x509.NameAttribute(NameOID.COMMON_NAME,
                                                                                                  cn)])


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(common_name: str = "moevit CA", *, days: int = 365, not_before: dt.datetime | None = None
            ) -> tuple[bytes, bytes]:
    """A self-signed CA: (certificate PEM, key PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = _key()
    start = not_before or dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return _pem_cert(cert), _pem_key(key)


def make_site_cert(ca_cert_pem: bytes, ca_key_pem: bytes, site: str, hosts: Sequence[str], *, days: int = 365,
                   not_before: dt.datetime | None = None) -> tuple[bytes, bytes]:
    """A certificate for ``site`` valid as server (for ``hosts``) and as client: (certificate PEM, key PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    key = _key()
    sans: list[x509.GeneralName] = [x509.DNSName("localhost")]
    for h in hosts:
        h = h.strip("[]")
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    if not any(isinstance(s, x509.IPAddress) and str(s.value) == "127.0.0.1" for s in sans):
        sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    start = not_before or dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    cert = (x509.CertificateBuilder().subject_name(_name(site)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    return _pem_cert(cert), _pem_key(key)


def write_site_pki(out: Path, sites: dict[str, str], *, days: int = 365, tokens: bool = False) -> dict[str, dict]:
    """CA plus one certificate per site (``name -> host``) under ``out``; keys are written 0600.

    Returns, per site, the ``tls`` (and ``token_file``) entries to put in sites.yaml.
    """
    import secrets

    out.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = make_ca(days=days)
    _write_file(out / "ca.pem", ca_cert, 0o644)
    _write_secret(out / "ca.key", ca_key)
    entries: dict[str, dict] = {}
    for name, host in sorted(sites.items()):
        cert, key = make_site_cert(ca_cert, ca_key, name, [host], days=days)
        _write_file(out / f"{name}.pem", cert, 0o644)
        _write_secret(out / f"{name}.key", key)
        entry: dict[str, Any] = {"tls": {"ca": str(out / "ca.pem"), "cert": str(out / f"{name}.pem"),
                                         "key": str(out / f"{name}.key")}}
        if tokens:
            _write_secret(out / f"{name}.token", (secrets.token_urlsafe(32) + "\n").encode())
            entry["token_file"] = str(out / f"{name}.token")
        entries[name] = entry
    return entries


def _write_secret(path: Path, data: bytes) -> None:
    _write_file(path, data, 0o600)


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a new file beside ``path`` (created exclusively, with ``mode`` from the start, never
    through a symlink) and rename it onto ``path``: a symlink planted at ``path`` is replaced, not written through,
    and a key is never readable by others, not even for a moment."""
    import os
    import secrets

    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)  # the umask may have taken bits off
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
