"""Read NeMo's ``download_multimodal.yaml`` (unchanged) into the models of :mod:`.models`, once, up front.

The file is loaded with OmegaConf so NeMo's interpolations keep their meaning (``${..dataset_output_root}``,
launcher-level names such as ``${data_dir}`` supplied as overrides, ``???`` for required values). Each key we
use is resolved on its own, so one bad value yields one error naming its full key path instead of aborting
the whole load; the resolved values are then checked by the pydantic models. Keys NeMo files carry that we
do not use produce a warning, never an error. Nothing here imports Airflow.

A file (with its overrides) that OmegaConf would read to exactly the values ``yaml.safe_load`` gives (no
interpolation, no ``???``, no alias, merge key or repeated key, no scalar OmegaConf's YAML loader types
otherwise: see :func:`_load_plain`) is used as plain data, without importing OmegaConf (~65 ms of every
task process's start-up); the results, warnings and messages are the same (the tests compare both ways).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from pydantic import ValidationError

from ..configbase import ConfigError
from ..storage import Store, StorageError, is_url, merge_options
from ..storage_config import data_path, read_storage_options
from .models import (RANGE_DEFAULT_TASK_COUNT, STAGE_MODELS, STAGE_NAMES, DownloadImagesConfig, EncodingSpec,
                     PipelineConfig, PrecacheConfig, RunConfig)

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger(__name__)

#: Folder that plays NeMo's ``launcher_scripts_path`` when the user gives none: it holds the bundled
#: ``conf/data_preparation/multimodal/*.yaml`` so NeMo's default ``precache_config_path`` resolves.
BUNDLED_LAUNCHER_SCRIPTS_PATH = Path(__file__).parents[1] / "launcher_conf"

#: Top-level blocks NeMo files carry that no stage of ours reads (kept, never warned about).
_IGNORED_TOP_LEVEL = {"run", "merge_source_tar", "data_dir", "base_results_dir", "launcher_scripts_path",
                      "override_task_id", "override_task_count", "cluster", "cluster_type", "container",
                      "container_mounts", "env_vars", "defaults", "hydra"}


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def format_pydantic_error(prefix: str, error: dict[str, Any]) -> str:
    """One line: ``key.path: expected ..., got ...`` from a pydantic error dict."""
    loc = [str(p) for p in error["loc"] if not (isinstance(p, str) and p.startswith(("function-", "union[")))]
    # union members show up as extra loc entries like 'int' / 'str'; drop type names pydantic adds
    loc = [p for p in loc if p not in {"int", "str", "constrained-str", "bool", "float", "list[str]"}]
    path = ".".join([prefix, *loc]) if prefix else ".".join(loc)
    etype = error["type"]
    ctx = error.get("ctx") or {}
    got = error.get("input")
    if etype == "missing":
        return f"{path}: required key is missing"
    expectations = {
        "int_parsing": "expected an integer", "int_type": "expected an integer",
        "int_from_float": "expected an integer", "bool_parsing": "expected true or false",
        "bool_type": "expected true or false", "string_type": "expected a string",
        "float_parsing": "expected a number", "list_type": "expected a list", "dict_type": "expected a mapping",
        "path_type": "expected a path", "literal_error": f"expected one of {ctx.get('expected', '')}",
        "too_short": "expected a non-empty value", "string_too_short": "expected a non-empty string",
    }
    if etype == "greater_than":
        expected = "expected a positive integer" if ctx.get("gt") == 0 else f"expected a value > {ctx.get('gt')}"
    elif etype == "greater_than_equal":
        expected = f"expected a value >= {ctx.get('ge')}"
    elif etype in {"value_error", "assertion_error"}:
        expected = str(ctx.get("error", error["msg"]))
    else:
        expected = expectations.get(etype, error["msg"][0].lower() + error["msg"][1:])
    if isinstance(got, dict) and etype in {"value_error", "assertion_error"}:
        return f"{path}: {expected}"
    return f"{path}: {expected}, got {_describe(got)}"


class _Resolver:
    """Resolves the keys we use one at a time, collecting one problem per root cause with its key path."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.unresolved: set[str] = set()  # key paths whose value could not be resolved
        self._missing: dict[str, list[str]] = {}  # '???' key -> key paths that interpolate it

    def block(self, cfg: DictConfig | dict[str, Any], key: str) -> Any:
        if isinstance(cfg, dict):  # plain data (_load_plain): nothing to resolve
            node = cfg[key]
            return {str(child): value for child, value in node.items()} if isinstance(node, dict) else node
        from omegaconf import DictConfig

        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and node._is_missing():
            self._note_missing(key, key)
            return None
        if isinstance(node, DictConfig):
            return {str(child): self.leaf(node, child, f"{key}.{child}") for child in node.keys()}
        return self.leaf(cfg, key, key)

    def leaf(self, parent: Any, child: Any, path: str) -> Any:
        if isinstance(parent, dict):  # plain data (_load_plain): nothing to resolve
            return parent[child]
        from omegaconf import DictConfig, ListConfig, OmegaConf
        from omegaconf.errors import InterpolationKeyError, MissingMandatoryValue, OmegaConfBaseException

        try:
            value = parent[child]
            if isinstance(value, (DictConfig, ListConfig)):
                value = OmegaConf.to_container(value, resolve=True)
            return value
        except MissingMandatoryValue as exc:
            missing = re.search(r"Missing mandatory value: ?([\w.\[\]-]+)", str(exc))
            self._note_missing(missing.group(1) if missing else path, path)
        except InterpolationKeyError as exc:
            missing = re.search(r"Interpolation key '([^']+)'", str(exc))
            name = missing.group(1) if missing else "?"
            self.problems.append(f"{path}: interpolation refers to '{name}', which is not set "
                                 f"(pass it as an override: {name}=...)")
        except OmegaConfBaseException as exc:
            missing = re.search(r"Missing mandatory value: ?([\w.\[\]-]+)", str(exc))
            if missing:  # a '???' reached through an interpolation
                self._note_missing(missing.group(1), path)
            else:
                self.problems.append(f"{path}: cannot resolve value: {str(exc).splitlines()[0]}")
        self.unresolved.add(path)
        return None

    def _note_missing(self, missing_key: str, path: str) -> None:
        self._missing.setdefault(missing_key, [])
        if path != missing_key:
            self._missing[missing_key].append(path)

    def all_problems(self) -> list[str]:
        out = []
        for key, users in self._missing.items():
            needed = f"; needed by {', '.join(users[:3])}{f' and {len(users) - 3} more' if len(users) > 3 else ''}" \
                if users else ""
            out.append(f"{key}: required value is missing ('???'); set it in the file or as {key}=...{needed}")
        return out + self.problems


def stage_key(stage: str, key: str, value: Any) -> Any:
    """One key of a stage block read by the block's model, before the block is (``enable``: whether to
    read the rest; ``runner``: what the DAG runs); :class:`ConfigError` naming the key path if refused."""
    try:
        return STAGE_MODELS[stage].read_key(key, value)
    except ValidationError as exc:
        raise ConfigError([format_pydantic_error(f"{stage}.{key}", err) for err in exc.errors()]) from None


def _has(cfg: DictConfig | dict[str, Any], key: str) -> bool:
    """True if the key is present, even when its value is '???' (where ``key in cfg`` says False)."""
    return key in cfg if isinstance(cfg, dict) else cfg._get_node(key) is not None


#: Scalars OmegaConf's YAML loader reads as floats where ``yaml.safe_load`` reads strings (``1e3``, ``1_0.5``):
#: its extra float resolver (omegaconf/_yaml.py), matched against every string of plain data.
_OMEGACONF_FLOAT = re.compile(r"""^(?:
     [-+]?[0-9]+(?:_[0-9]+)*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9]+(?:_[0-9]+)*(?:[eE][-+]?[0-9]+)
    |\.[0-9]+(?:_[0-9]+)*(?:[eE][-+][0-9]+)?
    |[-+]?[0-9]+(?:_[0-9]+)*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)
#: An override key _load_plain applies itself: dotted names, no escapes, brackets or interpolation.
_PLAIN_OVERRIDE_KEY = re.compile(r"[A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*)*")


def _plain_loader() -> type:
    """``yaml.SafeLoader`` (so parsing, values and messages are ``yaml.safe_load``'s) noting in ``plain``
    whether the document holds an alias, a merge key or a key written twice: OmegaConf's loader reads
    those otherwise (limits alias expansion, refuses repeated keys)."""
    import yaml

    class PlainLoader(yaml.SafeLoader):
        plain = True

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                self.plain = False
            return super().compose_node(parent, index)

        def flatten_mapping(self, node: Any) -> None:
            seen = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge" \
                        or key_node.value in seen:
                    self.plain = False
                elif isinstance(key_node, yaml.ScalarNode):
                    seen.add(key_node.value)
            super().flatten_mapping(node)

    return PlainLoader


def _safe_load(text: str) -> tuple[Any, bool]:
    """``yaml.safe_load(text)`` and whether OmegaConf's loader would give the same (see :func:`_plain_loader`)."""
    loader = _plain_loader()(text)
    try:
        return loader.get_single_data(), loader.plain
    finally:
        loader.dispose()


def _is_plain(value: Any) -> bool:
    """Data OmegaConf holds as it is: str keys, scalars OmegaConf's loader types alike, no ``???`` or
    ``${`` (missing values, interpolations), no dates, sets or bytes."""
    if isinstance(value, str):
        return value != "???" and "${" not in value and not _OMEGACONF_FLOAT.match(value)
    if value is None or isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, list):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(k) and _is_plain(v) for k, v in value.items())
    return False


def _override_plain(data: dict[str, Any], item: str) -> bool:
    """Apply one ``key.sub=value`` override to plain data as OmegaConf's merge would; False (``data``
    possibly changed) where only OmegaConf can say what it means."""
    key, _, text = item.partition("=")
    if not _PLAIN_OVERRIDE_KEY.fullmatch(key):
        return False
    try:
        value, plain = _safe_load(text)
    except Exception:  # a glob such as *.parquet: load_raw's own handling
        return False
    if not plain or isinstance(value, dict) or not _is_plain(value):
        return False
    *parents, last = key.split(".")
    node = data
    for name in parents:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            return False
        node = child
    if last in node:  # a scalar replaces a scalar (or None), a list a list; anything else is OmegaConf's
        old = node[last]
        if isinstance(old, dict) or isinstance(old, list) != isinstance(value, list) \
                or (old is None and isinstance(value, list)):
            return False
    node[last] = value
    return True


def _read_yaml(path: Path) -> tuple[str, dict[str, Any], bool]:
    """The file's text, its top-level mapping as ``yaml.safe_load`` reads it, and whether OmegaConf's loader
    would read it alike (:func:`_safe_load`); a :class:`ConfigError` naming the file where it cannot be a
    pipeline config. Read once per load: the plain reading and OmegaConf's both start from it."""
    try:
        text = path.read_text(encoding="utf-8")
        parsed, plain = _safe_load(text)
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file not found"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a folder, not a config file"]) from None
    except Exception as exc:  # yaml.YAMLError, undecodable bytes and friends: point at the file
        raise ConfigError([f"{path}: not a valid YAML file: {str(exc).splitlines()[0]}"]) from None
    if parsed is None:
        raise ConfigError([f"{path}: the file is empty; expected NeMo's download_multimodal.yaml"])
    if not isinstance(parsed, dict):
        raise ConfigError([f"{path}: expected a mapping at the top level, got {type(parsed).__name__}"])
    return text, parsed, plain


def _load_plain(parsed: dict[str, Any], plain: bool, overrides: list[str] | None) -> dict[str, Any] | None:
    """The YAML (``parsed``, changed in place) with its overrides as plain data when OmegaConf
    (:func:`load_raw`) would hold exactly these values: no interpolation or ``???``, no alias, merge or
    repeated key, no scalar its loader types otherwise (``1e3``, dates), no override it alone can apply.
    None otherwise (and for every override :func:`load_raw` refuses, so that its messages stay the only
    ones)."""
    if not plain or not _is_plain(parsed):
        return None
    for item in overrides or []:
        if "=" not in item or not _override_plain(parsed, item):
            return None
    if any(parsed.get(name) is not None and not isinstance(parsed[name], dict)
           for name in (*STAGE_NAMES, "storage_options")):
        return None  # read through OmegaConf's nodes as load_config always did
    parsed.setdefault("launcher_scripts_path", str(BUNDLED_LAUNCHER_SCRIPTS_PATH))
    return parsed


def load_raw(path: str | Path, overrides: list[str] | None = None, *, text: str | None = None) -> DictConfig:
    """Load the YAML and merge dotlist overrides (``key.sub=value``) over it, without resolving. ``text``:
    the file as :func:`_read_yaml` already read and checked it (else it is read here)."""
    from omegaconf import OmegaConf

    path = Path(path)
    if text is None:
        text = _read_yaml(path)[0]
    try:
        cfg = OmegaConf.create(text)
    except Exception as exc:  # what OmegaConf's loader alone refuses (a repeated key): point at the file
        raise ConfigError([f"{path}: not a valid YAML file: {str(exc).splitlines()[0]}"]) from None
    defaults = OmegaConf.create({"launcher_scripts_path": str(BUNDLED_LAUNCHER_SCRIPTS_PATH)})
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError([f"overrides: expected key=value, got {item!r}"])
    override_cfg = OmegaConf.create({})
    for item in overrides or []:
        try:
            override_cfg = OmegaConf.merge(override_cfg, OmegaConf.from_dotlist([item]))
        except Exception as exc:
            key, _, value = item.partition("=")
            if not value.startswith(("*", "&", "!")):  # YAML would read these as alias/anchor/tag
                raise ConfigError([f"overrides: cannot parse {item!r}: {str(exc).splitlines()[0]}"]) from None
            # a glob such as parquet_pattern=*.parquet: YAML reads a leading '*' as an alias; it is meant
            # as a plain string
            OmegaConf.update(override_cfg, key, value, merge=True)
    OmegaConf.set_struct(cfg, False)
    return OmegaConf.merge(defaults, cfg, override_cfg)


def load_config(path: str | Path, overrides: list[str] | None = None, *,
                load_precache: bool = True, stages: list[str] | None = None,
                connection_options: Mapping[str, Any] | None = None) -> PipelineConfig:
    """Load, resolve and validate the pipeline config; raise :class:`ConfigError` listing every problem.

    Everything a stage would reject before doing work is checked here, so ``validate``/``plan`` fail
    before anything runs: img2dataset options, the precache YAML and its model paths. ``stages`` names
    the stages that will run in this process: model paths are then errors if precache_encodings is among
    them and skipped if not. ``None`` (validate, plan, Airflow's plan task): errors where precache runs
    locally (``runner: local``), warnings where a pod runs it (its volumes are not visible here).
    ``connection_options``: flat fsspec options from the deployment (in Airflow, the storage connection's),
    under the YAML's ``storage_options`` (:func:`storage.merge_options`); they reach the stages through
    ``PipelineConfig.storage_options`` and are never written anywhere.
    """
    text, parsed, plain = _read_yaml(Path(path))
    raw = _load_plain(parsed, plain, overrides)
    if raw is None:
        raw = load_raw(path, overrides, text=text)
    if not any(_has(raw, name) for name in STAGE_NAMES):
        raise ConfigError([f"{path}: no pipeline stage in this file (expected some of {', '.join(STAGE_NAMES)}"
                           "; is it NeMo's download_multimodal.yaml?)"])
    problems: list[str] = []
    warnings: list[str] = []
    resolver = _Resolver()

    unknown_top = sorted(set(raw.keys()) - set(STAGE_NAMES) - {"dataset_repo_id", "dataset_output_root"}
                         - {"storage_options", "storage_conn_id"} - _IGNORED_TOP_LEVEL)
    if unknown_top:
        warnings.append(f"top level: keys not used by mmprep: {', '.join(map(str, unknown_top))}")

    run_block = _Resolver().block(raw, "run") if _has(raw, "run") else {}
    blocks: dict[str, Any] = {}
    enabled: dict[str, bool] = {}
    for name in STAGE_NAMES:
        if not _has(raw, name) or raw[name] is None:
            enabled[name] = False
            continue
        enable_value = True
        if _has(raw[name], "enable"):
            enable_value = resolver.leaf(raw[name], "enable", f"{name}.enable")
            if f"{name}.enable" in resolver.unresolved:
                enabled[name] = False
                continue
            try:
                enable_value = stage_key(name, "enable", enable_value)
            except ConfigError as exc:
                problems.extend(exc.problems)
                enabled[name] = False
                continue
        enabled[name] = enable_value
        if enable_value:
            blocks[name] = resolver.block(raw, name)

    dataset_repo_id = None
    if enabled.get("download_parquet"):
        dataset_repo_id = resolver.leaf(raw, "dataset_repo_id", "dataset_repo_id") \
            if _has(raw, "dataset_repo_id") else None
        if dataset_repo_id is None and not _has(raw, "dataset_repo_id"):
            problems.append("dataset_repo_id: required when download_parquet is enabled")
        elif dataset_repo_id is not None and (not isinstance(dataset_repo_id, str)
                                              or not re.match(r"^[\w.-]+(/[\w.-]+)?$", dataset_repo_id)):
            problems.append(f"dataset_repo_id: expected 'org/name', got {_describe(dataset_repo_id)}")
            dataset_repo_id = None
    dataset_output_root = None
    if _has(raw, "dataset_output_root"):
        # only a problem where a used key interpolates it, and reported there
        dataset_output_root = _Resolver().leaf(raw, "dataset_output_root", "dataset_output_root")

    models: dict[str, Any] = {}
    for name, block in blocks.items():
        if block is None:
            continue
        if not isinstance(block, dict):
            problems.append(f"{name}: expected a mapping, got {_describe(block)}")
            continue
        model = STAGE_MODELS[name]
        unknown = sorted(set(block) - set(model.model_fields))
        if unknown:
            warnings.append(f"{name}: keys not used by mmprep: {', '.join(unknown)}")
        # keys that failed to resolve are already reported; let their defaults (if any) stand in
        present = {k: v for k, v in block.items() if f"{name}.{k}" not in resolver.unresolved}
        try:
            models[name] = model.model_validate(present)
        except ValidationError as exc:
            problems.extend(format_pydantic_error(name, err) for err in exc.errors()
                            if f"{name}.{err['loc'][0] if err['loc'] else ''}" not in resolver.unresolved)

    for name in ("reorganize_tar", "precache_encodings"):
        block = models.get(name)
        if block is not None and isinstance(block.node_array_size, str) and block.override_task_count is None:
            warnings.append(f"{name}.node_array_size: range {block.node_array_size!r} without override_task_count:"
                            f" taken as tasks of a run of {RANGE_DEFAULT_TASK_COUNT} (NeMo's example); set "
                            f"{name}.override_task_count to the task count of the run you resume")
    if "download_images" in models:
        problems.extend(download_option_problems(models["download_images"]))
    storage_options, option_problems, option_warnings = read_storage_options(raw)
    problems.extend(option_problems)
    warnings.extend(option_warnings)
    urls = [str(getattr(block, key)) for block in models.values() for key in _PATH_KEYS
            if is_url(str(getattr(block, key, "") or ""))]
    storage_options = merge_options(connection_options, storage_options, urls)
    storage_conn_id = None
    if _has(raw, "storage_conn_id"):
        storage_conn_id = resolver.leaf(raw, "storage_conn_id", "storage_conn_id")
        if storage_conn_id is not None and (not isinstance(storage_conn_id, str)
                                            or not re.match(r"^[\w.-]*$", storage_conn_id)):
            problems.append(f"storage_conn_id: expected an Airflow connection id, got {_describe(storage_conn_id)}")
            storage_conn_id = None

    run_model = RunConfig()
    if isinstance(run_block, dict):
        try:
            run_model = RunConfig.model_validate(run_block)
        except ValidationError as exc:
            problems.extend(format_pydantic_error("run", err) for err in exc.errors())

    precache = None
    if load_precache and "precache_encodings" in models:
        precache_path = models["precache_encodings"].precache_config_path
        try:
            precache = load_precache_config(precache_path, key_prefix="precache_encodings.precache_config_path",
                                            storage_options=storage_options)
        except ConfigError as exc:
            problems.extend(exc.problems)
        if precache is not None and (stages is None or "precache_encodings" in stages):
            placeholders, missing = model_path_problems(precache)
            problems.extend(f"{precache_path}: {line}" for line in placeholders)
            # a local runner loads the weights on this machine; a pod may mount them where we cannot look
            if models["precache_encodings"].runner == "local" or stages is not None:
                problems.extend(f"{precache_path}: {line}" for line in missing)
            else:
                warnings.extend(f"{precache_path}: {line} (checked again in the pod)" for line in missing)

    problems = resolver.all_problems() + problems
    for warning in warnings:
        log.warning("%s", warning)
    if problems:
        raise ConfigError(problems)
    fields = dict(
        run=run_model,
        dataset_repo_id=dataset_repo_id,
        dataset_output_root=data_path(dataset_output_root) if isinstance(dataset_output_root, str) else None,
        storage_options=storage_options,
        storage_conn_id=storage_conn_id or None,
        precache=precache,
        source_path=Path(path),
        warnings=warnings,
        **models,
    )
    if storage_options is None or all(isinstance(key, str) for key in storage_options):
        # Every field is validated above (the blocks are models): validating them again would change nothing
        # and would build the validators of every stage's model, which a task process never uses.
        return PipelineConfig.model_construct(**fields)  # type: ignore[arg-type]
    return PipelineConfig(**fields)  # type: ignore[arg-type]


#: the keys of stage blocks that name a folder or file, local or a URL
_PATH_KEYS = ("input_dir", "output_dir", "output_wdinfo_path", "precache_config_path")
#: encoder_config kwargs that name model weights, for the encoders we build (NeMo's names and ours)
_MODEL_PATH_KWARGS = ("from_pretrained", "version", "encoder_path")
_PLACEHOLDER_RE = re.compile(r"(^|/)path/to(/|$)|<[^>]*>|^\?\?\?$|^(TODO|CHANGEME|REPLACE)", re.IGNORECASE)


def precache_unknown_keys(data: dict[str, Any]) -> list[str]:
    """Key paths of a precache YAML that no model field reads (warned about, like the main YAML's)."""
    unknown = [str(k) for k in data if k not in PrecacheConfig.model_fields]
    for index, spec in enumerate(data.get("encodings") or []):
        if isinstance(spec, dict):
            unknown += [f"encodings.{index}.{k}" for k in spec if k not in EncodingSpec.model_fields]
    return unknown


def model_path_problems(precache: PrecacheConfig) -> tuple[list[str], list[str]]:
    """(placeholders, missing): model paths of the built-in encoders that are template placeholders
    (``/path/to/vae.bin``), and those naming nothing on this machine (a hub id, a folder not mounted here).

    mmprep fetches no weights, so both fail at precache time; a placeholder can never work, a missing path
    may exist where the stage runs (a pod's volume), so callers decide how loud to be about it.
    """
    from ..encoders import NEMO_ALIASES

    placeholders, missing = [], []
    for index, spec in enumerate(precache.encodings):
        cls = NEMO_ALIASES.get(spec.encoder_config.cls, spec.encoder_config.cls)
        if not cls.startswith("airflow_provider_mmprep."):
            continue  # a class of the user's own: its kwargs mean what it says
        for name in _MODEL_PATH_KWARGS:
            value = spec.encoder_config.kwargs.get(name)
            if not isinstance(value, str) or not value:
                continue
            key = f"encodings.{index}.encoder_config.{name}"
            if _PLACEHOLDER_RE.search(value):
                placeholders.append(f"{key}: {value!r} is a placeholder; set the local folder (or file) of "
                                    "the weights")
            elif not Path(value).exists():
                kind = "a hub id, not a local path" if "/" in value and not value.startswith(("/", ".")) \
                    else "not found on this machine"
                missing.append(f"{key}: {value!r} is {kind}; mmprep downloads no weights, give the local "
                               "folder (or file) holding them")
    return placeholders, missing


def download_option_problems(block: DownloadImagesConfig) -> list[str]:
    """The img2dataset option problem download_images would fail on, found now (same message)."""
    from ..download.options import parse_options
    from ..stages import StageError

    try:
        parse_options(block.img2dataset_additional_arguments, threads=block.download_num_threads,
                      processes=block.download_num_processes)
    except StageError as exc:
        return [str(exc)]
    return []


def _read_precache_yaml(path: str | Path, key_prefix: str, storage_options: Mapping[str, Any] | None) -> str:
    """The precache YAML's text, from a local file or a URL (through :class:`storage.Store`)."""
    if not is_url(str(path)):
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"{key_prefix}: precache config file not found: {path}"])
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([f"{key_prefix}: cannot read {path}: {str(exc).splitlines()[0]}"]) from None
    folder, _, name = str(path).rstrip("/").rpartition("/")
    try:
        data = Store(folder, storage_options, key_path="storage_options").read_bytes(name)
    except FileNotFoundError:
        raise ConfigError([f"{key_prefix}: precache config file not found: {path}"]) from None
    except StorageError as exc:  # credentials, bucket, endpoint: the Store's one line names the URL
        raise ConfigError([f"{key_prefix}: {exc}"]) from None
    except OSError as exc:
        raise ConfigError([f"{key_prefix}: cannot read {path}: {str(exc).splitlines()[0]}"]) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{key_prefix}: cannot read {path}: {exc}"]) from None


def load_precache_config(path: str | Path, key_prefix: str = "precache",
                         storage_options: Mapping[str, Any] | None = None) -> PrecacheConfig:
    """Load the precache YAML named by ``precache_config_path`` (a local path or a URL read with the
    pipeline's ``storage_options``); errors name the key and the file. Keys no field reads are warned about,
    never dropped silently (``batch_size_per_gpu`` is not ``batch_size_per_GPU``)."""
    text = _read_precache_yaml(path, key_prefix, storage_options)
    path = str(path) if is_url(str(path)) else Path(path)
    from omegaconf import OmegaConf

    try:
        raw = OmegaConf.create(text)
        data = OmegaConf.to_container(raw, resolve=True)
    except Exception as exc:
        raise ConfigError([f"{key_prefix}: cannot read {path}: {str(exc).splitlines()[0]}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{key_prefix}: {path} must hold a mapping"])
    unknown = precache_unknown_keys(data)
    if unknown:
        log.warning("%s: keys not used by mmprep: %s", path, ", ".join(unknown))
    try:
        precache = PrecacheConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([f"{path}: " + format_pydantic_error("", err) for err in exc.errors()]) from None
    refused = precache.encoder_problems()
    if refused:
        raise ConfigError([f"{path}: {line}" for line in refused])
    return precache
