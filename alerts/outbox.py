"""The notifier's durable state in one SQLite file under ``state_dir``.

Tables
------
outbox       notifications to deliver, in order per destination (``seq``), until sent.
seen_alerts  the identity of every alert record already routed (:func:`alert_identity`).
incidents/meta  the policy state (dedup counts, pending groups, rate-limit buckets).
silences     written by ``agentwatch silence add``, read by the running notifier.

Where to resume reading is the broker's business: the consumer group's committed offsets. No
offset is kept here, because this file outlives the embedded broker, which starts again at
offset 0 after a restart (offsets remembered here would skip every new alert). The consumer
writes one transaction per poll batch (new outbox rows + policy changes + the identities of the
batch's alerts) and commits the Kafka offsets only after it. A crash between the two makes the
consumer read those records again; their identities are in ``seen_alerts``, so they are
absorbed before routing, and outbox ids are deterministic (INSERT OR IGNORE) as a second guard.

``seen_alerts`` is pruned by age (longer than a topic keeps records) and by count.

WAL mode lets the CLI, the consumer thread and one delivery thread per destination use the file
at once; ``synchronous=FULL`` makes each commit survive power loss, not just a killed process.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import orjson

from agentwatch.alerts.policy import Matcher, Notification, PolicyChanges, Silence

DB_NAME = "notifier.sqlite3"
# PRAGMA user_version. 0: the first layout, which kept consumed offsets in a table of their own.
# 1: offsets live with the broker only; re-read records are recognised by ``seen_alerts``.
SCHEMA_VERSION = 1
# A topic keeps records 7 days by default (Kafka's retention.ms, and how long it keeps a group's
# committed offsets): a group that lost its offsets re-reads at most that far back.
SEEN_RETENTION_S = 8 * 24 * 3600
MAX_SEEN_ALERTS = 1_000_000
# Below SQLite's smallest bound on variables in one statement (999 before 3.32).
_IN_CHUNK = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    destination TEXT NOT NULL,
    action TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',   -- pending | sent | failed
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (destination, status, seq);
CREATE TABLE IF NOT EXISTS seen_alerts (id TEXT PRIMARY KEY, seen_at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_alerts_by_age ON seen_alerts (seen_at);
CREATE TABLE IF NOT EXISTS incidents (dedup_key TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS policy_meta (id INTEGER PRIMARY KEY CHECK (id = 1), data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS silences (
    id TEXT PRIMARY KEY, matchers TEXT NOT NULL, starts_at REAL NOT NULL, ends_at REAL NOT NULL,
    comment TEXT NOT NULL DEFAULT '', created_by TEXT NOT NULL DEFAULT ''
);
"""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    seq: int
    id: str
    destination: str
    action: str
    notification: Notification
    created_at: float
    status: str
    attempts: int
    last_error: str
    finished_at: float | None


class NotifierStore:
    """Thread-safe by construction: each thread gets its own SQLite connection."""

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.state_dir / DB_NAME
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        # executescript manages its own transaction (it commits first), so no _tx() here.
        self._db().executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        if self._db().execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
            return  # the usual case: no write lock for a CLI opening the file next to the notifier
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} has schema version {version}, newer than this "
                                   f"notifier's {SCHEMA_VERSION}; upgrade agentwatch")
            if version < 1:
                # Offsets of a broker that may no longer exist: trusting them skipped new alerts.
                db.execute("DROP TABLE IF EXISTS consumed_offsets")
            if version < SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # -- connections

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
            with self._lock:
                self._all.append(db)
        return db

    class _Tx:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            # IMMEDIATE takes the write lock up front, so two writers never deadlock on upgrade.
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, exc_type: Any, *rest: Any) -> None:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")

    def _tx(self) -> "NotifierStore._Tx":
        return NotifierStore._Tx(self._db())

    def close(self) -> None:
        with self._lock:
            for db in self._all:
                try:
                    db.close()
                except sqlite3.ProgrammingError:
                    pass  # closed from its own thread already
            self._all.clear()
        self._local = threading.local()

    # -- consumer side

    def commit_batch(self, notifications: Iterable[Notification],
                     changes: PolicyChanges | None, *, alert_ids: Iterable[str] = (),
                     now: float) -> int:
        """Outbox rows, policy changes and routed alert identities in one transaction.

        Returns the number of outbox rows added (a notification written before adds none).
        """
        added = 0
        with self._tx() as db:
            for n in notifications:
                cur = db.execute(
                    "INSERT OR IGNORE INTO outbox (id, destination, action, payload, created_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (n.id, n.destination, n.action.value, orjson.dumps(n.to_dict()), n.created_at))
                added += cur.rowcount
            if changes is not None:
                db.executemany("INSERT OR REPLACE INTO incidents (dedup_key, data) VALUES (?, ?)",
                               [(k, orjson.dumps(v)) for k, v in changes.upserted.items()])
                db.executemany("DELETE FROM incidents WHERE dedup_key = ?",
                               [(k,) for k in changes.deleted])
                db.execute("INSERT OR REPLACE INTO policy_meta (id, data) VALUES (1, ?)",
                           (orjson.dumps(changes.meta),))
            db.executemany("INSERT OR IGNORE INTO seen_alerts (id, seen_at) VALUES (?, ?)",
                           [(i, now) for i in alert_ids])
        return added

    def seen_alerts(self, alert_ids: Iterable[str]) -> set[str]:
        """Those of ``alert_ids`` already routed (committed by :meth:`commit_batch`)."""
        wanted = list(dict.fromkeys(alert_ids))
        found: set[str] = set()
        db = self._db()
        for start in range(0, len(wanted), _IN_CHUNK):
            chunk = wanted[start:start + _IN_CHUNK]
            found.update(i for (i,) in db.execute(
                f"SELECT id FROM seen_alerts WHERE id IN ({','.join('?' * len(chunk))})", chunk))
        return found

    def prune_seen(self, before: float, max_rows: int = MAX_SEEN_ALERTS) -> int:
        """Forget identities seen before ``before``, then the oldest beyond ``max_rows``."""
        with self._tx() as db:
            removed = db.execute("DELETE FROM seen_alerts WHERE seen_at < ?", (before,)).rowcount
            (count,) = db.execute("SELECT count(*) FROM seen_alerts").fetchone()
            if count > max_rows:
                removed += db.execute(
                    "DELETE FROM seen_alerts WHERE id IN (SELECT id FROM seen_alerts"
                    " ORDER BY seen_at LIMIT ?)", (count - max_rows,)).rowcount
        return removed

    def load_policy(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        db = self._db()
        incidents = [orjson.loads(data) for (data,) in db.execute("SELECT data FROM incidents")]
        row = db.execute("SELECT data FROM policy_meta WHERE id = 1").fetchone()
        return incidents, (orjson.loads(row[0]) if row else {})

    # -- delivery side

    def _row(self, r: tuple) -> OutboxRow:
        return OutboxRow(r[0], r[1], r[2], r[3], Notification.from_dict(orjson.loads(r[4])),
                         r[5], r[6], r[7], r[8], r[9])

    _COLUMNS = ("seq, id, destination, action, payload, created_at, status, attempts, "
                "last_error, finished_at")

    def next_pending(self, destination: str) -> OutboxRow | None:
        r = self._db().execute(
            f"SELECT {self._COLUMNS} FROM outbox WHERE destination = ? AND status = 'pending'"
            " ORDER BY seq LIMIT 1", (destination,)).fetchone()
        return self._row(r) if r else None

    def mark_sent(self, row_id: str, now: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE outbox SET status = 'sent', attempts = attempts + 1,"
                       " finished_at = ? WHERE id = ?", (now, row_id))

    def record_attempt_failure(self, row_id: str, error: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE id = ?",
                       (error[:2000], row_id))

    def mark_failed(self, row_id: str, error: str, now: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE outbox SET status = 'failed', attempts = attempts + 1,"
                       " last_error = ?, finished_at = ? WHERE id = ?", (error[:2000], now, row_id))

    def rows(self, status: str | None = None) -> list[OutboxRow]:
        sql = f"SELECT {self._COLUMNS} FROM outbox"
        args: tuple = ()
        if status is not None:
            sql += " WHERE status = ?"
            args = (status,)
        return [self._row(r) for r in self._db().execute(sql + " ORDER BY seq", args)]

    def pending_counts(self) -> dict[str, int]:
        return dict(self._db().execute(
            "SELECT destination, count(*) FROM outbox WHERE status = 'pending' GROUP BY destination"))

    def prune_finished(self, before: float) -> int:
        with self._tx() as db:
            return db.execute("DELETE FROM outbox WHERE status = 'sent' AND finished_at < ?",
                              (before,)).rowcount

    # -- silences

    def add_silence(self, silence: Silence) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO silences (id, matchers, starts_at, ends_at, comment, created_by)"
                       " VALUES (?, ?, ?, ?, ?, ?)",
                       (silence.id, orjson.dumps([str(m) for m in silence.matchers]).decode(),
                        silence.starts_at, silence.ends_at, silence.comment, silence.created_by))

    def silences(self, *, active_at: float | None = None) -> list[Silence]:
        """All silences, or those not yet expired at ``active_at``."""
        sql = "SELECT id, matchers, starts_at, ends_at, comment, created_by FROM silences"
        args: tuple = ()
        if active_at is not None:
            sql += " WHERE ends_at > ?"
            args = (active_at,)
        return [Silence(i, tuple(Matcher.parse(m) for m in orjson.loads(ms)), s, e, c, by)
                for i, ms, s, e, c, by in self._db().execute(sql + " ORDER BY starts_at", args)]

    def remove_silence(self, silence_id: str) -> bool:
        with self._tx() as db:
            return db.execute("DELETE FROM silences WHERE id = ?", (silence_id,)).rowcount > 0


def iter_outbox(store: NotifierStore, destination: str) -> Iterator[OutboxRow]:
    """Pending rows of one destination in delivery order (tests, CLI)."""
    for row in store.rows("pending"):
        if row.destination == destination:
            yield row
