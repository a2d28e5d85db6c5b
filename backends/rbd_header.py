"""Image metadata read and written on the image's header object itself, without opening the image.

librbd keeps an image's metadata as omap entries `metadata_<key>` of its header object `rbd_header.<id>`, the
value stored as given. Opening an image costs a header read, a watch and, for a write, the exclusive lock: more
than the create it follows, and on a mapped image the lock belongs to the node. Tessera's own keys (`tessera.*`)
concern no librbd client, so the controller reads and writes them here directly: one OSD operation each, and a
write is atomic over all the keys it sets and removes."""
from __future__ import annotations

import struct
from typing import Any, Iterable, Mapping, Optional

OMAP_PREFIX = "metadata_"
MAX_KEYS = 4096  # far above the dozen keys an image carries; a bound, not a page size
NO_SNAP = (1 << 64) - 2  # CEPH_NOSNAP: the image head


def header_object(io: Any, image: str) -> Optional[str]:
    """`rbd_header.<id>` of the format-2 image `image`, or None when the name is not registered."""
    import rados
    try:
        raw = io.read(f"rbd_id.{image}", 4096)
    except rados.ObjectNotFound:
        return None
    if len(raw) < 4:
        return None
    return "rbd_header." + raw[4:4 + struct.unpack("<I", raw[:4])[0]].decode()


def read_meta(io: Any, header: str, prefix: str) -> dict[str, str]:
    """The image's metadata whose keys start with `prefix`, prefix dropped."""
    import rados
    with rados.ReadOpCtx() as op:
        entries, _ = io.get_omap_vals(op, "", OMAP_PREFIX + prefix, MAX_KEYS)
        io.operate_read_op(op, header)
        skip = len(OMAP_PREFIX) + len(prefix)
        return {k[skip:]: v.decode(errors="replace") for k, v in entries}


def write_meta(io: Any, header: str, put: Mapping[str, str], drop: Iterable[str] = ()) -> None:
    """Set `put` and remove `drop` (full metadata keys) in one atomic operation on the header. The operation
    first reads the image size through the rbd object class, so on a header removed meanwhile it fails as a
    whole (rados.ObjectNotFound) instead of creating a stray object."""
    import rados
    drop = tuple(OMAP_PREFIX + k for k in drop)
    keys = tuple(OMAP_PREFIX + k for k in put)
    with rados.WriteOpCtx() as op:
        op.execute("rbd", "get_size", struct.pack("<Q", NO_SNAP))
        if drop:
            io.remove_omap_keys(op, drop)
        if keys:
            io.set_omap(op, keys, tuple(v.encode() for v in put.values()))
        io.operate_write_op(op, header)
