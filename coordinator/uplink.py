"""The MQTT uplink: event summaries (and optionally per-image results) to a broker, through the durable outbox.

``moe-coordinator --mqtt mqtt://[user@]host[:1883][/topic-prefix]`` (``mqtts://`` for TLS, port 8883) publishes
with QoS 1 through paho-mqtt. Every message is first stored in the outbox (:mod:`moevit.coordinator.outbox`) and
leaves it only when the broker's PUBACK arrives; on every (re)connection every undelivered message is sent again,
so a broker that was down, restarted, or a coordinator killed with ``kill -9`` loses nothing. A retransmission can
deliver a message twice (MQTT QoS 1 is at-least-once): each payload carries its deterministic ``id`` so consumers
drop duplicates.

The client connects in the background and never blocks the caller: with the broker unreachable, classification
goes on and the messages wait in the outbox (for the next run if this one ends first).

Topics: ``<prefix>/events/<camera>`` (event summaries, JSON), ``<prefix>/images/<camera>`` (per-image records,
JSON, with ``--mqtt-images``), ``<prefix>/corrections/<camera>`` (degraded images re-scored once their sites were
back, :mod:`moevit.coordinator.corrections`). The default prefix is ``moevit``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moevit.coordinator.outbox import Message, Outbox, OutboxError

__all__ = ["MqttConfig", "Uplink", "parse_mqtt_url"]

log = logging.getLogger("moevit.uplink")

WINDOW = 20  # messages handed to the client and not yet acknowledged (paho's own default in-flight limit)


@dataclass(frozen=True)
class MqttConfig:
    """Where and how to publish."""

    host: str
    port: int
    prefix: str = "moevit"
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca: str | None = None  # CA bundle for the broker's certificate (TLS); None: the system's
    cert: str | None = None  # client certificate and key (mutual TLS)
    key: str | None = None
    client_id: str = ""
    keepalive: int = 30
    per_image: bool = False


def parse_mqtt_url(url: str, *, password: str | None = None, ca: str | None = None, cert: str | None = None,
                   key: str | None = None, per_image: bool = False, client_id: str = "") -> MqttConfig:
    """``mqtt://[user[:password]@]host[:port][/prefix]`` or ``mqtts://...``; a clear ValueError when malformed.
    A password in the URL is refused (it would sit in shell histories and process lists): give it by file."""
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"--mqtt {url!r}: expected mqtt://host[:port][/prefix] or mqtts://... (TLS)")
    if not u.hostname:
        raise ValueError(f"--mqtt {url!r}: no broker host")
    if u.password:
        raise ValueError(f"--mqtt {url!r}: do not put the password in the URL; give --mqtt-password-file")
    try:
        port = u.port or (8883 if u.scheme == "mqtts" else 1883)
    except ValueError:
        raise ValueError(f"--mqtt {url!r}: bad port") from None
    prefix = u.path.strip("/") or "moevit"
    if "#" in url or "+" in prefix or u.query:
        raise ValueError(f"--mqtt {url!r}: the topic prefix cannot hold MQTT wildcards, a query or a fragment")
    tls = u.scheme == "mqtts"
    if (ca or cert or key) and not tls:
        raise ValueError("--mqtt-ca/--mqtt-cert/--mqtt-key need an mqtts:// URL")
    if bool(cert) != bool(key):
        raise ValueError("--mqtt-cert and --mqtt-key go together")
    for f in (ca, cert, key):
        if f and not Path(f).is_file():
            raise ValueError(f"{f}: no such file")
    user = urllib.parse.unquote(u.username) if u.username else None
    return MqttConfig(u.hostname, port, prefix, tls, user, password, ca, cert, key, client_id, per_image=per_image)


def _topic_part(name: str) -> str:
    return "".join("_" if c in "#+/" or ord(c) < 32 else c for c in name) or "_"


class Uplink:
    """Publishes the outbox's messages to the broker of ``cfg`` from background threads."""

    def __init__(self, cfg: MqttConfig, outbox: Outbox, *, warn: Callable[[str], None] = lambda s: None) -> None:
        import paho.mqtt.client as mqtt

        self.cfg, self.outbox, self.warn = cfg, outbox, warn
        self._mqtt = mqtt
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._connected = False
        self._inflight: dict[int, str] = {}  # paho message id -> outbox id
        # PUBACKs that arrived before publish() returned their mid (a race of microseconds; stale entries are
        # pruned so a reused mid can never acknowledge another message)
        self._early: dict[int, float] = {}
        self.stopped: str | None = None  # why the outbox took no more messages (disk full)
        self.acked = 0
        self.connects = 0
        c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=cfg.client_id,
                        clean_session=True, protocol=mqtt.MQTTv311)
        if cfg.username:
            c.username_pw_set(cfg.username, cfg.password)
        if cfg.tls:
            c.tls_set(ca_certs=cfg.ca, certfile=cfg.cert, keyfile=cfg.key)
        c.reconnect_delay_set(min_delay=1, max_delay=30)
        c.max_inflight_messages_set(WINDOW)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        self.client = c
        self._thread = threading.Thread(target=self._drain, name="mqtt-outbox", daemon=True)

    # ------------------------------------------------------------------------------------------------ lifecycle

    def start(self) -> Uplink:
        """Connect in the background (never blocks, whether or not the broker answers) and start sending."""
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        self.client.loop_start()
        self._thread.start()
        return self

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the outbox to empty; True when everything was acknowledged."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.outbox.counts()["pending"] == 0:
                return True
            self._wake.set()
            time.sleep(0.05)
        return self.outbox.counts()["pending"] == 0

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.client.disconnect()
        self.client.loop_stop()

    # ------------------------------------------------------------------------------------------------- messages

    def put(self, messages: Sequence[Message]) -> int:
        """Into the outbox (durable when this returns); never raises: a full disk stops the outbox with one
        error line, classification goes on."""
        if self.stopped or not messages:
            return 0
        try:
            n = self.outbox.put(messages)
        except OutboxError as e:
            self.stopped = str(e)
            self.warn(f"error: {e}; the uplink takes no more messages in this run")
            return 0
        self._wake.set()
        return n

    def events(self, summaries: Sequence[Any], labels: Mapping[str, str] | None = None,
               scientific: Mapping[str, str] | None = None) -> int:
        """Queue event summaries (:class:`moevit.coordinator.events.EventSummary`)."""
        return self.put([Message(e.message_id, f"{self.cfg.prefix}/events/{_topic_part(e.camera)}",
                                 json.dumps(e.to_json(labels, scientific), separators=(",", ":")).encode())
                         for e in summaries])

    def images(self, records: Sequence[Mapping[str, Any]], camera_of: Callable[[Mapping[str, Any]], str]) -> int:
        """Queue per-image records (``--mqtt-images``); ids from model and file, so a re-run sends none twice."""
        import hashlib

        msgs = []
        for r in records:
            mid = hashlib.sha256(f"{r.get('model')}|{r['file']}".encode()).hexdigest()[:16] + "-img"
            msgs.append(Message(mid, f"{self.cfg.prefix}/images/{_topic_part(camera_of(r))}",
                                json.dumps({"type": "image", "id": mid, **r}, separators=(",", ":")).encode()))
        return self.put(msgs)

    def corrections(self, records: Sequence[Mapping[str, Any]],
                    camera_of: Callable[[Mapping[str, Any]], str]) -> int:
        """Queue corrections (records with ``revision``, :mod:`moevit.coordinator.corrections`) on
        ``<prefix>/corrections/<camera>``; id ``<image key>-img-r<revision>``, so a consumer drops duplicates and
        replaces the image's lower revision."""
        from moevit.coordinator.corrections import image_key

        msgs = []
        for r in records:
            if not r.get("revision"):
                continue
            key = image_key(str(r.get("model")), r["file"])
            mid = f"{key}-img-r{int(r['revision'])}"
            msgs.append(Message(mid, f"{self.cfg.prefix}/corrections/{_topic_part(camera_of(r))}",
                                json.dumps({"type": "correction", "id": mid, "image": key, **r},
                                           separators=(",", ":")).encode()))
        return self.put(msgs)

    # ------------------------------------------------------------------------------------------------ callbacks

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("MQTT broker %s:%s refused the connection: %s", self.cfg.host, self.cfg.port, reason)
            return
        with self._lock:
            self._connected = True
            self._inflight.clear()  # a new session: every pending message is sent again
            self._early.clear()
            self.connects += 1
        self._wake.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        with self._lock:
            self._connected = False
            self._inflight.clear()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self._lock:
            msg_id = self._inflight.get(mid)
            if msg_id is None:
                now = time.monotonic()
                self._early = {k: t for k, t in self._early.items() if now - t < 5.0}
                self._early[mid] = now
                return
        self._ack(msg_id)
        with self._lock:  # only now: until it is marked delivered, the sender must not take it for pending
            if self._inflight.get(mid) == msg_id:
                del self._inflight[mid]
        self._wake.set()

    def _ack(self, msg_id: str) -> None:
        try:
            self.outbox.delivered(msg_id)
            self.acked += 1
        except OutboxError as e:  # the broker has it; it may be sent again (consumers drop duplicates)
            log.warning("%s", e)
        self._wake.set()

    # ----------------------------------------------------------------------------------------------- the sender

    def _drain(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            while not self._stop.is_set():
                with self._lock:
                    if not self._connected:
                        break
                    room = WINDOW - len(self._inflight)
                    busy = list(self._inflight.values())
                if room <= 0:
                    break
                batch = self.outbox.pending(room, exclude=busy)
                if not batch:
                    break
                handed = []
                for m in batch:
                    info = self.client.publish(m.topic, m.payload, qos=1)
                    if info.rc != self._mqtt.MQTT_ERR_SUCCESS:
                        break  # disconnected meanwhile: sent again on the next connection
                    with self._lock:
                        if self._early.pop(info.mid, None) is not None:
                            done = True
                        else:
                            self._inflight[info.mid] = m.id
                            done = False
                    if done:
                        self._ack(m.id)
                    handed.append(m.id)
                self.outbox.sent(handed)
                if len(handed) < len(batch):
                    break


def open_uplink(url: str, outbox_path: str | Path, *, warn: Callable[[str], None], **options: Any) -> Uplink:
    """Parse ``url``, open the outbox and start publishing (the CLI's one call)."""
    cfg = parse_mqtt_url(url, **options)
    return Uplink(cfg, Outbox(outbox_path), warn=warn).start()
