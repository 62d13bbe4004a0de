"""Read NeMo's ``download_multimodal.yaml`` (unchanged) and validate it once, up front.

The file is loaded with OmegaConf so NeMo's interpolations keep their meaning (``${..dataset_output_root}``,
launcher-level names such as ``${data_dir}`` supplied as overrides, ``???`` for required values). Each key we
use is resolved on its own, so one bad value yields one error naming its full key path instead of aborting
the whole load; the resolved values are then checked by pydantic models. Keys NeMo files carry that we do
not use produce a warning, never an error. Nothing here imports Airflow.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Literal, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationKeyError, MissingMandatoryValue, OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .storage_config import DataPath, data_path, read_storage_options, url_problems

log = logging.getLogger(__name__)

STAGE_NAMES: tuple[str, ...] = (
    "download_parquet",
    "download_images",
    "reorganize_tar",
    "precache_encodings",
    "generate_wdinfo",
)

#: Folder that plays NeMo's ``launcher_scripts_path`` when the user gives none: it holds the bundled
#: ``conf/data_preparation/multimodal/*.yaml`` so NeMo's default ``precache_config_path`` resolves.
BUNDLED_LAUNCHER_SCRIPTS_PATH = Path(__file__).parent / "launcher_conf"

#: Top-level blocks NeMo files carry that no stage of ours reads (kept, never warned about).
_IGNORED_TOP_LEVEL = {"run", "merge_source_tar", "data_dir", "base_results_dir", "launcher_scripts_path",
                      "override_task_id", "override_task_count", "cluster", "cluster_type", "container",
                      "container_mounts", "env_vars", "defaults", "hydra"}

_RANGE_RE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
#: Task count a ``node_array_size`` range refers to when ``override_task_count`` is not given (NeMo's docs:
#: tasks "50-99" of a run of 100 are resumed with ``override_task_count: 100``).
RANGE_DEFAULT_TASK_COUNT = 100


class ConfigError(Exception):
    """Raised with every problem found; each line names the YAML key path it concerns."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# --------------------------------------------------------------------------------------------------------
# Typed models. NeMo's key names are kept as they are; our additions sit beside them with safe defaults.
# --------------------------------------------------------------------------------------------------------


class _Block(BaseModel):
    model_config = ConfigDict(extra="ignore", validate_default=True)


class TaskSelection(BaseModel):
    """Which task ids of how many to run: NeMo's ``node_array_size`` + ``override_task_*`` resolved."""

    task_ids: list[int]
    task_count: int


def resolve_task_selection(node_array_size: int | str, override_task_id: int | None,
                           override_task_count: int | None) -> TaskSelection:
    """Apply NeMo's meaning: an int N runs tasks 0..N-1 (or only ``override_task_id`` of
    ``override_task_count``); a range "a-b" resumes tasks a..b of the original run's
    ``override_task_count`` (default :data:`RANGE_DEFAULT_TASK_COUNT`, NeMo's example of 100 tasks)."""
    if isinstance(node_array_size, str):
        low, high = (int(x) for x in _RANGE_RE.match(node_array_size).groups())  # validated already
        count = override_task_count if override_task_count is not None else RANGE_DEFAULT_TASK_COUNT
        return TaskSelection(task_ids=list(range(low, high + 1)), task_count=count)
    if override_task_id is not None:
        count = override_task_count if override_task_count is not None else node_array_size
        return TaskSelection(task_ids=[override_task_id], task_count=count)
    count = override_task_count if override_task_count is not None else node_array_size
    return TaskSelection(task_ids=list(range(node_array_size)), task_count=count)


class _FanOutBlock(_Block):
    """A stage NeMo runs as a job array of ``node_array_size`` tasks."""

    node_array_size: Union[int, str] = 1
    override_task_id: int | None = Field(default=None, ge=0)
    override_task_count: int | None = Field(default=None, gt=0)

    @field_validator("node_array_size")
    @classmethod
    def _array_size(cls, value: int | str) -> int | str:
        if isinstance(value, bool):
            raise ValueError("expected a positive integer or a range 'A-B'")
        if isinstance(value, int):
            if value < 1:
                raise ValueError("expected a positive integer or a range 'A-B'")
            return value
        if value.strip().isdigit() and int(value) >= 1:
            return int(value)
        match = _RANGE_RE.match(value)
        if not match or int(match.group(1)) > int(match.group(2)):
            raise ValueError("expected a positive integer or a range 'A-B' with A <= B")
        return value.strip()

    @model_validator(mode="after")
    def _selection_fits(self) -> "_FanOutBlock":
        selection = resolve_task_selection(self.node_array_size, self.override_task_id,
                                           self.override_task_count)
        too_high = [t for t in selection.task_ids if t >= selection.task_count]
        if too_high:
            raise ValueError(
                f"node_array_size/override_task_id select task id {too_high[0]}, outside the task count "
                f"{selection.task_count} (set override_task_count to the size of the original run)")
        return self

    @property
    def task_selection(self) -> TaskSelection:
        return resolve_task_selection(self.node_array_size, self.override_task_id, self.override_task_count)


Runner = Literal["local", "kubernetes"]


class DownloadParquetConfig(_Block):
    enable: bool = True
    output_dir: DataPath
    parquet_subpartitions: int = Field(default=1, gt=0)
    parquet_pattern: str = "*.parquet"
    # ours
    revision: str | None = None
    hf_token: str | None = Field(default=None, repr=False)
    max_workers: int = Field(default=8, gt=0)
    runner: Runner = "local"


class DownloadImagesConfig(_Block):
    enable: bool = True
    parquet_pattern: str = "*.parquet"
    input_dir: DataPath
    output_dir: DataPath
    num_parquets_downloaded: int | None = None  # NeMo's guess; we fan out over the parts present
    download_num_processes: int = -1
    download_num_threads: int = Field(default=64, gt=0)
    img2dataset_additional_arguments: dict[str, Any] = Field(default_factory=dict)
    # ours
    allow_private_addresses: bool = False  # fetch from loopback/private/link-local addresses (tests, demo)
    retry_failed: bool = False  # rerun only transient failures into additional shards
    max_image_bytes: int = Field(default=32 * 1024 * 1024, gt=0)  # per-image body size cap
    max_image_pixels: int = Field(default=89_478_485, gt=0)  # decompression-bomb limit, checked from the header
    max_redirects: int = Field(default=5, ge=0)
    max_connections_per_host: int = Field(default=32, gt=0)  # politeness cap per host
    # the task fails when more than this share of its URLs failed (1.0: only when every URL failed)
    max_failed_share: float = Field(default=1.0, ge=0.0, le=1.0)
    runner: Runner = "local"

    @field_validator("download_num_processes")
    @classmethod
    def _processes(cls, value: int) -> int:
        if value == -1 or value >= 1:
            return value
        raise ValueError("expected a positive integer or -1 (all CPUs)")

    @field_validator("img2dataset_additional_arguments", mode="before")
    @classmethod
    def _yaml_no_is_not_false(cls, value: Any) -> Any:
        # YAML 1.1 reads `resize_mode: no` (NeMo's default) as False; img2dataset means the string "no".
        if isinstance(value, dict) and value.get("resize_mode") is False:
            value = {**value, "resize_mode": "no"}
        return value if value is not None else {}


class ReorganizeTarConfig(_FanOutBlock):
    enable: bool = True
    input_dir: DataPath
    output_dir: DataPath
    tar_chunk_size: int = Field(default=1000, gt=0)
    file_ext_in_tar: list[str] = Field(default_factory=lambda: [".jpg", ".txt"])
    # ours
    strict: bool = False
    # ours: output tars written at once by one task (0 = CPU count, at most 8); the bytes do not depend on it
    write_threads: int = Field(default=0, ge=0)
    runner: Runner = "local"


class PrecacheEncodingsConfig(_FanOutBlock):
    enable: bool = True
    input_dir: DataPath
    output_dir: DataPath
    tar_chunk_size: int = Field(default=1000, gt=0)
    precache_config_path: DataPath
    # ours: also encode the short last tar reorganize_tar marks ``.INCOMPLETE`` (left out by default, as
    # NeMo does; when encoded, its output is marked the same way so generate_wdinfo still sees it short)
    process_incomplete_tars: bool = False
    runner: Runner = "kubernetes"


class GenerateWdinfoConfig(_Block):
    enable: bool = True
    input_dir: DataPath
    tar_chunk_size: int = Field(default=1000, gt=0)
    file_ext_in_tar: list[str] = Field(default_factory=lambda: [".pickle"])
    output_wdinfo_path: DataPath


class RunConfig(_Block):
    name: str = "download_multimodal"
    # ours: an Airflow schedule (cron, preset or None) for the generated DAG
    schedule: str | None = None


STAGE_MODELS: dict[str, type[_Block]] = {
    "download_parquet": DownloadParquetConfig,
    "download_images": DownloadImagesConfig,
    "reorganize_tar": ReorganizeTarConfig,
    "precache_encodings": PrecacheEncodingsConfig,
    "generate_wdinfo": GenerateWdinfoConfig,
}


# Precache YAML (precache_sd.yaml style).

class EncoderConfig(BaseModel):
    """``encoder_config``: ``cls`` (a dotted class path) and the kwargs it is built with."""

    model_config = ConfigDict(extra="allow")
    cls: str = Field(min_length=1)

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


ComputeDtype = Literal["auto", "float32", "float16", "bfloat16"]


class EncodingSpec(_Block):
    modality: Literal["image", "text"]
    extension: str = Field(min_length=1)
    key: str = Field(min_length=1)
    precision: Literal[16, 32] = 32
    store_pad_tokens: bool = True
    encoder_config: EncoderConfig
    # ours: this encoder's compute dtype when it must differ from the file-wide ``compute_dtype``
    compute_dtype: ComputeDtype | None = None

    @field_validator("extension")
    @classmethod
    def _no_dot(cls, value: str) -> str:
        return value.lstrip(".")


class PrecacheConfig(_Block):
    batch_size_per_GPU: int = Field(default=32, gt=0)
    dataloader_num_workers: int = Field(default=2, ge=0)
    save_original_in_tar: list[Literal["image", "text"]] = Field(default_factory=list)
    encodings: list[EncodingSpec] = Field(min_length=1)
    lightning: dict[str, Any] = Field(default_factory=dict)
    # ours (NeMo's transform is the default: smallest side to 512 bicubic antialiased, centre crop 512)
    image_size: int = Field(default=512, gt=0)
    image_crop_size: int | None = Field(default=None, gt=0)  # None: image_size
    #: auto: on CUDA from ``lightning.precision`` (16 → float16, bf16 → bfloat16, 32 → float32), on CPU float32
    compute_dtype: ComputeDtype = "auto"
    #: auto: CUDA when available, else CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: encoder processes in one task; None: one per visible GPU (capped by ``lightning.devices``), 1 on CPU
    worker_processes: int | None = Field(default=None, gt=0)
    #: module prefixes trusted for ``encoder_config.cls`` beyond the built-in allow-list
    allowed_encoder_modules: list[str] = Field(default_factory=list)

    @field_validator("save_original_in_tar", mode="before")
    @classmethod
    def _bool_means_both(cls, value: Any) -> Any:
        # NeMo's older files use a bool; true means both originals.
        if value is True:
            return ["image", "text"]
        if value is False or value is None:
            return []
        return value

    @model_validator(mode="after")
    def _unique_keys(self) -> "PrecacheConfig":
        keys = [e.key for e in self.encodings]
        duplicated = sorted({k for k in keys if keys.count(k) > 1})
        if duplicated:
            raise ValueError(f"encoding keys must be unique, repeated: {', '.join(duplicated)}")
        if self.image_crop_size is not None and self.image_crop_size > self.image_size:
            raise ValueError(f"image_crop_size ({self.image_crop_size}) must not exceed image_size "
                             f"({self.image_size})")
        return self

    @property
    def crop_size(self) -> int:
        return self.image_crop_size or self.image_size

    def encoder_problems(self) -> list[str]:
        """One line per ``encoder_config.cls`` outside the allow-list (checked without importing torch)."""
        from .encoders import EncoderRefused, check_allowed, check_kwargs
        problems = []
        for index, spec in enumerate(self.encodings):
            try:
                check_allowed(spec.encoder_config.cls, self.allowed_encoder_modules)
            except EncoderRefused as exc:
                problems.append(f"encodings.{index}.encoder_config.cls: {exc}")
            try:
                check_kwargs(spec.encoder_config.kwargs)
            except EncoderRefused as exc:
                problems.append(f"encodings.{index}.encoder_config.trust_remote_code: {exc}")
        return problems


class PipelineConfig(BaseModel):
    """The validated pipeline: one block per stage (None where the stage is disabled)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    run: RunConfig
    dataset_repo_id: str | None
    dataset_output_root: DataPath | None
    #: our key: fsspec options for URL paths, kept unresolved (``${env:NAME}`` references resolve in storage.py)
    storage_options: dict[str, Any] | None = Field(default=None, repr=False)
    download_parquet: DownloadParquetConfig | None = None
    download_images: DownloadImagesConfig | None = None
    reorganize_tar: ReorganizeTarConfig | None = None
    precache_encodings: PrecacheEncodingsConfig | None = None
    generate_wdinfo: GenerateWdinfoConfig | None = None
    precache: PrecacheConfig | None = None
    source_path: Path | None = None
    warnings: list[str] = Field(default_factory=list)

    @property
    def enabled_stages(self) -> list[str]:
        return [name for name in STAGE_NAMES if getattr(self, name) is not None]

    def stage(self, name: str) -> Any:
        block = getattr(self, name, None)
        if block is None:
            raise KeyError(f"stage {name!r} is not enabled in this config")
        return block


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


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

    def block(self, cfg: DictConfig, key: str) -> Any:
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and node._is_missing():
            self._note_missing(key, key)
            return None
        if isinstance(node, DictConfig):
            return {str(child): self.leaf(node, child, f"{key}.{child}") for child in node.keys()}
        return self.leaf(cfg, key, key)

    def leaf(self, parent: Any, child: Any, path: str) -> Any:
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


def _has(cfg: DictConfig, key: str) -> bool:
    """True if the key is present, even when its value is '???' (where ``key in cfg`` says False)."""
    return cfg._get_node(key) is not None


def load_raw(path: str | Path, overrides: list[str] | None = None) -> DictConfig:
    """Load the YAML and merge dotlist overrides (``key.sub=value``) over it, without resolving."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        parsed = yaml.safe_load(text)
        cfg = OmegaConf.create(text) if isinstance(parsed, dict) else None
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file not found"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a folder, not a config file"]) from None
    except Exception as exc:  # yaml.YAMLError, undecodable bytes and friends: point at the file
        raise ConfigError([f"{path}: not a valid YAML file: {str(exc).splitlines()[0]}"]) from None
    if parsed is None:
        raise ConfigError([f"{path}: the file is empty; expected NeMo's download_multimodal.yaml"])
    if not isinstance(cfg, DictConfig):
        raise ConfigError([f"{path}: expected a mapping at the top level, got {type(parsed).__name__}"])
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
                load_precache: bool = True, stages: list[str] | None = None) -> PipelineConfig:
    """Load, resolve and validate the pipeline config; raise :class:`ConfigError` listing every problem.

    Everything a stage would reject before doing work is checked here, so ``validate``/``plan`` fail
    before anything runs: img2dataset options, the precache YAML and its model paths. ``stages`` names
    the stages that will run in this process: model paths are then errors if precache_encodings is among
    them and skipped if not. ``None`` (validate, plan, Airflow's plan task): errors where precache runs
    locally (``runner: local``), warnings where a pod runs it (its volumes are not visible here).
    """
    raw = load_raw(path, overrides)
    if not any(_has(raw, name) for name in STAGE_NAMES):
        raise ConfigError([f"{path}: no pipeline stage in this file (expected some of {', '.join(STAGE_NAMES)}"
                           "; is it NeMo's download_multimodal.yaml?)"])
    problems: list[str] = []
    warnings: list[str] = []
    resolver = _Resolver()

    unknown_top = sorted(set(raw.keys()) - set(STAGE_NAMES) - {"dataset_repo_id", "dataset_output_root"}
                         - {"storage_options"} - _IGNORED_TOP_LEVEL)
    if unknown_top:
        warnings.append(f"top level: keys not used by mmprep: {', '.join(map(str, unknown_top))}")

    run_block = _Resolver().block(raw, "run") if _has(raw, "run") else {}
    blocks: dict[str, Any] = {}
    enabled: dict[str, bool] = {}
    for name in STAGE_NAMES:
        if not _has(raw, name) or raw[name] is None:
            enabled[name] = False
            continue
        enable_value = resolver.leaf(raw[name], "enable", f"{name}.enable") if _has(raw[name], "enable") \
            else True
        if not isinstance(enable_value, bool):
            if f"{name}.enable" not in resolver.unresolved:
                problems.append(f"{name}.enable: expected true or false, got {_describe(enable_value)}")
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
    problems.extend(url_problems(models))
    storage_options, option_problems, option_warnings = read_storage_options(raw)
    problems.extend(option_problems)
    warnings.extend(option_warnings)

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
            precache = load_precache_config(precache_path, key_prefix="precache_encodings.precache_config_path")
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
    return PipelineConfig(
        run=run_model,
        dataset_repo_id=dataset_repo_id,
        dataset_output_root=data_path(dataset_output_root) if isinstance(dataset_output_root, str) else None,
        storage_options=storage_options,
        precache=precache,
        source_path=Path(path),
        warnings=warnings,
        **models,
    )


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
    from .encoders import NEMO_ALIASES

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
    from .download.options import parse_options
    from .stages import StageError

    try:
        parse_options(block.img2dataset_additional_arguments, threads=block.download_num_threads,
                      processes=block.download_num_processes)
    except StageError as exc:
        return [str(exc)]
    return []


def load_precache_config(path: str | Path, key_prefix: str = "precache") -> PrecacheConfig:
    """Load the precache YAML named by ``precache_config_path``; errors are prefixed with the file name.
    Keys no field reads are warned about, never dropped silently (``batch_size_per_gpu`` is not
    ``batch_size_per_GPU``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{key_prefix}: precache config file not found: {path}"])
    try:
        raw = OmegaConf.load(path)
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
