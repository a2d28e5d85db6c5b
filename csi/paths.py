"""Checks on paths that arrive in requests, in one place, before anything is created, mounted or removed there.

A node plugin runs as root beside the host's `/`, so a path from a request is judged before it is used:

- it is text the kernel would read as written: non-empty, valid UTF-8, no NUL, at most `MAX_PATH` bytes and
  `MAX_NAME` per component;
- it is absolute and already normalized (no `.`, `..` or empty component, no leading `//`, which POSIX `normpath`
  keeps): refusing rather than normalizing means the path acted on is exactly the one the CO named;
- no component is a symbolic link (the parent's `realpath` must be the parent itself, and the last component must
  not be a link), so a link planted under an allowed directory cannot point the plugin at the host;
- it is never one of the host's system trees, whatever the configuration says (`SYSTEM_TREES`: the path and
  everything under it; `SYSTEM_DIRS`: the directory itself), nor the plugin's own state directory or a directory a
  backend owns (`protected`, the path and everything under it). Both are compared by name and, for paths that
  exist, by device and inode, so a bind mount of `/etc` elsewhere is still `/etc`;
- when the operator set `node.allowedPathPrefixes`, it lies strictly below one of them.

Messages show a hostile path cut to `SHOWN` characters, so no answer or log line grows with the request.
"""
from __future__ import annotations

import os
import stat
from typing import Iterable, Optional, Sequence

from backends.errors import InvalidArgument

MAX_PATH = 4096  # PATH_MAX, bytes
MAX_NAME = 255   # NAME_MAX, bytes per component
SHOWN = 200      # characters of a request's path shown in a message

# The path itself and everything below it.
SYSTEM_TREES = ("/proc", "/sys", "/dev", "/etc", "/usr", "/boot", "/bin", "/sbin", "/root")
# The directory itself (the host keeps other things below it that kubelet's root may live under).
SYSTEM_DIRS = ("/", "/run", "/var", "/var/lib", "/var/run", "/var/log", "/var/tmp", "/home", "/tmp", "/mnt",
               "/media", "/opt", "/srv")


def shown(path: str, limit: int = SHOWN) -> str:
    """A path from a request, quoted and cut to `limit` characters, for messages and logs."""
    if len(path) <= limit:
        return repr(path)
    return repr(path[:limit]) + f"...(+{len(path) - limit} characters)"


def _system_tree(path: str) -> Optional[str]:
    """The system tree or directory `path` names or lies under (by name), or None."""
    if path in SYSTEM_DIRS:
        return path
    first = "/" + path.split("/")[1]
    if first.startswith("/lib"):  # /lib, /lib32, /lib64, /libx32
        return first
    for tree in SYSTEM_TREES:
        if path == tree or path.startswith(tree + "/"):
            return tree
    return None


def _under(path: str, root: str) -> bool:
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root + "/") or root == "/"


def _identity(path: str) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _existing_ancestors(path: str) -> list[str]:
    """`path` and its ancestors, deepest first, that exist."""
    out, p = [], path
    while True:
        if os.path.lexists(p):
            out.append(p)
        if p == "/":
            return out
        p = os.path.dirname(p)


def check_path(path: str, field: str, allowed_prefixes: Sequence[str] = (),
               protected: Iterable[str] = ()) -> str:
    """Return `path` (a trailing `/` trimmed) if the node may act there, else raise InvalidArgument saying why.

    `protected`: directories the plugin owns (its state directory, the backends' directories) that no request may
    name, nor anything below them."""
    if not isinstance(path, str) or not path:
        raise InvalidArgument(f"{field} is required")
    if "\x00" in path:
        raise InvalidArgument(f"{field} contains a NUL character")
    try:
        raw = path.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{field} is not valid UTF-8") from None
    if len(raw) > MAX_PATH:
        raise InvalidArgument(f"{field} is longer than {MAX_PATH} bytes")
    if not path.startswith("/"):
        raise InvalidArgument(f"{field} {shown(path)} must be an absolute path")
    trimmed = path.rstrip("/") or "/"
    parts = trimmed.split("/")[1:]
    if trimmed != "/" and any(p in ("", ".", "..") for p in parts):
        raise InvalidArgument(f"{field} {shown(path)} must be a normalized path (no '..', '.' or '//')")
    if any(len(p.encode()) > MAX_NAME for p in parts):
        raise InvalidArgument(f"{field} {shown(path)} has a component longer than {MAX_NAME} bytes")
    tree = _system_tree(trimmed)
    if tree is not None:
        what = "is" if tree == trimmed else "lies under"
        raise InvalidArgument(f"{field} {shown(path)} {what} the host's system directory {tree}; the node plugin "
                              "never mounts or removes anything there")
    owned = [os.path.normpath(p) for p in protected if p]
    for root in owned:
        if _under(trimmed, root):
            raise InvalidArgument(f"{field} {shown(path)} lies in {shown(root)}, which the plugin itself owns "
                                  "(state or backend directory); volumes are never staged or published there")
    if allowed_prefixes and not any(trimmed != p.rstrip("/") and _under(trimmed, p) for p in allowed_prefixes):
        raise InvalidArgument(f"{field} {shown(path)} is not below an allowed directory "
                              f"(node.allowedPathPrefixes: {', '.join(shown(p, 64) for p in allowed_prefixes)})")
    parent = os.path.dirname(trimmed)
    real_parent = os.path.realpath(parent)
    if real_parent != parent:
        raise InvalidArgument(f"{field} {shown(path)} goes through a symbolic link (its directory resolves to "
                              f"{shown(real_parent)}); name the real path")
    try:
        last = os.lstat(trimmed)
    except OSError:
        last = None
    if last is not None and stat.S_ISLNK(last.st_mode):
        raise InvalidArgument(f"{field} {shown(path)} is a symbolic link; the node plugin never acts through one")
    _check_identity(trimmed, field, path, owned)
    return trimmed


def _check_identity(trimmed: str, field: str, path: str, owned: list[str]) -> None:
    """The same checks by device and inode, for what exists: a bind mount of a system tree (or of the plugin's
    own directories) under an allowed prefix is refused like the tree itself."""
    trees = {t: _identity(t) for t in SYSTEM_TREES + tuple(owned)}
    dirs = {d: _identity(d) for d in SYSTEM_DIRS}
    chain = _existing_ancestors(trimmed)
    for i, p in enumerate(chain):
        ident = _identity(p)
        if ident is None:
            continue
        for name, tid in trees.items():
            if tid == ident:
                raise InvalidArgument(f"{field} {shown(path)} is the same directory as {shown(name)} (a bind "
                                      "mount or alias); the node plugin never acts there")
        if i == 0 and p == trimmed:
            for name, did in dirs.items():
                if did == ident:
                    raise InvalidArgument(f"{field} {shown(path)} is the same directory as {name}; the node plugin "
                                          "never mounts over it")
