"""Request rendering for logs with every field the spec marks `csi_secret` replaced, so secrets never reach a log.

`publish_context` is opaque to the CO and not marked by the spec, but a plugin may carry credentials in it (the iSCSI
backend hands per-volume CHAP secrets from ControllerPublish to the node this way): its keys are shown, its values
never."""
from __future__ import annotations

from typing import Any

from google.protobuf.message import Message

from backends.errors import clip

from ._pb import csi_pb2

_SECRET_EXT = csi_pb2.csi_secret
REDACTED = "***stripped***"
# map fields whose values may hold credentials although the spec does not mark them csi_secret
_OPAQUE_MAPS = frozenset({"publish_context"})


def _repeated(field) -> bool:
    flag = getattr(field, "is_repeated", None)  # protobuf >= 5.x; `label` is gone in newer releases
    return bool(flag) if flag is not None else field.label == 3


def _is_secret(field) -> bool:
    opts = field.GetOptions()
    return opts.HasExtension(_SECRET_EXT) and opts.Extensions[_SECRET_EXT]


def safe_dict(msg: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field, value in msg.ListFields():
        if _is_secret(field):
            out[field.name] = REDACTED
        elif field.name in _OPAQUE_MAPS:
            out[field.name] = {k: REDACTED for k in value}
        elif field.message_type is not None and field.message_type.GetOptions().map_entry:
            out[field.name] = dict(value) if field.message_type.fields_by_name["value"].message_type is None else \
                {k: safe_dict(v) for k, v in value.items()}
        elif field.message_type is not None:
            if _repeated(field):
                out[field.name] = [safe_dict(v) for v in value]
            else:
                out[field.name] = safe_dict(value)
        elif _repeated(field):
            out[field.name] = list(value)
        else:
            out[field.name] = value
    return out


MAX_ITEMS = 20  # entries of one map or list shown in a log line
MAX_VALUE = 256  # characters of one string shown in a log line


def bounded(value: Any, items: int = MAX_ITEMS, chars: int = MAX_VALUE) -> Any:
    """A copy of a `safe_dict` value fit for one log line: strings clipped, maps and lists cut to their first
    `items` entries plus a count of the rest. A hostile request (a 10,000-key parameter map, a megabyte path) must
    not turn into a megabyte log line."""
    if isinstance(value, str):
        return clip(value, chars)
    if isinstance(value, bytes):
        return clip(repr(value), chars)
    if isinstance(value, dict):
        out = {clip(str(k), chars): bounded(v, items, chars) for k, v in list(value.items())[:items]}
        if len(value) > items:
            out["…"] = f"{len(value) - items:,} more entries"
        return out
    if isinstance(value, (list, tuple)):
        out_list = [bounded(v, items, chars) for v in list(value)[:items]]
        if len(value) > items:
            out_list.append(f"…{len(value) - items:,} more items")
        return out_list
    return value


def safe_bounded_dict(msg: Message) -> dict[str, Any]:
    """`safe_dict` (secrets replaced) and `bounded` (sizes capped): what a log line may show of a request."""
    return bounded(safe_dict(msg))
