"""The log writer thread (csi/logfmt.py BatchWriter): every queued line is written, in order, whole, a batch per
write; stop() loses nothing queued before it; a traceback survives; one record that cannot be formatted costs only
itself. Driven with a real StreamHandler on a stream that records each write."""
from __future__ import annotations

import io
import logging
import queue
import sys
import threading

from csi.logfmt import BatchWriter


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def _record(msg: str, level: int = logging.INFO, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("tessera.rpc", level, __file__, 1, msg, None, exc_info)


def _writer(stream: CountingStream, delay: float = 0.05):
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    records: queue.SimpleQueue = queue.SimpleQueue()
    return records, BatchWriter(records, handler, delay=delay)


def test_a_burst_is_one_write_and_keeps_every_line_in_order() -> None:
    stream = CountingStream()
    records, writer = _writer(stream)
    for i in range(300):
        records.put(_record(f"line {i}"))
    writer.start()
    writer.stop()
    lines = stream.getvalue().splitlines()
    assert lines == [f"INFO line {i}" for i in range(300)]
    assert stream.writes == 1


def test_lines_from_many_threads_all_arrive_whole() -> None:
    stream = CountingStream()
    records, writer = _writer(stream, delay=0.01)
    writer.start()

    def log(t: int) -> None:
        for i in range(100):
            records.put(_record(f"thread {t} line {i}"))

    threads = [threading.Thread(target=log, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.stop()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 800
    for t in range(8):
        assert [ln for ln in lines if ln.startswith(f"INFO thread {t} ")] == \
            [f"INFO thread {t} line {i}" for i in range(100)]
    assert stream.writes < 800  # batched, not a write per line


def test_stop_writes_what_was_queued_and_ends_the_thread() -> None:
    stream = CountingStream()
    records, writer = _writer(stream, delay=5.0)  # a long batch delay: stop must not wait it out per record
    writer.start()
    records.put(_record("last words", logging.ERROR))
    writer.stop()
    assert stream.getvalue() == "ERROR last words\n"
    assert not writer._thread.is_alive()


def test_a_traceback_is_written_with_its_record() -> None:
    stream = CountingStream()
    records, writer = _writer(stream)
    try:
        raise RuntimeError("disk on fire")
    except RuntimeError:
        records.put(_record("failed", logging.ERROR, sys.exc_info()))
    writer.start()
    writer.stop()
    out = stream.getvalue()
    assert out.startswith("ERROR failed\nTraceback (most recent call last):")
    assert "RuntimeError: disk on fire" in out


def test_a_record_that_cannot_be_formatted_costs_only_itself(capsys) -> None:
    stream = CountingStream()
    records, writer = _writer(stream)
    records.put(_record("before"))
    records.put(logging.LogRecord("x", logging.INFO, __file__, 1, "%d items", ("not a number",), None))
    records.put(_record("after"))
    writer.start()
    writer.stop()
    assert stream.getvalue() == "INFO before\nINFO after\n"
    assert "Logging error" in capsys.readouterr().err  # logging's own report of the bad record, on stderr


def test_flush_returns_once_the_queued_lines_are_written_and_the_writer_goes_on() -> None:
    stream = CountingStream()
    records, writer = _writer(stream, delay=5.0)  # flush must not wait out the batch delay
    writer.start()
    records.put(_record("shutting down"))
    writer.flush(timeout=2.0)
    assert stream.getvalue() == "INFO shutting down\n"
    records.put(_record("still written after a flush"))
    writer.stop()
    assert stream.getvalue().splitlines() == ["INFO shutting down", "INFO still written after a flush"]
