"""The shim's fast path: hand the call to a running node agent (flex.agent) over its unix socket.

Imported by the launcher before site-packages are on sys.path, and deliberately minimal: only the built-in `_socket`
module (importing `socket` or `json` alone would cost ~10 ms, as much as the interpreter start). Wire format, both
ways NUL-separated fields: request `config NUL node NUL arg1 NUL arg2 ...` (argv cannot contain NUL), then the
client shuts its write side; reply `exit-code NUL reply-JSON`.

Any trouble — no agent, an agent for another config, an agent gone mid-call — returns None and the launcher runs
the call in-process: every operation is idempotent, so running it again is safe.
"""



def call(socket_path: str, argv: "list[str]", config: str, node: str) -> "tuple[str, int] | None":
    """(reply JSON, exit code) from the agent, or None to run in-process."""
    if not socket_path:
        return None
    import _socket
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            s.connect(socket_path)
        except OSError:
            return None
        s.sendall("\0".join([config, node, *argv]).encode())
        s.shutdown(_socket.SHUT_WR)
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
        rc, sep, reply = b"".join(chunks).partition(b"\0")
        if not sep or not reply.strip().startswith(b"{"):
            return None
        return reply.decode(), int(rc)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    finally:
        s.close()
