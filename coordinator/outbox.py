"""A durable outbox: messages wait in SQLite (WAL mode, synchronous=FULL) until the broker acknowledges them.

Every message to the uplink is first inserted here, committed and synced, and only then handed to the MQTT client;
it is marked delivered when the broker's PUBACK arrives. A process killed with ``kill -9``, or a power cut, loses
nothing that :meth:`Outbox.put` returned for: the next run finds the message still pending and sends it again.
Message ids are the primary key, so putting the same message twice (a resumed run re-making its events) is a
no-op, and an id once delivered is never queued again.

A full disk refuses new messages with :class:`OutboxError` naming the file; the ones already in it stay.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Message", "Outbox", "OutboxError"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    delivered REAL
);
CREATE INDEX IF NOT EXISTS pending ON messages (delivered, seq);
"""


class OutboxError(RuntimeError):
    """The outbox cannot take a message (disk full, unwritable file); messages already in it are kept."""


@dataclass(frozen=True)
class Message:
    id: str
    topic: str
    payload: bytes
    attempts: int = 0


class Outbox:
    """The SQLite outbox at ``path`` (created when missing). Thread-safe: one connection behind a lock."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=10)
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise OutboxError(f"outbox {self.path}: SQLite would not use WAL mode (got {mode})")
            self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before put() returns
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise OutboxError(f"outbox {self.path}: cannot open ({e})") from None

    def _fail(self, e: sqlite3.Error, doing: str) -> OutboxError:
        if isinstance(e, sqlite3.OperationalError) and "full" in str(e).lower():
            return OutboxError(f"outbox {self.path}: the disk is full, so {doing} was refused; the messages already "
                               "in the outbox are kept and will be sent; free space and run again")
        return OutboxError(f"outbox {self.path}: {doing} failed ({e})")

    def put(self, messages: Iterable[Message]) -> int:
        """Store ``messages`` durably (one transaction); returns how many were new (known ids are skipped)."""
        rows = [(m.id, m.topic, bytes(m.payload), time.time()) for m in messages]
        with self._lock:
            try:
                before = self._db.total_changes
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("INSERT OR IGNORE INTO messages (id, topic, payload, created) "
                                     "VALUES (?, ?, ?, ?)", rows)
                self._db.execute("COMMIT")
                return self._db.total_changes - before
            except sqlite3.Error as e:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise self._fail(e, f"storing {len(rows)} message(s)") from None

    def pending(self, limit: int = 100, exclude: Iterable[str] = ()) -> list[Message]:
        """Undelivered messages, oldest first (``exclude``: ids already handed to the client)."""
        skip = set(exclude)
        with self._lock:
            cur = self._db.execute("SELECT id, topic, payload, attempts FROM messages WHERE delivered IS NULL "
                                   "ORDER BY seq LIMIT ?", (limit + len(skip),))
            out = [Message(i, t, bytes(p), a) for i, t, p, a in cur if i not in skip]
        return out[:limit]

    def sent(self, ids: Iterable[str]) -> None:
        """Count one more attempt for these ids (handed to the client)."""
        with self._lock:
            try:
                self._db.executemany("UPDATE messages SET attempts = attempts + 1 WHERE id = ?",
                                     [(i,) for i in ids])
            except sqlite3.Error:
                pass  # a counter only: never worth failing a send for

    def delivered(self, message_id: str) -> None:
        """The broker acknowledged ``message_id``: it leaves the queue (its id is kept, so it is never re-queued)."""
        with self._lock:
            try:
                self._db.execute("UPDATE messages SET delivered = ?, payload = x'' WHERE id = ? AND delivered IS "
                                 "NULL", (time.time(), message_id))
            except sqlite3.Error as e:
                raise self._fail(e, f"marking {message_id} delivered") from None

    def counts(self) -> dict[str, int]:
        with self._lock:
            pending, done = self._db.execute(
                "SELECT COALESCE(SUM(delivered IS NULL), 0), COALESCE(SUM(delivered IS NOT NULL), 0) "
                "FROM messages").fetchone()
        return {"pending": int(pending), "delivered": int(done)}

    def close(self) -> None:
        with self._lock:
            self._db.close()
