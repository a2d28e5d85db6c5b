"""The configured backends of this process, instantiated once from the config."""
from __future__ import annotations

import logging
from typing import Iterator

from backends import backend_class
from backends.base import Backend, Runtime
from backends.errors import InvalidArgument, NotFound

from . import constants
from .config import Config

log = logging.getLogger(__name__)


class Backends:
    def __init__(self, config: Config, node_name: str) -> None:
        self.config = config
        self.runtime = Runtime(driver_name=config.driver_name, node_name=node_name, state_dir=config.state_dir,
                               topology_key=constants.TOPOLOGY_NODE_KEY)
        self._by_name: dict[str, Backend] = {}
        for name, bc in config.backends.items():
            self._by_name[name] = backend_class(bc.type)(name, bc.options, self.runtime)

    def __iter__(self) -> Iterator[Backend]:
        return iter(self._by_name.values())

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def for_id(self, backend_name: str, what: str) -> Backend:
        """The backend an ID points at; an ID naming no configured backend cannot exist (NotFound)."""
        try:
            return self._by_name[backend_name]
        except KeyError:
            raise NotFound(f"{what} does not exist: no backend named {backend_name!r} is configured") from None

    def for_create(self, requested: str | None) -> Backend:
        name = requested or self.config.default_backend
        try:
            return self._by_name[name]
        except KeyError:
            raise InvalidArgument(f"StorageClass parameter {constants.PARAM_BACKEND}={name!r} names no configured "
                                  f"backend (configured: {', '.join(self.names())})") from None

    def close(self) -> None:
        for b in self:
            try:
                b.close()
            except Exception:  # shutting down: log and go on
                log.exception("closing backend %s failed", b.name)
