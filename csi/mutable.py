"""Mutable parameters (CSI's `mutable_parameters`, Kubernetes' VolumeAttributesClass): checked here, whole, before
any backend changes anything.

Why a module of its own: ControllerModifyVolume and CreateVolume share the rule, and the spec's rule is strict —
"the SP MUST NOT have applied any modification to the volume" when it answers INVALID_ARGUMENT — so a request is
checked key by key against what the volume's backend declares (`Backend.mutable_parameters`) and refused as a
whole, naming every key or value at fault, before the backend is called.
"""
from __future__ import annotations

from typing import Mapping

from backends.base import Backend
from backends.errors import InvalidArgument, listing, shown


def check(backend: Backend, wanted: Mapping[str, str]) -> dict[str, str]:
    """The request's mutable parameters, normalized by the backend's checks; InvalidArgument naming every unknown
    key and every bad value (all of them at once, so one correction fixes the request)."""
    if not wanted:
        return {}
    known = backend.mutable_parameters()
    if not known:
        raise InvalidArgument(f"backend {backend.name!r} has no mutable parameters (got {listing(wanted)}); "
                              "see the README's feature table")
    problems: list[str] = []
    out: dict[str, str] = {}
    unknown = sorted(k for k in wanted if k not in known)
    if unknown:
        problems.append(f"unknown mutable parameter(s) {listing(unknown)} for backend {backend.name!r} "
                        f"(known: {', '.join(sorted(known))})")
    for key in sorted(set(wanted) & set(known)):
        try:
            out[key] = known[key].check(wanted[key])
        except ValueError as e:
            problems.append(f"mutable parameter {key}={shown(wanted[key], 40)} {e}")
    if problems:
        raise InvalidArgument("; ".join(problems) + "; nothing was changed")
    return out
