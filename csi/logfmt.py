"""How the process writes its log: `text` for people at a terminal, `json` (one object per line) for collectors.

Why JSON lines need more than a formatter: the per-RPC line is already a JSON object, but a text prefix in front of
it made every collector parse it twice, and C libraries (librados, librbd) write their own lines straight to file
descriptor 2, which no Python formatter sees. In json mode the process's fd 2 is therefore a pipe read by one thread
that wraps each foreign line into an object with its level (Ceph's priority column where the line has one), and
Python's logging writes to the original stderr. Every line on the real stderr is then one JSON object.
"""
from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import os
import queue
import sys
import threading
import time
from typing import IO, Any, Optional

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
MAX_LINE = 8192  # characters of one foreign stderr line kept in the log
BATCH_DELAY = 0.05  # seconds a log line may wait for the lines logged after it (BatchWriter)


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record. A message that is itself a JSON object (the per-RPC line) is merged into the
    record's object rather than nested as a string, so collectors see `method`, `code`, `duration_ms` as fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": _timestamp(record.created), "level": record.levelname.lower(),
                               "logger": record.name}
        message = record.getMessage()
        fields: Optional[dict[str, Any]] = None
        if message.startswith("{"):
            try:
                parsed = json.loads(message)
                fields = parsed if isinstance(parsed, dict) else None
            except ValueError:
                fields = None
        if fields is not None:
            out.update({k: v for k, v in fields.items() if k not in ("time", "level", "logger")})
        else:
            out["message"] = message
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def ceph_level(line: str) -> str:
    """The level of a line a Ceph library wrote itself: `<date> <time> <thread> <prio> <subsystem>: ...` where prio
    -1 is an error, 0 a warning, 1-5 information and more debugging; a line without that shape is a warning (a C
    library writing to stderr unasked usually has something to say)."""
    parts = line.split(None, 4)
    for token in parts[2:4]:
        try:
            prio = int(token)
        except ValueError:
            continue
        return "error" if prio < 0 else "warning" if prio == 0 else "info" if prio <= 5 else "debug"
    return "warning"


def _pump(read_fd: int, out: IO[str]) -> None:
    with os.fdopen(read_fd, "r", errors="replace") as pipe:
        for line in pipe:
            line = line.rstrip("\n")
            if not line:
                continue
            obj = {"time": _timestamp(time.time()), "level": ceph_level(line), "logger": "stderr",
                   "message": line[:MAX_LINE]}
            try:
                out.write(json.dumps(obj) + "\n")
                out.flush()
            except (OSError, ValueError):
                return


def _drain(pump: threading.Thread) -> None:
    """At exit, close every write end of the pipe so the pump sees its end and writes what is still in it: the last
    lines before an exit (a config error, a fatal message) are the ones an operator needs."""
    try:
        sys.stderr.flush()
        sys.stderr.close()
        os.close(2)
    except OSError:
        pass
    pump.join(timeout=2.0)


def configure(log_format: str, level: str, capture_stderr: bool = True) -> None:
    """Set up the root logger for `log_format`; in json mode also route fd 2 through the wrapping thread."""
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r}: one of {', '.join(FORMATS)}")
    stream: IO[str] = sys.stderr
    if log_format == "json" and capture_stderr:
        try:
            original = os.fdopen(os.dup(2), "w", buffering=1)
            read_fd, write_fd = os.pipe()
            os.dup2(write_fd, 2)
            os.close(write_fd)
            sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)  # stray Python prints get wrapped too
            pump = threading.Thread(target=_pump, args=(read_fd, original), name="stderr-json", daemon=True)
            pump.start()
            atexit.register(_drain, pump)
            stream = original
        except OSError:
            stream = sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    global _listener
    if _listener is not None:
        _listener.stop()
    records: "queue.SimpleQueue[logging.LogRecord]" = queue.SimpleQueue()
    _listener = BatchWriter(records, handler)
    _listener.start()
    atexit.register(_stop_listener, _listener)  # before _drain (atexit runs last-registered first)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(_Handoff(records))
    root.setLevel(getattr(logging, level.upper()))


class BatchWriter:
    """The one thread that formats and writes every log line, a batch at a time.

    Why batches: a writer that wakes for each record (the stock QueueListener) takes the interpreter lock once per
    RPC, right when the call that logged is sending its answer, and makes one write per line. This one wakes for
    the first record, gives the calls `delay` seconds to finish, then formats everything queued meanwhile and
    writes it with one call. Measured on RBD, 500 creates from 32 callers, 4 paired rounds against the stock
    listener in the same run: 5-8 % more creates/s in every round, 0.3 ms less server CPU per create. Idle, it
    sleeps on the queue: no wake-ups. A line reaches the log at most `delay` late; `flush` and `stop` wait for
    nothing."""

    _STOP = object()

    def __init__(self, records: "queue.SimpleQueue[Any]", handler: logging.Handler,
                 delay: float = BATCH_DELAY) -> None:
        self.records = records
        self.handler = handler
        self.delay = delay
        self._wake = threading.Event()  # a flush or stop cuts the batch delay short
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Write what is queued, then end the thread (a record logged after this stays unwritten)."""
        if self._thread.is_alive():
            self.records.put(self._STOP)
            self._wake.set()
            self._thread.join()

    def flush(self, timeout: float = 5.0) -> None:
        """Return once everything queued so far is written (at most `timeout` seconds): before a process leaves
        with os._exit, which runs no exit handlers."""
        if self._thread.is_alive():
            written = threading.Event()
            self.records.put(written)
            self._wake.set()
            written.wait(timeout)

    def _run(self) -> None:
        while True:
            first = self.records.get()
            if isinstance(first, logging.LogRecord):  # not a flush or a stop: let the batch gather
                self._wake.wait(self.delay)
            self._wake.clear()
            batch = [first]
            while True:
                try:
                    batch.append(self.records.get_nowait())
                except queue.Empty:
                    break
            self._write([r for r in batch if isinstance(r, logging.LogRecord)])
            for marker in batch:
                if isinstance(marker, threading.Event):
                    marker.set()
            if self._STOP in batch:
                return

    def _write(self, batch: list[logging.LogRecord]) -> None:
        stream = getattr(self.handler, "stream", None)
        if stream is None:  # not a stream handler: its own emit, record by record
            for record in batch:
                self.handler.handle(record)
            return
        lines = []
        for record in batch:
            if record.levelno < self.handler.level or not self.handler.filter(record):
                continue
            try:
                lines.append(self.handler.format(record))
            except Exception:  # noqa: BLE001 - as Handler.emit: one bad record does not stop the log
                self.handler.handleError(record)
        if not lines:
            return
        try:
            stream.write("\n".join(lines) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed or full stream must not kill the writer
            self.handler.handleError(batch[-1])


class _Handoff(logging.handlers.QueueHandler):
    """Hands each record to the one writer thread. Why: with a StreamHandler on the root logger every RPC thread
    formats its line and takes the handler's lock around the write, so 32 concurrent calls queue behind one lock;
    here a thread only resolves its message (its arguments may change after the call) and leaves formatting and
    writing to the listener. Unlike the stock `prepare`, the record is not formatted here and keeps its exc_info,
    so the listener's formatter renders a traceback exactly as before (JSON: its own `traceback` field)."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.msg = record.getMessage()
        record.args = None
        return record

    def handle(self, record: logging.LogRecord) -> bool:  # type: ignore[override]
        """Without the handler lock that Handler.handle takes around emit: the queue is thread-safe by itself."""
        if not self.filter(record):
            return False
        try:
            self.enqueue(self.prepare(record))
        except Exception:  # noqa: BLE001 - as Handler.emit: a log call never raises into the caller
            self.handleError(record)
        return True


_listener: Optional[BatchWriter] = None


def flush() -> None:
    """Write every log line queued so far (see BatchWriter.flush)."""
    if _listener is not None:
        _listener.flush()


def _stop_listener(listener: BatchWriter) -> None:
    """At exit, write what is still queued: the last lines before an exit are the ones an operator needs."""
    try:
        listener.stop()
    except Exception:  # noqa: BLE001 - already stopped by a later configure()
        pass
