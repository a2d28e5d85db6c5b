"""Session fixtures for the image stage: the built image (tests/image/build.py) and one container root to run in.

    pytest tests/image            build (or reuse) localhost/tessera-csi:test, then run the checks inside it

The build's timings and the image's size are printed in the terminal summary.
"""
from __future__ import annotations

import os
from typing import Iterator

import pytest

from tests.conftest import require
from tests.image import build
from tests.image.rootfs import Container

_REPORT: list[str] = []


@pytest.fixture(scope="session")
def image() -> build.Built:
    missing = build.missing_prerequisites()
    require(not missing, "the image stage needs " + ", ".join(missing) + " (.ci/install-deps all installs "
            "debootstrap buildah podman)")
    built = build.ensure_image()
    how = "reused from the cache (nothing the recipe reads changed)" if built.cached else "built"
    _REPORT.append(f"{built.tag} {built.image_id[:12]}: {how}; size {built.size_bytes / 1e6:.0f} MB")
    _REPORT.extend(f"  {k}: {v:.1f} s" for k, v in built.timings.items())
    _REPORT.append(f"  store {build.CACHE / 'storage'}, build log {built.log}")
    return built


@pytest.fixture(scope="session")
def container(image: build.Built) -> Iterator[Container]:
    c = Container.create(image.tag, f"tessera-image-test-{os.getpid()}")
    try:
        yield c
    finally:
        c.remove()


def pytest_terminal_summary(terminalreporter):
    if _REPORT:
        terminalreporter.section("tessera-csi image")
        for line in _REPORT:
            terminalreporter.write_line(line)
