"""The operator's YAML config, parsed into typed models with every problem reported by its path.

    driverName: tessera.csi.dev          # optional
    defaultBackend: fast                 # optional when there is exactly one backend
    stateDir: /var/lib/tessera           # node stage records, flex mount records
    node:
      maxVolumesPerNode: 0               # 0 = no limit reported
      allowedPathPrefixes: [/var/lib/kubelet]   # staging/target paths must lie under one of these
    backends:
      fast:
        type: rbd
        ...backend options (see each backend's options model)

No file at all means one `file` backend named `local` under `<stateDir>/file`: the embedded default.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from backends import backend_class, backend_types
from backends.base import BackendOptions

from . import constants
from .ids import BACKEND_NAME_RE


class ConfigError(Exception):
    """An invalid config; `problems` holds one `path: message` line per problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s)\n" + "\n".join(problems))


class NodeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    maxVolumesPerNode: int = Field(0, ge=0)
    allowedPathPrefixes: list[str] = Field(default_factory=list)

    @field_validator("allowedPathPrefixes")
    @classmethod
    def _absolute(cls, v: list[str]) -> list[str]:
        for p in v:
            if not os.path.isabs(p) or os.path.normpath(p) != p.rstrip("/") and p != "/":
                raise ValueError(f"{p!r} must be an absolute, normalized path")
        return v


class _TopLevel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    driverName: str = constants.DRIVER_NAME
    defaultBackend: Optional[str] = None
    stateDir: str = constants.DEFAULT_STATE_DIR
    node: NodeSettings = Field(default_factory=NodeSettings)
    backends: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("driverName")
    @classmethod
    def _driver_name(cls, v: str) -> str:
        import re
        if len(v) > 63 or not re.match(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$", v):
            raise ValueError("must be a domain-style name of at most 63 characters (e.g. tessera.csi.dev)")
        return v


@dataclass
class BackendConfig:
    name: str
    type: str
    options: BackendOptions


@dataclass
class Config:
    driver_name: str
    default_backend: str
    state_dir: str
    node: NodeSettings
    backends: dict[str, BackendConfig] = field(default_factory=dict)


def _loc(parts: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in parts)


def _field_names(model: type[BaseModel]) -> list[str]:
    names: list[str] = []
    for name, info in model.model_fields.items():
        names.append(info.alias or name)
    return names


def _model_at(model: type[BaseModel], loc: Iterable[Any]) -> Optional[type[BaseModel]]:
    """The pydantic model that holds the last element of `loc` (walking nested models, Optional ones included),
    so an unknown key can be compared with the names that model knows."""
    current: Optional[type[BaseModel]] = model
    for part in loc:
        if current is None or not isinstance(part, str):
            return None
        info = current.model_fields.get(part) or next(
            (f for f in current.model_fields.values() if f.alias == part), None)
        if info is None:
            return None
        ann = info.annotation
        candidates = [ann] + list(getattr(ann, "__args__", ()) or ())
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return current


def _suggestion(key: Any, known: list[str]) -> str:
    """' (did you mean 'thinPool'?)' for a misspelled key; matching ignores case, as most typos are case slips."""
    if not isinstance(key, str) or not known:
        return ""
    lowered = {k.lower(): k for k in known}
    if key.lower() in lowered:
        return f" (did you mean {lowered[key.lower()]!r}?)"
    close = difflib.get_close_matches(key.lower(), list(lowered), n=1, cutoff=0.6)
    return f" (did you mean {lowered[close[0]]!r}?)" if close else f" (known keys: {', '.join(sorted(known))})"


def _problems(e: ValidationError, model: type[BaseModel], prefix: str) -> list[str]:
    """One `path: message` line per pydantic error; unknown keys get the closest known name."""
    lines = []
    for err in e.errors():
        loc = tuple(err["loc"])
        where = ".".join(p for p in (prefix, _loc(loc)) if p) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden" and loc:
            holder = _model_at(model, loc[:-1])
            msg = "unknown key" + _suggestion(loc[-1], _field_names(holder) if holder else [])
        lines.append(f"{where}: {msg}")
    return lines


def parse_config(data: Any, source: str = "<config>") -> Config:
    """Validate a loaded YAML document; raise ConfigError listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"(top level): must be a mapping, got {type(data).__name__}"])
    problems: list[str] = []
    try:
        top = _TopLevel.model_validate(data)
    except ValidationError as e:
        problems.extend(_problems(e, _TopLevel, ""))
        # keep going with what parsed, so backend problems are reported too
        top = _TopLevel.model_construct(
            driverName=data.get("driverName", constants.DRIVER_NAME) if isinstance(data.get("driverName"), str) else constants.DRIVER_NAME,
            defaultBackend=data.get("defaultBackend") if isinstance(data.get("defaultBackend"), str) else None,
            stateDir=data.get("stateDir", constants.DEFAULT_STATE_DIR) if isinstance(data.get("stateDir"), str) else constants.DEFAULT_STATE_DIR,
            node=NodeSettings(),
            backends={k: v for k, v in (data.get("backends") or {}).items() if isinstance(v, dict)} if isinstance(data.get("backends"), dict) else {},
        )
    backends: dict[str, BackendConfig] = {}
    raw_backends = top.backends
    if not raw_backends and "backends" in data:
        problems.append("backends: at least one backend is required")
    for name, raw in raw_backends.items():
        where = f"backends.{name}"
        if not BACKEND_NAME_RE.match(str(name)):
            problems.append(f"{where}: backend names are 1-32 lowercase letters, digits and '-'")
            continue
        type_name = raw.get("type")
        if type_name is None:
            problems.append(f"{where}.type: field required (one of {', '.join(backend_types())})")
            continue
        if type_name not in backend_types():
            problems.append(f"{where}.type: unknown backend type {type_name!r} (one of {', '.join(backend_types())})")
            continue
        try:
            cls = backend_class(type_name)
        except ImportError as e:
            problems.append(f"{where}.type: backend {type_name!r} cannot load on this host: {e}")
            continue
        options = {k: v for k, v in raw.items() if k != "type"}
        try:
            backends[name] = BackendConfig(name, type_name, cls.options_model.model_validate(options))
        except ValidationError as e:
            problems.extend(_problems(e, cls.options_model, where))
    if not raw_backends and "backends" not in data:
        backends = _embedded_backends(top.stateDir)
    default = top.defaultBackend
    if default is None:
        if len(raw_backends) > 1:
            problems.append("defaultBackend: required when more than one backend is configured "
                            f"(one of {', '.join(sorted(raw_backends))})")
        default = next(iter(backends), constants.DEFAULT_FILE_BACKEND_NAME)
    elif default not in raw_backends and (raw_backends or "backends" in data):
        problems.append(f"defaultBackend: {default!r} is not one of the configured backends "
                        f"({', '.join(sorted(raw_backends)) or 'none'})")
    if problems:
        raise ConfigError(source, problems)
    return Config(top.driverName, default, top.stateDir, top.node, backends)


def _embedded_backends(state_dir: str) -> dict[str, BackendConfig]:
    cls = backend_class("file")
    opts = cls.options_model.model_validate({"directory": os.path.join(state_dir, "file")})
    return {constants.DEFAULT_FILE_BACKEND_NAME: BackendConfig(constants.DEFAULT_FILE_BACKEND_NAME, "file", opts)}


def _duplicate_keys(node: Any, path: str = "") -> list[str]:
    """Every key defined twice in one mapping, with both line numbers. YAML loaders keep the last value silently, so
    a backend pasted twice (or an option set twice) would otherwise lose the first definition unseen."""
    problems: list[str] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            line = key_node.start_mark.line + 1
            child = f"{path}.{key}" if path else str(key)
            if key is not None and key in seen:
                problems.append(f"{child}: defined twice (lines {seen[key]} and {line}); "
                                "YAML would silently keep only the last")
            elif key is not None:
                seen[key] = line
            problems.extend(_duplicate_keys(value_node, child))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems.extend(_duplicate_keys(item, f"{path}.{i}" if path else str(i)))
    return problems


def _read_yaml(path: str) -> Any:
    with open(path) as f:
        text = f.read()
    duplicates = _duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader))
    if duplicates:
        raise ConfigError(path, duplicates)
    data = yaml.safe_load(text)
    if data is None:
        raise ConfigError(path, ["(file): is empty (or only comments); write the configuration, or start without "
                                 "--config to serve the embedded default file backend"])
    return data


def load_config(path: Optional[str], state_dir: Optional[str] = None) -> Config:
    """Load the file at `path`; with no path, or the default path absent, the embedded default.
    `state_dir` (the --state-dir flag) overrides the file's stateDir."""
    data: Any = {}
    source = "<embedded default>"
    if path is not None:
        source = path
        try:
            data = _read_yaml(path)
        except FileNotFoundError:
            raise ConfigError(path, ["(file): does not exist"]) from None
        except yaml.YAMLError as e:
            raise ConfigError(path, [f"(yaml): {e}".replace("\n", " ")]) from None
        except UnicodeDecodeError:
            raise ConfigError(path, ["(file): is not UTF-8 text"]) from None
        except OSError as e:
            raise ConfigError(path, [f"(file): cannot be read: {e.strerror}"]) from None
    elif os.path.exists(constants.DEFAULT_CONFIG_PATH):
        return load_config(constants.DEFAULT_CONFIG_PATH, state_dir)
    if state_dir is not None and isinstance(data, dict):
        data = dict(data)
        data["stateDir"] = state_dir
    return parse_config(data, source)
