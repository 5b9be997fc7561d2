"""The durable outbox: every message to the line is stored here before it is sent, and removed only
when its receiver has acknowledged it (an MQTT PUBACK, a webhook's 2xx; publish.py).

One SQLite database (stdlib sqlite3) in WAL mode, one row per message and destination, sent in row
order. A message is committed before `put` returns, so a receiver that is down, slow or failing holds
rows here, never the inspection; what was not acknowledged when the run ends (Ctrl-C, SIGTERM, a kill,
a crash) is still here, and the next run with this outbox sends it first. synchronous=NORMAL: a commit
survives the process dying at any point; a power cut can lose the commits since the last checkpoint
(SQLite's WAL default: a full fsync per message would cost more than the message).

Bounded: at most max_mb MiB (PRAGMA max_page_count). When it is full, or the disk is, a new message is
not stored: it is counted in `lost`, logged (the first at once, then a count every 10 s), and the
inspection goes on; the rows already queued are kept and sent in order. A file that is not an outbox
of this tool, is damaged or is in use by another process is refused with one line (OutboxError) and
never deleted, nor written to.
"""
import logging
import os
import sqlite3
import threading
import time

from errors import OutboxError
from file_io import create_temporary

logger = logging.getLogger('mahalanobisad')

APPLICATION_ID = 0x4D41_4F58  # PRAGMA application_id ('MAOX'): SQLite's place to say which program a file is
SCHEMA_VERSION = 1            # PRAGMA user_version
DEFAULT_MAX_MB = 256
LOSS_LOG_EVERY_S = 10.0
SQLITE_HEADER = b'SQLite format 3\x00'
SCHEMA = """
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY,  -- sending order (the rowid; no AUTOINCREMENT, no index: a commit writes one page)
    destination TEXT NOT NULL,  -- the receiver as logs show it (never its credentials)
    message_id TEXT NOT NULL,   -- the message's id: receivers drop duplicates by it
    body TEXT NOT NULL,         -- the JSON message
    created REAL NOT NULL       -- time.time() when stored
);
"""


class Outbox:
    """The outbox file `path` (created if missing) for messages to `destinations` (their shown names).

    put() stores a message for every destination in one transaction; pending() / remove() are the
    senders' side. Thread-safe (one connection behind a lock: every statement takes microseconds).
    The file is held exclusively (SQLite's exclusive locking mode) until close(): a second process
    on the same outbox gets an OutboxError instead of sending the same rows twice.
    """

    def __init__(self, path, destinations, max_mb=DEFAULT_MAX_MB):
        self.path, self.destinations = os.fspath(path), list(destinations)
        self.lost, self._lost_logged, self._last_loss_log = 0, 0, 0.0
        self._lock = threading.Lock()
        if not os.path.lexists(self.path):
            self._create()
        self._db = self._open(max_mb)
        # Sequence numbers only grow while this process runs (the senders read after the last one they
        # took); numbering afresh from the largest stored one at each start keeps the order across runs.
        self._next_seq = self._db.execute('SELECT COALESCE(MAX(seq), 0) + 1 FROM messages').fetchone()[0]
        stored = self.depth()
        for destination, count in stored.items():
            if destination not in self.destinations:
                logger.warning('outbox %s holds %d messages for %s, which this run does not publish to: they '
                               'stay until a run publishes there', self.path, count, destination)
        waiting = sum(n for d, n in stored.items() if d in self.destinations)
        if waiting:
            logger.info('outbox %s: %d messages from an earlier run are sent first', self.path, waiting)

    def _create(self):
        """A new, empty outbox: made under a temporary name and renamed into place, so that a file at
        `path` is always a complete outbox (an empty or half-made one would be refused as not ours)."""
        try:
            fd, temporary = create_temporary(self.path, '.tmp')
        except OSError as e:
            raise OutboxError(f'cannot create outbox {self.path}: {e.strerror or e}') from None
        os.close(fd)
        try:
            db = sqlite3.connect(temporary)
            try:
                db.executescript(f'PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {SCHEMA_VERSION};'
                                 + SCHEMA)
            finally:
                db.close()
            os.replace(temporary, self.path)
        except (OSError, sqlite3.Error) as e:
            os.unlink(temporary)
            raise OutboxError(f'cannot create outbox {self.path}: {e}') from None

    def _refuse(self, why):
        raise OutboxError(f'{self.path} {why}: it is left as it is; give another --outbox')

    def _open(self, max_mb):
        if not os.path.isfile(self.path):
            self._refuse('is not a file')
        try:
            with open(self.path, 'rb') as f:
                header = f.read(len(SQLITE_HEADER))
        except OSError as e:
            raise OutboxError(f'cannot read outbox {self.path}: {e.strerror or e}') from None
        if header != SQLITE_HEADER:
            self._refuse('is not an outbox of this tool (not an SQLite database)')
        try:
            db = sqlite3.connect(self.path, timeout=0, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as e:
            raise OutboxError(f'cannot open outbox {self.path}: {e}') from None
        try:
            # Exclusive before WAL: the lock is held from the first transaction to close, and WAL
            # then keeps its index in this process's memory instead of a shared -shm file.
            db.execute('PRAGMA locking_mode = EXCLUSIVE')
            db.execute('BEGIN EXCLUSIVE')
            application_id, = db.execute('PRAGMA application_id').fetchone()
            if application_id != APPLICATION_ID:
                self._refuse(f'is an SQLite database of another program (application id {application_id})')
            version, = db.execute('PRAGMA user_version').fetchone()
            if version != SCHEMA_VERSION:
                self._refuse(f'has outbox version {version}; this tool uses version {SCHEMA_VERSION}')
            problem, = db.execute('PRAGMA quick_check(1)').fetchone()
            if problem != 'ok':
                self._refuse(f'is damaged ({" ".join(problem.split())[:200]})')
            db.execute('SELECT seq, destination, message_id, body, created FROM messages LIMIT 0')
            db.execute('COMMIT')
            db.execute('PRAGMA journal_mode = WAL')
            db.execute('PRAGMA synchronous = NORMAL')
            page_size, = db.execute('PRAGMA page_size').fetchone()
            db.execute(f'PRAGMA max_page_count = {max(1, int(max_mb * 2 ** 20) // page_size)}')
        except OutboxError:
            db.close()
            raise
        except sqlite3.OperationalError as e:
            db.close()
            if 'locked' in str(e):
                raise OutboxError(f'outbox {self.path} is in use by another process: give each process its own '
                                  '--outbox') from None
            self._refuse(f'cannot be used ({e})')
        except sqlite3.DatabaseError as e:
            db.close()
            self._refuse(f'is damaged ({e})')
        return db

    # -- the inspection's side ------------------------------------------------------------------

    def put(self, message_id, body):
        """Store `body` (JSON text) for every destination -> True, or False where it could not be
        stored (outbox or disk full, a write error): then counted in `lost` and logged."""
        now = time.time()
        with self._lock:
            rows = [(self._next_seq + i, destination, message_id, body, now)
                    for i, destination in enumerate(self.destinations)]
            try:
                self._write('INSERT INTO messages (seq, destination, message_id, body, created) VALUES (?, ?, ?, ?, ?)',
                            rows)
            except sqlite3.Error as e:
                self._count_loss(e)
                return False
            self._next_seq += len(rows)
        if self._lost_logged:
            logger.warning('outbox %s stores messages again (%d lost while it could not)', self.path, self.lost)
            self._lost_logged = 0
        return True

    def _write(self, statement, rows):
        """executemany in one transaction, rolled back on any error (raised); the caller holds the lock."""
        self._db.execute('BEGIN IMMEDIATE')
        try:
            self._db.executemany(statement, rows)
            self._db.execute('COMMIT')
        except BaseException:
            if self._db.in_transaction:
                self._db.execute('ROLLBACK')
            raise

    def _count_loss(self, error):
        self.lost += 1
        now = time.monotonic()
        if not self._lost_logged or now - self._last_loss_log >= LOSS_LOG_EVERY_S:
            logger.warning('outbox %s cannot store a message (%s): dropped, the inspection goes on; %d lost so far',
                           self.path, error, self.lost)
            self._lost_logged, self._last_loss_log = self.lost, now

    # -- the senders' side ----------------------------------------------------------------------

    def pending(self, destination, after=0, limit=100):
        """[(seq, message_id, body)] of `destination`'s messages after sequence number `after`, oldest first."""
        with self._lock:
            return self._db.execute('SELECT seq, message_id, body FROM messages WHERE destination = ? AND seq > ? '
                                    'ORDER BY seq LIMIT ?', (destination, after, limit)).fetchall()

    def remove(self, seqs):
        """Delete acknowledged (or rejected) messages by sequence number."""
        seqs = list(seqs)
        if not seqs:
            return
        with self._lock:
            try:
                self._write('DELETE FROM messages WHERE seq = ?', [(seq,) for seq in seqs])
            except sqlite3.Error as e:  # sent again next time: at-least-once allows it
                logger.warning('outbox %s: cannot remove sent messages (%s); they will be sent again', self.path, e)

    # -- what the metrics show ------------------------------------------------------------------

    def depth(self):
        """{destination: messages waiting} ({} once closed: a last metrics scrape may come after)."""
        with self._lock:
            if self._db is None:
                return {}
            return dict(self._db.execute('SELECT destination, COUNT(*) FROM messages GROUP BY destination'))

    def oldest_age(self):
        """Seconds since the oldest waiting message was stored (0 when none waits)."""
        with self._lock:
            if self._db is None:
                return 0.0
            oldest, = self._db.execute('SELECT MIN(created) FROM messages').fetchone()
        return 0.0 if oldest is None else max(0.0, time.time() - oldest)

    def close(self):
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
