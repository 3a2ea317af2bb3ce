"""MQTT uplink through the durable outbox, against a real mosquitto broker started and stopped by the tests:
the broker down during a run, a kill -9 of the publishing coordinator process with messages in flight, a broker
restart; nothing lost, nothing delivered twice to a deduplicating consumer; an unreachable broker never blocks; a
full disk stops the outbox with a clear error and keeps what it holds."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from moevit.coordinator.outbox import Message, Outbox, OutboxError
from moevit.coordinator.uplink import Uplink, parse_mqtt_url

from tests.netutil import free_port

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
needs_broker = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed (make test installs it: "
                                  "apt-get install -y mosquitto)")


class Broker:
    """A mosquitto on 127.0.0.1:port with persistence in ``folder`` (a restart keeps the consumer's queue)."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder, self.port = folder, port
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                             f"persistence_location {folder}/\nautosave_interval 1\nlog_dest none\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> Broker:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        import socket

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                assert self.proc.poll() is None, self.proc.stderr.read().decode()
                time.sleep(0.05)
        raise AssertionError("mosquitto did not start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
        self.proc = None


class Consumer:
    """A subscriber with a persistent session (QoS 1) that deduplicates by the payload's id."""

    def __init__(self, port: int, topic: str = "t/#") -> None:
        import paho.mqtt.client as mqtt

        self.ids: list[str] = []
        self.lock = threading.Lock()
        self.c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="consumer-1",
                             clean_session=False)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.c.on_message = self._on_message
        self.c.reconnect_delay_set(0.2, 1)
        self.c.connect_async("127.0.0.1", port)
        self.c.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.ids.append(json.loads(msg.payload)["id"])

    def unique(self) -> set[str]:
        with self.lock:
            return set(self.ids)

    def wait_for(self, n: int, timeout: float = 30) -> set[str]:
        deadline = time.monotonic() + timeout
        while len(self.unique()) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.unique()

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _messages(n: int, start: int = 0) -> list[Message]:
    return [Message(f"m{i:05d}", "t/events/cam", json.dumps({"id": f"m{i:05d}", "n": i}).encode())
            for i in range(start, start + n)]


# ---------------------------------------------------------------------------------------------- outbox alone


def test_outbox_is_durable_idempotent_and_ordered(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    assert box.put(_messages(3)) == 3
    assert box.put(_messages(3)) == 0  # same ids: nothing new
    box.delivered("m00001")
    assert [m.id for m in box.pending()] == ["m00000", "m00002"]
    box.close()
    again = Outbox(tmp_path / "o.sqlite")  # reopened (as after a kill): the same state
    assert [m.id for m in again.pending()] == ["m00000", "m00002"]
    assert again.put(_messages(2)) == 0, "a delivered id is never queued again"
    assert again.counts() == {"pending": 2, "delivered": 1}
    mode = sqlite3.connect(tmp_path / "o.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_full_disk_stops_the_outbox_with_a_clear_error_and_keeps_what_it_has(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    box.put(_messages(5))
    # a disk with no room left: SQLite may not grow the file past its current pages
    pages = box._db.execute("PRAGMA page_count").fetchone()[0]
    box._db.execute(f"PRAGMA max_page_count = {pages}")
    big = [Message(f"big{i}", "t/x", b"x" * 50_000) for i in range(5)]
    with pytest.raises(OutboxError, match=r"o\.sqlite: the disk is full.*already in the outbox are kept"):
        box.put(big)
    assert [m.id for m in box.pending()] == [m.id for m in _messages(5)]
    warned: list[str] = []
    up = Uplink(parse_mqtt_url("mqtt://127.0.0.1:1"), box, warn=warned.append)
    assert up.put(big) == 0 and up.stopped and "disk is full" in warned[0]
    assert up.put(_messages(1, 100)) == 0, "a stopped outbox takes nothing more this run"


def test_bad_mqtt_urls_say_what_is_wrong(tmp_path):
    for url, msg in (("http://x", "expected mqtt://"), ("mqtt://", "no broker host"),
                     ("mqtt://u:secret@h", "password in the URL"), ("mqtt://h/a/#", "wildcards"),
                     ("mqtt://h:99999", "bad port")):
        with pytest.raises(ValueError, match=msg):
            parse_mqtt_url(url)
    with pytest.raises(ValueError, match="need an mqtts"):
        parse_mqtt_url("mqtt://h", ca=str(tmp_path))
    cfg = parse_mqtt_url("mqtts://cam%40site@broker.example/traps/north")
    assert (cfg.host, cfg.port, cfg.prefix, cfg.tls, cfg.username) == ("broker.example", 8883, "traps/north", True,
                                                                      "cam@site")


# ---------------------------------------------------------------------------------------- with a real broker


@needs_broker
def test_broker_down_during_a_run_then_up_delivers_everything_once(tmp_path):
    port = free_port()
    broker = Broker(tmp_path, port).start()
    consumer = Consumer(port)  # its persistent session outlives the broker's restart
    time.sleep(0.5)
    broker.stop()
    up = Uplink(parse_mqtt_url(f"mqtt://127.0.0.1:{port}/t"), Outbox(tmp_path / "o.sqlite")).start()
    try:
        t0 = time.perf_counter()
        for k in range(10):  # the run goes on while nobody answers
            up.put(_messages(20, 20 * k))
        assert time.perf_counter() - t0 < 2.0, "queueing never waits for the broker"
        assert not up.flush(1.0)
        assert up.outbox.counts() == {"pending": 200, "delivered": 0}
        broker.start()
        assert up.flush(30)
        assert consumer.wait_for(200) == {m.id for m in _messages(200)}
        assert up.outbox.counts() == {"pending": 0, "delivered": 200}
    finally:
        up.close()
        consumer.close()
        broker.stop()


@pytest.mark.slow
@needs_broker
def test_broker_restart_and_kill_9_of_the_publisher_lose_nothing(tmp_path):
    """A publisher process with 3000 messages in its outbox: the broker is stopped and restarted while it sends,
    then the publisher is killed with SIGKILL mid-stream and started again. The deduplicating consumer (persistent
    session) ends with every id exactly once; raw duplicates (QoS 1 retransmissions) are counted."""
    port = free_port()
    (tmp_path / "b").mkdir()
    broker = Broker(tmp_path / "b", port).start()
    consumer = Consumer(port)
    time.sleep(0.5)
    box_path = tmp_path / "o.sqlite"
    box = Outbox(box_path)
    box.put(_messages(3000))
    box.close()
    # the first run handles each acknowledgement 2 ms late (at most ~500 messages/s), so that it is still sending
    # when it is killed on any machine; the second run is not slowed
    script = ("import sys, time\nfrom moevit.coordinator.outbox import Outbox\n"
              "from moevit.coordinator.uplink import Uplink, parse_mqtt_url\n"
              "if sys.argv[3] == 'slow':\n"
              "    done = Outbox.delivered\n"
              "    Outbox.delivered = lambda self, i: (time.sleep(0.002), done(self, i))[1]\n"
              "up = Uplink(parse_mqtt_url(sys.argv[1]), Outbox(sys.argv[2])).start()\n"
              "print('flushed', up.flush(120), flush=True)\nup.close()\n")
    cmd = [sys.executable, "-c", script, f"mqtt://127.0.0.1:{port}/t", str(box_path)]
    pub = subprocess.Popen([*cmd, "slow"], stdout=subprocess.PIPE, text=True)
    try:
        consumer.wait_for(300, timeout=60)
        broker.stop()  # the broker stops mid-stream (SIGTERM: it keeps what it acknowledged)...
        time.sleep(1.5)
        broker.start()  # ...and comes back on the same port
        consumer.wait_for(1200, timeout=60)
        pub.send_signal(signal.SIGKILL)  # the coordinator dies with messages in flight
        pub.wait(timeout=10)
        pending = Outbox(box_path).counts()["pending"]
        assert pending > 0, "killed while messages were still to send"
        pub = subprocess.Popen([*cmd, "fast"], stdout=subprocess.PIPE, text=True)  # the next run
        out, _ = pub.communicate(timeout=150)
        assert "flushed True" in out
        got = consumer.wait_for(3000, timeout=60)
        assert got == {m.id for m in _messages(3000)}, f"lost {3000 - len(got)}"
        assert Outbox(box_path).counts() == {"pending": 0, "delivered": 3000}
        dups = len(consumer.ids) - len(got)
        print(f"\nkill -9 with {pending} pending; broker restart: 3000 of 3000 ids arrived, {dups} raw "
              "duplicates dropped by the consumer")
    finally:
        if pub.poll() is None:
            pub.kill()
        consumer.close()
        broker.stop()


@needs_broker
def test_tls_and_credentials_to_a_broker_that_requires_both(tmp_path):
    """mqtts:// with a CA, a client certificate and a user whose password comes from a file, against a mosquitto
    that accepts nothing else: the messages are delivered (and a TLS subscriber receives them); a wrong password is
    refused by the broker without blocking or losing anything (the messages wait in the outbox)."""
    import getpass

    import paho.mqtt.client as mqtt

    from moevit_rpc.security import make_ca, make_site_cert

    ca, ca_key = make_ca("broker test CA")
    files = {}
    for name, (cert, key) in {"broker": make_site_cert(ca, ca_key, "broker", ["127.0.0.1"]),
                              "cam01": make_site_cert(ca, ca_key, "cam01", ["127.0.0.1"])}.items():
        (tmp_path / f"{name}.pem").write_bytes(cert)
        (tmp_path / f"{name}.key").write_bytes(key)
        files[name] = (str(tmp_path / f"{name}.pem"), str(tmp_path / f"{name}.key"))
    (tmp_path / "ca.pem").write_bytes(ca)
    passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(passwd).exists():
        pytest.skip("mosquitto_passwd is not installed (it comes with the mosquitto package)")
    subprocess.run([passwd, "-b", "-c", str(tmp_path / "passwd"), "cam01", "s3cret pass"], check=True,
                   capture_output=True)
    port = free_port()
    broker = Broker(tmp_path, port)
    broker.conf.write_text(f"listener {port} 127.0.0.1\ncafile {tmp_path}/ca.pem\ncertfile {files['broker'][0]}\n"
                           f"keyfile {files['broker'][1]}\nrequire_certificate true\nallow_anonymous false\n"
                           f"password_file {tmp_path}/passwd\npersistence false\nlog_dest none\n"
                           # run as root, mosquitto drops to its own user, who cannot read the test's private folder
                           f"user {getpass.getuser()}\n")
    broker.start()
    got: list[str] = []
    sub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="tls-consumer")
    sub.username_pw_set("cam01", "s3cret pass")
    sub.tls_set(ca_certs=str(tmp_path / "ca.pem"), certfile=files["cam01"][0], keyfile=files["cam01"][1])
    subscribed = threading.Event()
    sub.on_connect = lambda c, u, f, rc, p: c.subscribe("t/#", qos=1)
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_message = lambda c, u, msg: got.append(json.loads(msg.payload)["id"])
    sub.connect_async("127.0.0.1", port)
    sub.loop_start()
    url = f"mqtts://cam01@127.0.0.1:{port}/t"
    tls = {"ca": str(tmp_path / "ca.pem"), "cert": files["cam01"][0], "key": files["cam01"][1]}
    bad = Uplink(parse_mqtt_url(url, password="wrong", **tls), Outbox(tmp_path / "bad.sqlite")).start()
    good = Uplink(parse_mqtt_url(url, password="s3cret pass", **tls), Outbox(tmp_path / "good.sqlite")).start()
    try:
        assert subscribed.wait(15), "the TLS subscriber could not connect"
        t0 = time.perf_counter()
        bad.put(_messages(3))
        good.put(_messages(5, 100))
        assert time.perf_counter() - t0 < 1.0
        assert good.flush(20) and good.outbox.counts() == {"pending": 0, "delivered": 5}
        deadline = time.monotonic() + 10
        while len(set(got)) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(got) == {m.id for m in _messages(5, 100)}
        assert not bad.flush(1.0), "refused: the wrong password delivers nothing"
        assert bad.outbox.counts() == {"pending": 3, "delivered": 0} and bad.connects == 0
    finally:
        for up in (bad, good):
            up.close()
        sub.disconnect()
        sub.loop_stop()
        broker.stop()
