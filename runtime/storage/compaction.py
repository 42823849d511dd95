"""Compaction of the log's sealed segments (see file_log), by a background thread or on demand.

Checkpoints and compaction. A terminal checkpoint (`base.is_terminal_checkpoint`) stands for its
session's whole history. A record is *live* while it is at or after its session's *floor* — the
latest SessionStart of the id, or the latest terminal checkpoint after it — or while `history()`
still shows it (a session that became terminal in this process keeps showing its envelopes until it
is released or the store is reopened; after a reopen its history begins at the checkpoint). Other
records (older incarnations, envelopes covered by a terminal checkpoint) are dead.

Each segment keeps an estimate of its dead records: counted when the recovery scan passes a terminal
checkpoint or a new incarnation, and when a session is released. A background thread, started by
`start_maintenance()` (after the engine's recovery, which may still fall back to records before a
checkpoint), wakes when a segment is sealed, every `compact_interval_s` and once at start, and rewrites
each sealed segment whose estimated dead share reaches `compact_dead_ratio`, after computing liveness
exactly: the live frames are copied verbatim to `<segment>.compact`, which is fsynced, renamed over the
segment, and the directory fsynced; a segment with nothing live is unlinked. A crash at any point
leaves the old or the new file, both of which replay to the same sessions; a leftover `.compact` file
is deleted at open. Appends never wait for compaction: it only takes the store lock for short steps.
Only sealed segments are compacted: a segment is sealed when it reaches `segment_bytes`, and every
open seals what earlier processes wrote (appends go to a new segment; an empty last one is reused).
Segments are never merged, so a compacted segment stays a (smaller) file of its own.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from array import array
from typing import TYPE_CHECKING

from .base import StorageError
from .segment import _COMPACT_SUFFIX, _HEADER, HEADER_SIZE, MAGIC, _Segment, _session_id_of, _sync_dir

if TYPE_CHECKING:
    from .file_log import FileLogStore

log = logging.getLogger(__name__)

#: A sealed segment is rewritten once at least this share of its records is dead.
DEFAULT_COMPACT_DEAD_RATIO = 0.5
#: How often the compactor looks at the estimates even when no segment was sealed.
DEFAULT_COMPACT_INTERVAL_S = 60.0
_LIVENESS_CHUNK = 2048  # records judged per hold of the store lock during compaction


class Compactor:
    """Rewrites a store's sealed segments without their dead records. Reads and swaps the store's index
    state under the store's lock (`_cond`), in short holds."""

    def __init__(self, store: FileLogStore) -> None:
        self.store = store
        self.thread: threading.Thread | None = None
        self.wake = threading.Event()
        self.stopping = False
        self._lock = threading.Lock()   # one compaction at a time (thread or compact())

    def start(self) -> None:
        """Start the background compactor (no-op when compact_dead_ratio is None)."""
        st = self.store
        with st._cond:
            if (not st._opened or st._closing or st._closed or self.thread is not None
                    or st.compact_dead_ratio is None):
                return
            self.thread = threading.Thread(target=self._maintain, name="wal-compactor", daemon=True)
        self.wake.set()   # one pass right away: a reopen usually leaves much to drop
        self.thread.start()

    def stop(self) -> None:
        """Stop the background compactor (a pass under way stops at its next step) and wait for it."""
        self.stopping = True
        self.wake.set()
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _maintain(self) -> None:
        while not self.stopping:
            self.wake.wait(self.store.compact_interval_s)
            self.wake.clear()
            if self.stopping:
                return
            try:
                self.compact()
            except Exception:  # the next pass may do better; appends are unaffected
                log.exception("storage: compaction pass failed")

    def compact(self, min_dead_ratio: float | None = None) -> int:
        """One compaction pass (FileLogStore.compact)."""
        st = self.store
        ratio = st.compact_dead_ratio if min_dead_ratio is None else min_dead_ratio
        if ratio is None:
            ratio = DEFAULT_COMPACT_DEAD_RATIO
        with self._lock:
            with st._cond:
                if not st._opened or st._closed:
                    raise StorageError("store is not open")
                now = time.time_ns() // 1_000_000
                st._keep_since = now - st.history_retention_ms
                candidates = [s for s in st._segs[:-1]
                              if not s.retired and s.lsns and (s.dead >= ratio * len(s.lsns)
                                                               or 0 < s.recheck_at_ms <= now)]
            freed = 0
            for seg in candidates:
                if self.stopping:
                    break
                freed += self._compact_segment(seg, ratio)
            return freed

    def _compact_segment(self, seg: _Segment, ratio: float) -> int:
        st = self.store
        with st._cond:
            if seg.retired or seg is st._segs[-1]:
                return 0
            lsns, offsets = array("Q", seg.lsns), array("Q", seg.offsets)
        name = os.path.basename(seg.path)
        try:
            with open(seg.path, "rb") as f:
                data = f.read()
        except OSError as e:
            log.warning("storage: cannot read %s for compaction: %s", name, e)
            return 0
        view = memoryview(data)
        ends, sessions = [], []
        for off in offsets:
            magic, length, _ = _HEADER.unpack_from(view, off)
            if magic != MAGIC:
                log.warning("storage: %s changed under the compactor (offset %d); left alone", name, off)
                return 0
            end = off + HEADER_SIZE + length
            ends.append(end)
            sessions.append(_session_id_of(view[off + HEADER_SIZE : end]))
        keep: list[int] = []
        n = len(offsets)
        retain = st.history_retention_ms
        recheck = 0   # when the histories kept here for replays stop being kept
        for base in range(0, n, _LIVENESS_CHUNK):   # short holds of the lock: appends go on meanwhile
            with st._cond:
                live_from = self._live_from
                ended_at, floor = st._ended_at, st._floor
                for i in range(base, min(n, base + _LIVENESS_CHUNK)):
                    sid = sessions[i]
                    if lsns[i] >= live_from(sid):
                        keep.append(i)
                        if retain and lsns[i] < floor.get(sid, 0) and sid in ended_at:
                            recheck = max(recheck, ended_at[sid] + retain)
            if self.stopping:
                return 0
        dead = n - len(keep)
        if dead == 0 or dead < ratio * n:
            with st._cond:
                seg.dead = dead   # exact now: examined again once more records die (or at recheck_at_ms)
                seg.recheck_at_ms = recheck
            return 0
        tmp = seg.path + _COMPACT_SUFFIX
        fd = -1
        try:
            if keep:
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                new_offsets = array("Q")
                chunks, pos = [], 0
                for i in keep:
                    new_offsets.append(pos)
                    chunks.append(view[offsets[i] : ends[i]])
                    pos += ends[i] - offsets[i]
                out = memoryview(b"".join(chunks))
                written = 0
                while written < len(out):
                    written += os.pwrite(fd, out[written:], written)
                os.fsync(fd)
                if self.stopping:
                    raise InterruptedError("store closing")
                os.replace(tmp, seg.path)
            else:
                os.unlink(seg.path)
            _sync_dir(st.wal_dir)
        except (OSError, InterruptedError) as e:
            if fd >= 0:
                os.close(fd)
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            if not isinstance(e, InterruptedError):
                log.warning("storage: compaction of %s failed, segment left as it was: %s", name, e)
            return 0
        new = _Segment(seg.number, seg.path, fd)
        new.recheck_at_ms = recheck
        new.lsns = array("Q", (lsns[i] for i in keep))
        if keep:
            new.offsets = new_offsets
        else:
            new.retired = True   # nothing left to read; the file is gone
        with st._cond:
            st._segs[st._segs.index(seg)] = new
            seg.retired = True   # readers holding it keep its fd until they drop it
            st.compactions += 1
            st.compacted_bytes += len(data) - (pos if keep else 0)
        freed = len(data) - (pos if keep else 0)
        log.info("storage: compacted %s: kept %d of %d records, %d -> %d bytes%s", name, len(keep), n,
                 len(data), pos if keep else 0, "" if keep else " (segment removed)")
        return freed

    def _live_from(self, session_id: str) -> int:
        """Records of the session with a smaller LSN are dead. Called with the store lock held."""
        st = self.store
        floor = st._floor.get(session_id, 0)
        positions = st._index.get(session_id)
        if positions:
            ended = st._ended_at.get(session_id) if st._ended_at else None
            if ended is not None and ended >= st._keep_since:
                return positions[0]   # within MACP_HISTORY_RETENTION_SECS: the whole history stays
            first = positions[st._start.get(session_id, 0)]
            if first < floor:
                return first
        return floor

