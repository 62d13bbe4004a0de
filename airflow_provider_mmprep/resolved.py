"""A resolved config: the validated pipeline config written once, read by task processes without pydantic.

``mmprep validate CONFIG [key=value ...] --resolved-out FILE`` validates as always and writes FILE: every
block as its model holds it (defaults filled, interpolations resolved, paths typed), a fingerprint of the
config schema and digests of the files validation read (CONFIG and the precache YAML it names).
``mmprep run FILE --stage NAME --task-id N --task-count M`` then starts from FILE. Validation happened
once, up front; each task is spared the config layer's imports (pydantic, its core and the models'
schemas: ~0.15 CPU-seconds), which is what many task processes started at once on one machine spend most
of their start-up on (``benchmarks/bench_reorganize_tar.py``).

Reading it checks what could make it wrong: another mmprep's schema (fingerprint) or one of those files
edited since (digests; a file that is not there, e.g. in a pod, is not checked). Values the YAML takes
from the environment (``${oc.env:…}``) are those of the validating process; ``storage_options`` keep their
``${env:…}`` references, resolved where the stage runs, as with the YAML. Each block is a
:class:`ResolvedBlock`: its fields as the model held them; anything else (a property such as
``task_selection``, a method) is asked of the real model, built from those fields on first use, so a
stage behaves as it does on the validated config. Nothing here imports pydantic or Airflow.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from . import __version__
from .configbase import STAGE_NAMES, ConfigError
from .fsutil import atomic_write_bytes

FORMAT = "mmprep-resolved-config"
FORMAT_VERSION = 1
#: Sources whose change may change what a config validates to (and so what a resolved file must hold).
_SCHEMA_SOURCES = ("configbase.py", "storage_config.py", "config/models.py", "config/loader.py")


def schema_fingerprint() -> str:
    """Digest of mmprep's version and the config layer's sources: a resolved file written by another
    mmprep (other defaults, other fields) is refused rather than half understood."""
    digest = hashlib.sha256(__version__.encode())
    package = Path(__file__).parent
    for name in _SCHEMA_SOURCES:
        digest.update(b"\0" + name.encode() + b"\0" + (package / name).read_bytes())
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- writing (the validating process: pydantic is loaded there anyway) ---------------------------------------

def _encode(value: Any, where: str) -> Any:
    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        fields = {name: _encode(getattr(value, name), f"{where}.{name}") for name in type(value).model_fields}
        for name, extra in (value.__pydantic_extra__ or {}).items():
            fields[name] = _encode(extra, f"{where}.{name}")
        return {"$model": type(value).__name__, "fields": fields}
    if isinstance(value, Path):
        return {"$path": str(value)}
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise ConfigError([f"{where}: a mapping with keys that are not strings cannot be written resolved"])
        return {"$dict": {key: _encode(item, f"{where}.{key}") for key, item in value.items()}}
    if isinstance(value, (list, tuple)):
        return [_encode(item, f"{where}.{i}") for i, item in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise ConfigError([f"{where}: a value of type {type(value).__name__} cannot be written resolved"])


def write_resolved(cfg: Any, out: str | Path, overrides: list[str] | None = None) -> Path:
    """Write the validated ``cfg`` (a :class:`.config.PipelineConfig`) to ``out`` (atomically)."""
    source = cfg.source_path
    # The local files validation read: the YAML and the precache YAML it names (a URL is not followed).
    read = [Path(source)] if source is not None else []
    if cfg.precache is not None and isinstance(cfg.precache_encodings.precache_config_path, Path):
        read.append(cfg.precache_encodings.precache_config_path)
    body = {
        "format": FORMAT,  # first: :func:`is_resolved_file` looks for it at the start of the file
        "format_version": FORMAT_VERSION,
        "schema": schema_fingerprint(),
        "mmprep_version": __version__,
        "source": str(Path(source).absolute()) if source is not None else None,
        "read": {str(file.absolute()): _file_digest(file) for file in read},
        "overrides": list(overrides or []),
        "config": _encode(cfg, "config"),
    }
    out = Path(out)
    atomic_write_bytes(out, json.dumps(body, indent=1, ensure_ascii=False).encode())
    return out


# --- reading (task processes: no pydantic) --------------------------------------------------------------------

class ResolvedBlock:
    """One validated model's fields, read as attributes; what is not a field goes to the real model."""

    __slots__ = ("_model", "_fields", "_real")

    def __init__(self, model: str, fields: dict[str, Any]):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_fields", fields)
        object.__setattr__(self, "_real", None)

    def __getattr__(self, name: str) -> Any:
        fields = object.__getattribute__(self, "_fields")
        if name in fields:
            return fields[name]
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.real_model(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a resolved config is read-only ({self._model}.{name})")

    def real_model(self) -> Any:
        """The pydantic model these fields came from, built once (validated again: they are values its own
        validation gave, so this only confirms them)."""
        if self._real is None:
            from pydantic import BaseModel

            from .config import models

            model = getattr(models, self._model, None)
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                raise ConfigError([f"resolved config: {self._model!r} is not a block of mmprep's config"])
            built = model.model_validate({name: _to_model(value) for name, value in self._fields.items()})
            object.__setattr__(self, "_real", built)
        return self._real

    def __repr__(self) -> str:
        return f"{self._model}(resolved: {', '.join(f'{k}={v!r}' for k, v in self._fields.items())})"


def _to_model(value: Any) -> Any:
    if isinstance(value, ResolvedBlock):
        return value.real_model()
    if isinstance(value, list):
        return [_to_model(item) for item in value]
    if isinstance(value, dict):
        return {key: _to_model(item) for key, item in value.items()}
    return value


class ResolvedConfig(ResolvedBlock):
    """The pipeline config of a resolved file: :class:`.config.PipelineConfig`'s fields, and the two
    accessors every task uses without building the real model."""

    __slots__ = ()

    @property
    def enabled_stages(self) -> list[str]:
        return [name for name in STAGE_NAMES if self._fields.get(name) is not None]

    def stage(self, name: str) -> Any:
        block = self._fields.get(name)
        if block is None:
            raise KeyError(f"stage {name!r} is not enabled in this config")
        return block


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(item) for item in value]
    if isinstance(value, dict):
        if "$path" in value:
            return Path(value["$path"])
        if "$dict" in value:
            return {key: _decode(item) for key, item in value["$dict"].items()}
        fields = {name: _decode(item) for name, item in value["fields"].items()}
        kind = ResolvedConfig if value["$model"] == "PipelineConfig" else ResolvedBlock
        return kind(value["$model"], fields)
    return value


def is_resolved_file(path: str | Path) -> bool:
    """Whether ``path`` is a resolved config (its first bytes say so); False for YAML and unreadable paths."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
    except OSError:
        return False
    return head.lstrip().startswith(b"{") and f'"format": "{FORMAT}"'.encode() in head


def load_resolved(path: str | Path) -> ResolvedConfig:
    """Read a resolved config; :class:`ConfigError` when it is damaged, from another mmprep, or when the
    config it was resolved from has changed since."""
    path = Path(path)
    try:
        body = json.loads(path.read_bytes())
        if body.get("format") != FORMAT or body.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"not a {FORMAT} of version {FORMAT_VERSION}")
        cfg = _decode(body["config"])
        if not isinstance(cfg, ResolvedConfig):
            raise ValueError("it holds no pipeline config")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError([f"{path}: not a readable resolved config ({exc}); write it again with "
                           f"mmprep validate CONFIG --resolved-out {path}"]) from None
    again = f"write it again with mmprep validate {body.get('source') or 'CONFIG'} --resolved-out {path}"
    if body.get("schema") != schema_fingerprint():
        raise ConfigError([f"{path}: resolved by mmprep {body.get('mmprep_version')} with another config schema "
                           f"than this mmprep {__version__}'s; {again}"])
    for file, digest in body.get("read", {}).items():
        if Path(file).is_file() and _file_digest(Path(file)) != digest:
            raise ConfigError([f"{path}: {file} has changed since it was resolved; {again}"])
    return cfg
