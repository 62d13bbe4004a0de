"""The pipeline YAML's object-storage keys (issue 17), kept apart from config.py's models and loader.

``DataPath`` types every path key: a URL (``s3://…``) stays a string, since a ``Path`` would fold its
``//``; anything else becomes a local ``Path``. Every path key of every stage takes a URL (issue 17).
:func:`read_storage_options` reads the ``storage_options`` block as written: ``${env:NAME}`` references stay
unresolved until :mod:`.storage` makes the filesystem where the stage runs, so no secret enters the config
object, the plan or a pod's arguments.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Union

from pydantic import PlainValidator

from .storage import is_url

if TYPE_CHECKING:
    from omegaconf import DictConfig

#: storage_options keys whose values are secrets: they must reference the environment, never be literal
_SECRET_OPTION_RE = re.compile(r"secret|token|password|credential|account_key|sas", re.IGNORECASE)


def data_path(value: Any) -> Path | str:
    """A folder or file of the dataset: a URL stays a string, anything else is a local Path."""
    if isinstance(value, str) and is_url(value):
        return value
    if isinstance(value, (str, Path)) and str(value):
        return Path(value)
    raise ValueError("expected a path or a URL (s3://bucket/prefix)")


#: A path or URL key of the pipeline YAML.
DataPath = Annotated[Union[Path, str], PlainValidator(data_path)]


def read_storage_options(raw: DictConfig | dict[str, Any]) -> tuple[dict[str, Any] | None, list[str], list[str]]:
    """The ``storage_options`` block as written (interpolations kept), with problems and warnings about it.
    ``raw`` may be plain data (config.loader._load_plain), where the block is None or a mapping."""
    if isinstance(raw, dict):
        options = raw.get("storage_options")
        if options is None:
            return None, [], []
    else:
        from omegaconf import DictConfig, OmegaConf

        node = raw._get_node("storage_options")
        if node is None or node._is_none():
            return None, [], []
        if not isinstance(node, DictConfig):
            shown = repr(node._value())
            return None, [f"storage_options: expected a mapping of fsspec options, got {shown[:80]}"], []
        options = OmegaConf.to_container(node, resolve=False)
    warnings: list[str] = []

    def scan(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                scan(item, f"{path}.{key}")
        elif isinstance(value, str) and value and "${" not in value \
                and _SECRET_OPTION_RE.search(path.rsplit(".", 1)[-1]):
            warnings.append(f"{path}: a literal secret in the pipeline YAML; reference an environment variable "
                            "instead (${env:NAME}), filled from a Kubernetes secret or the worker's environment")

    scan(options, "storage_options")
    return options, [], warnings  # type: ignore[return-value]
