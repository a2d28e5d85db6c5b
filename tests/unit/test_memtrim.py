"""The idle trimmer (csi/memtrim.py): one trim after each burst of calls, none while calls keep coming or when
nothing happened since the last trim. Driven with explicit clock values; the trim is a counter here, and the
real one (glibc's malloc_trim) is called once at the end."""
from __future__ import annotations

import time

from csi import memtrim


def test_one_trim_per_burst_once_it_is_over() -> None:
    trims: list[int] = []
    t = memtrim.IdleTrimmer(lambda: trims.append(1), quiet=5.0)
    assert not t.tick(time.monotonic() + 100)  # no call yet: nothing to give back
    start = time.monotonic()
    t.note_call(start)
    t.note_call(start + 3)
    assert not t.tick(start + 4)  # still inside the burst
    assert t.tick(start + 8.5) and trims == [1]
    assert not t.tick(start + 20) and trims == [1]  # idle since: no second trim
    t.note_call(start + 30)
    assert not t.tick(start + 33)
    assert t.tick(start + 35) and trims == [1, 1]


def test_the_glibc_call_exists_and_runs() -> None:
    trim = memtrim._glibc_trim()
    assert trim is not None, "malloc_trim not found: the plugin runs on glibc (Debian) here"
    assert trim() in (0, 1)  # 1: memory was released, 0: none could be
