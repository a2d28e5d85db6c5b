"""Tessera's records of an RBD image — the create's request and commit (`name`, `kind`, `parameters`, ...), the
publications, group membership — kept as omap entries `tessera.<key>` of the image's id object `rbd_id.<image>`.

Why there and not in the image's metadata (the header's omap): librbd creates `rbd_id.<image>` with the image and
removes it with the image, and its name follows from the image name alone. So the commit of a create is one OSD
operation right after `RBD().create`, with no read of the image's id to find its header first (one round trip less
per CreateVolume), and a publish is one read and one write. librbd reads only the object's data (the id); omap
entries beside it are invisible to every librbd client. A clone's id object starts empty, so a clone never inherits
its parent's records (librbd copies the parent's header metadata into the child).

Images committed before this version keep their records as header metadata (`metadata_tessera.<key>`, what
`rbd image-meta list` shows). They count while the id object holds no commit; `save` moves them to the id object
the first time it writes, after which the header's copies are never read again. Operators read the records with
`rados -p POOL listomapvals rbd_id.IMAGE`.
"""
from __future__ import annotations

import contextlib
import errno
import struct
from typing import Any, Iterable, Iterator, Mapping, Optional

PREFIX = "tessera."
HEADER_PREFIX = "metadata_" + PREFIX  # the same records as image metadata (images committed before the move)
MAX_KEYS = 4096  # far above the dozen keys an image carries; a bound, not a page size


def id_object(image: str) -> str:
    return f"rbd_id.{image}"


def own(meta: dict[str, str], image: str) -> dict[str, str]:
    """Header-kept records when they are `image`'s own, else {}: librbd's clone copies the parent's header
    metadata, whose `image` key names the parent, into a child. Images committed before the `image` key existed
    carry none and count as their own."""
    return meta if meta.get("image", image) == image else {}


def _values(entries: Iterable[tuple[str, bytes]], prefix: str) -> dict[str, str]:
    return {k[len(prefix):]: v.decode(errors="replace") for k, v in entries}


def read(io: Any, image: str) -> Optional[dict[str, str]]:
    """The id object's records (prefix dropped); None when the name is not registered. One OSD operation."""
    import rados
    with rados.ReadOpCtx() as op:
        entries, _ = io.get_omap_vals(op, "", PREFIX, MAX_KEYS)
        try:
            io.operate_read_op(op, id_object(image))
        except rados.ObjectNotFound:
            return None
        return _values(entries, PREFIX)


class PendingRead:
    """A `read` sent and not yet answered (see `reading`)."""

    def __init__(self, io: Any, image: str) -> None:
        import rados
        self.op = rados.ReadOp().create()
        self.entries, _ = io.get_omap_vals(self.op, "", PREFIX, MAX_KEYS)
        self.completion = io.operate_aio_read_op(self.op, id_object(image))
        self.io = io
        self.image = image

    def wait(self) -> None:
        self.completion.wait_for_complete()

    def result(self) -> Optional[dict[str, str]]:
        """As `read`: the records, or None when the name is not registered."""
        self.wait()
        rc = self.completion.get_return_value()
        if rc == -errno.ENOENT:
            return None
        if rc < 0:  # rare (permissions, a timeout): read again synchronously, for librados' typed exception
            return read(self.io, self.image)
        return _values(self.entries, PREFIX)


@contextlib.contextmanager
def reading(io: Any, image: str) -> Iterator[PendingRead]:
    """Send the records' read now and let the caller do its own round trip meanwhile (the header's metadata for
    the QoS keys): both answers arrive in the time of one. The read's buffers live until its answer is in, so
    the block's exit waits for it even when the block raised."""
    pending = PendingRead(io, image)
    try:
        yield pending
    finally:
        pending.wait()
        pending.op.release()


def header_records(io: Any, image: str) -> dict[str, str]:
    """The records an image committed before the move keeps in its header's metadata (prefix dropped), when they
    are its own (`own`). Two OSD operations: the id, then the header."""
    import rados
    try:
        raw = io.read(id_object(image), 4096)
    except rados.ObjectNotFound:
        return {}
    if len(raw) < 4:
        return {}
    header = "rbd_header." + raw[4:4 + struct.unpack("<I", raw[:4])[0]].decode()
    with rados.ReadOpCtx() as op:
        entries, _ = io.get_omap_vals(op, "", HEADER_PREFIX, MAX_KEYS)
        try:
            io.operate_read_op(op, header)
        except rados.ObjectNotFound:
            return {}
        return own(_values(entries, HEADER_PREFIX), image)


def merged(mine: Optional[dict[str, str]], header: Mapping[str, str]) -> dict[str, str]:
    """The records that count: the id object's once it holds the commit, else the header's own beneath them."""
    mine = mine or {}
    return mine if "name" in mine else {**header, **mine}


def load(io: Any, image: str) -> Optional[dict[str, str]]:
    """Every record of `image` that counts (`merged`); None when the name is not registered. One OSD operation for
    an image committed by this version, three for one committed before."""
    mine = read(io, image)
    if mine is None:
        return None
    return mine if "name" in mine else merged(mine, header_records(io, image))


def write(io: Any, image: str, put: Mapping[str, str], drop: Iterable[str] = ()) -> None:
    """Set `put` and remove `drop` (keys without the prefix) in one atomic operation on the id object. The
    operation first asks the rbd class for the id it holds, so on a name unregistered meanwhile it fails as a
    whole (rados.ObjectNotFound) instead of creating a stray object."""
    import rados
    gone = tuple(PREFIX + k for k in drop)
    keys = tuple(PREFIX + k for k in put)
    with rados.WriteOpCtx() as op:
        op.execute("rbd", "get_id", b"")
        if gone:
            io.remove_omap_keys(op, gone)
        if keys:
            io.set_omap(op, keys, tuple(v.encode() for v in put.values()))
        io.operate_write_op(op, id_object(image))


def save(io: Any, image: str, loaded: Mapping[str, str], put: Mapping[str, str], drop: Iterable[str] = ()) -> None:
    """`write` after a `load`: every loaded record is written again with `put` over it, so records an older
    version kept in the header move to the id object in this same operation (one operation either way: the
    records are a few hundred bytes)."""
    drop = set(drop)
    write(io, image, {**{k: v for k, v in loaded.items() if k not in drop}, **put}, drop)
