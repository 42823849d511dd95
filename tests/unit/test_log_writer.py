"""The log handler never makes the logging thread wait for a reader that does not read (issue 14:
nothing blocks the event loop), keeps the order of lines, and says how many it had to drop."""
from __future__ import annotations

import fcntl
import logging
import os
import select
import threading

import pytest

from macp_runtime.vocabulary.logs import HumanFormatter, LineWriter

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


@pytest.fixture
def pipe():
    """A pipe of one page, so a few hundred bytes of filler leave it full."""
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def _fill(w: int) -> bytes:
    """Fill the pipe completely (non-blocking writes until EAGAIN); returns what was written."""
    flags = fcntl.fcntl(w, fcntl.F_GETFL)
    fcntl.fcntl(w, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    written = []
    try:
        while True:
            written.append(os.write(w, b"=" * 512))
    except BlockingIOError:
        pass
    finally:
        fcntl.fcntl(w, fcntl.F_SETFL, flags)
    return b"=" * sum(written)


def _read_all(r: int, until: bytes, limit: float = 10.0) -> bytes:
    """Read the pipe until `until` has arrived (on a thread, so a missing line fails instead of hanging)."""
    got = bytearray()
    done = threading.Event()

    def reader():
        while until not in got:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            got.extend(chunk)
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    assert done.wait(limit), f"{until!r} never arrived; got {bytes(got)[-300:]!r}"
    return bytes(got)


def _logger(handler: logging.Handler, name: str) -> logging.Logger:
    handler.setFormatter(HumanFormatter())
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    return logger


def _emit_all(logger: logging.Logger, lines: list[str], limit: float = 5.0) -> None:
    """Log every line on a thread and require that it finishes: a blocking write would hang here."""
    t = threading.Thread(target=lambda: [logger.info(line) for line in lines], daemon=True)
    t.start()
    t.join(limit)
    assert not t.is_alive(), "logging blocked on the full pipe"


def test_lines_go_out_at_once_when_the_output_has_room():
    r, w = os.pipe()   # the default size: poll() reports room while a page of it is free
    handler = LineWriter(w)
    log = _logger(handler, "t.room")
    log.info("first")
    log.info("second")
    text = os.read(r, 4096).decode()
    assert [line.split(": ", 1)[1] for line in text.splitlines()] == ["first", "second"]
    assert handler._thread is None   # written on the caller's thread: no writer thread was needed
    os.close(r)
    os.close(w)


def test_a_regular_file_takes_every_line_at_once_long_ones_too(tmp_path):
    path = tmp_path / "server.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    handler = LineWriter(fd)
    log = _logger(handler, "t.file")
    long = "\u20ac" * 1900   # 5,700 bytes, over PIPE_BUF (a pipe would send it to the writer thread),
    assert len(long.encode()) > select.PIPE_BUF   # and under the formatter's 2,000-character cap
    log.info("short")
    log.info(long)
    lines = path.read_text(encoding="utf-8").splitlines()   # read at once: nothing waits in a backlog
    assert [line.split(": ", 1)[1] for line in lines] == ["short", long]
    assert handler._thread is None
    os.close(fd)


def test_a_reader_that_stops_reading_never_blocks_the_logger_and_no_line_is_lost(pipe):
    r, w = pipe
    handler = LineWriter(w)
    log = _logger(handler, "t.full")
    filler = _fill(w)
    lines = [f"line {i:04d}" for i in range(500)]   # ~40 KB: ten times what the pipe holds
    _emit_all(log, lines)
    log.info("last")
    got = _read_all(r, b": last\n")
    assert got.startswith(filler)
    messages = [line.split(": ", 1)[1] for line in got[len(filler):].decode().splitlines()]
    assert messages == lines + ["last"]   # all of them, in the order they were logged
    handler.close()


def test_beyond_its_backlog_it_drops_lines_and_says_how_many(pipe):
    r, w = pipe
    handler = LineWriter(w, capacity=3)
    log = _logger(handler, "t.drop")
    filler = _fill(w)
    _emit_all(log, [f"line {i}" for i in range(10)])
    tail = _read_all(r, b"dropped")[len(filler):].decode().splitlines()
    # 3 wait in the backlog; the writer thread may already hold what the backlog had when it woke
    # (up to 3 more, blocked in its write): the lines kept are the first ones, in order, and the
    # rest are counted.
    kept = [line.split(": ", 1)[1] for line in tail[:-1]]
    assert 3 <= len(kept) <= 6 and kept == [f"line {i}" for i in range(len(kept))]
    notice = tail[-1]
    assert "WARNING" in notice
    assert f"{10 - len(kept)} log lines were dropped: the log output did not keep up" in notice
    log.info("after")   # the output keeps up again: lines are not dropped any more
    assert b": after\n" in _read_all(r, b": after\n")
    handler.close()


def test_flush_waits_for_the_backlog_and_close_ends_the_writer(pipe):
    r, w = pipe
    handler = LineWriter(w)
    log = _logger(handler, "t.flush")
    filler = _fill(w)
    _emit_all(log, [f"line {i}" for i in range(50)])
    reader = threading.Thread(target=_read_all, args=(r, b": line 49\n"), daemon=True)
    reader.start()
    handler.flush(timeout=10)
    assert not handler._backlog and not handler._busy
    handler.close()
    handler._thread.join(5)
    assert not handler._thread.is_alive()
    reader.join(5)
    assert len(filler) > 0


def test_flush_gives_up_after_its_timeout_when_nobody_reads(pipe):
    r, w = pipe
    handler = LineWriter(w)
    log = _logger(handler, "t.stuck")
    _fill(w)
    _emit_all(log, ["waiting"])
    handler.flush(timeout=0.2)   # returns: exit must not hang on a dead reader
    assert handler._backlog or handler._busy
