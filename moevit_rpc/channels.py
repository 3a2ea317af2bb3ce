"""gRPC channel settings shared by the coordinator's clients and the servers: message-size caps, fast reconnect, no
proxies; channels with mutual TLS when the topology configures it (:func:`open_channel`); and the checks of the
credential files a site needs (:func:`check_tls_files`, :func:`read_token`), shared by coordinator and worker.

Mutual TLS, as ``moe-certs`` / :func:`moevit_rpc.security.write_site_pki` set it up: one CA per topology, and one
certificate per site whose subject alternative names are the site's host from ``sites.yaml`` plus ``localhost``
and ``127.0.0.1``. A caller presents its OWN site's certificate (the coordinator: the coordinator site's) and
checks the server's certificate against the CA and against the host it dials. The host the coordinator dials is
the host of the site's ``address``, which is in that site's certificate, so no ``grpc.ssl_target_name_override``
is needed (nor wanted: it would accept any certificate of the CA for any address).

:func:`check_tls_files` reads the three files once and names the file and the fix when they cannot work, since
grpc only reports a failed handshake, as UNAVAILABLE, on every call. :func:`read_token` is the one rule for bearer
token files: the worker, the coordinator's calls to workers and the Classify server all accept the same tokens.
Both read through :func:`read_limited`, which caps what a wrong path (/dev/zero) can make them read.

Nothing here imports grpc at module level: the worker's command line checks its files before grpc loads.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # grpc and the topology module stay unimported until a channel is opened
    import grpc
    from moevit.deploy.topology import TLSFiles

DEFAULT_MAX_MESSAGE_MB = 64.0
# A token is one word (moe-certs --tokens writes 43 characters); anything much longer is the wrong file.
MAX_TOKEN_BYTES = 4096
# A PEM certificate chain or key is a few KB; the cap keeps a wrong path (/dev/zero, a disk image) from being read
# whole into memory.
MAX_PEM_BYTES = 1 << 20


def plain_channel_options(max_message_mb: float = DEFAULT_MAX_MESSAGE_MB) -> list[tuple[str, Any]]:
    """The message-size caps and no proxy, without :func:`channel_options`' reconnect and keepalive settings: for
    short-lived clients such as the attack payloads of ``moevit.sim.attacks``, whose pings every 2 s the Classify
    server would answer with GOAWAY (it does not accept frequent pings as the workers do)."""
    cap = int(max_message_mb * 1024 * 1024)
    return [
        ("grpc.max_send_message_length", cap),
        ("grpc.max_receive_message_length", cap),
        # field sites talk to each other directly: never route through an HTTP proxy from the environment
        ("grpc.enable_http_proxy", 0),
    ]


def accept_keepalive_options() -> list[tuple[str, Any]]:
    """Server options that accept the keepalive pings of :func:`channel_options` (every 2 s, with or without
    calls): gRPC's defaults answer pings more often than every 5 minutes with GOAWAY "too_many_pings", which
    drops every idle client's connection a few seconds after its last call."""
    return [
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 500),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def channel_options(max_message_mb: float = DEFAULT_MAX_MESSAGE_MB) -> list[tuple[str, Any]]:
    """Options of every long-lived channel and server: :func:`plain_channel_options` plus fast reconnect and
    keepalive pings."""
    return [
        *plain_channel_options(max_message_mb),
        # a worker that restarts should be found again within a second, not after gRPC's default 1-120 s backoff
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        # A link that silently stops forwarding leaves the TCP connection open; pings every 2 s answered within
        # 2 s notice it, fail the calls on it (so they go to another replica) and mark the site down. Workers
        # accept pings this often (worker/server.py).
        ("grpc.keepalive_time_ms", 2000),
        ("grpc.keepalive_timeout_ms", 2000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1", "[::1]") or host.startswith("127.")


def check_tls_files(tls: TLSFiles, *, now: dt.datetime | None = None) -> None:
    """Raise ValueError naming the file when ``tls`` cannot work: a file missing or unreadable, not PEM, a key
    that does not belong to the certificate, a certificate not signed by the CA or outside its validity period.

    The same problems would otherwise surface only as failed handshakes (UNAVAILABLE) on the other side.
    """
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    def certificate(path: Path, what: str) -> x509.Certificate:
        data = read_limited(path, what)  # at most 1 MiB: /dev/zero is refused, not read
        try:
            return x509.load_pem_x509_certificate(data)
        except ValueError:
            raise ValueError(f"{path}: not a PEM certificate (the {what} file)") from None

    ca = certificate(tls.ca, "CA certificate")
    cert = certificate(tls.cert, "certificate")
    key_pem = read_limited(tls.key, "key")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):  # TypeError: an encrypted key; gRPC cannot use one
        raise ValueError(f"{tls.key}: not an unencrypted PEM private key") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, spki)
            != cert.public_key().public_bytes(serialization.Encoding.DER, spki)):
        raise ValueError(f"{tls.key}: this key does not belong to the certificate {tls.cert}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):  # another CA's issuer name, key type or signature
        raise ValueError(f"{tls.cert}: not signed by the CA {tls.ca}; every site of a topology needs a "
                         "certificate of the same CA (make them with moe-certs)") from None
    now = now or dt.datetime.now(dt.timezone.utc)
    for path, c in ((tls.ca, ca), (tls.cert, cert)):
        if now < c.not_valid_before_utc:
            raise ValueError(f"{path}: certificate not valid before {c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
                             "(is this machine's clock right?)")
        if now > c.not_valid_after_utc:
            raise ValueError(f"{path}: certificate expired on {c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
                             "make new ones with moe-certs")


def read_limited(path: str | Path, what: str, limit: int = MAX_PEM_BYTES, *,
                 fix: str = "make one with moe-certs") -> bytes:
    """The bytes of ``path``, at most ``limit``: the one bounded read of credential files (TLS files, tokens).
    ValueError naming the file, ``what`` it should be and, when it is missing or too large, ``fix``."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such {what} file ({fix})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read the {what} file: {e.strerror or e}") from None
    if len(data) > limit:
        raise ValueError(f"{path}: larger than {limit:,} bytes; not a {what} file ({fix})")
    return data


def read_token(path: str | Path) -> str:
    """The bearer token in ``path``: one word of printable ASCII (surrounding whitespace stripped), at most
    :data:`MAX_TOKEN_BYTES`. ValueError naming the file and the fix otherwise."""
    raw = read_limited(path, "token", MAX_TOKEN_BYTES, fix="moe-certs --tokens makes one")
    try:
        token = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: the token file is not text") from None
    if not token:
        raise ValueError(f"{path}: the token file is empty")
    # gRPC metadata values are printable ASCII; one word keeps "Bearer <token>" unambiguous
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError(f"{path}: the token must be one word of printable ASCII (moe-certs --tokens makes one)")
    return token


def open_channel(address: str, *, tls: TLSFiles | None, max_message_mb: float = DEFAULT_MAX_MESSAGE_MB
                 ) -> grpc.Channel:
    """A channel to ``address``: mutual TLS presenting ``tls.cert``/``tls.key`` and trusting ``tls.ca`` when
    ``tls`` is given (the CALLER's own site files), plaintext otherwise.

    The bearer token is not part of the channel: each call passes the called site's token as metadata
    (``metadata=moevit_rpc.security.token_metadata(site.token())``). Raises ValueError (naming the file) when
    the TLS files cannot work, see :func:`check_tls_files`.
    """
    import grpc

    options = channel_options(max_message_mb)
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    from moevit_rpc.security import channel_credentials

    check_tls_files(tls)
    return grpc.secure_channel(address, channel_credentials(tls.ca, tls.cert, tls.key), options=options)
