"""The keys of a pipeline YAML (NeMo's ``download_multimodal.yaml``) and of the precache YAML it names.

Open this file to learn what a key means, its default and what values it takes: one pydantic model per
block. NeMo's key names are kept as they are; our additions (marked "ours") sit beside them with safe
defaults, so a NeMo file needs none of them. How a file becomes these models (OmegaConf interpolation, one
error per key path, warnings for unused keys) is :mod:`.loader`'s business. Nothing here imports Airflow.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from ..configbase import STAGE_NAMES
from ..storage_config import DataPath
from ..task_ids import is_range, parse_span

#: Task count a ``node_array_size`` range refers to when ``override_task_count`` is not given (NeMo's docs:
#: tasks "50-99" of a run of 100 are resumed with ``override_task_count: 100``).
RANGE_DEFAULT_TASK_COUNT = 100


@lru_cache(maxsize=None)
def _adapter(model: type[BaseModel], key: str) -> TypeAdapter[Any]:
    return TypeAdapter(model.model_fields[key].annotation)


# defer_build: a model's validator is built when it first validates, so a task process builds only those of the
# blocks its YAML holds (start-up of every task: building all of them at import cost ~20 ms).
class _Block(BaseModel):
    model_config = ConfigDict(extra="ignore", validate_default=True, defer_build=True)

    @classmethod
    def read_key(cls, key: str, value: Any) -> Any:
        """``value`` as this block reads its key ``key`` (the field's own type check, lax as in a full load),
        for callers that need one key before the whole block can be validated (``enable``, ``runner``).
        Raises pydantic's ``ValidationError``."""
        return _adapter(cls, key).validate_python(value)


class TaskSelection(BaseModel):
    """Which task ids of how many to run: NeMo's ``node_array_size`` + ``override_task_*`` resolved."""

    model_config = ConfigDict(defer_build=True)

    task_ids: list[int]
    task_count: int


def resolve_task_selection(node_array_size: int | str, override_task_id: int | None,
                           override_task_count: int | None) -> TaskSelection:
    """Apply NeMo's meaning: an int N runs tasks 0..N-1 (or only ``override_task_id`` of
    ``override_task_count``); a range "a-b" resumes tasks a..b of the original run's
    ``override_task_count`` (default :data:`RANGE_DEFAULT_TASK_COUNT`, NeMo's example of 100 tasks)."""
    if isinstance(node_array_size, str):
        low, high = parse_span(node_array_size) or (0, -1)  # validated already: a range 'A-B'
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
        span = parse_span(value) if is_range(value) else None
        if span is None or span[0] > span[1]:
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

    model_config = ConfigDict(extra="allow", defer_build=True)
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
        from ..encoders import EncoderRefused, check_allowed, check_kwargs
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

    model_config = ConfigDict(arbitrary_types_allowed=True, defer_build=True)

    run: RunConfig
    dataset_repo_id: str | None
    dataset_output_root: DataPath | None
    #: our key: fsspec options for URL paths, kept unresolved (``${env:NAME}`` references resolve in storage.py)
    storage_options: dict[str, Any] | None = Field(default=None, repr=False)
    #: our key: the Airflow connection whose credentials become storage options where Airflow runs the stage
    #: (read by the Airflow layer only; wins over ``[mmprep] storage_conn_id``)
    storage_conn_id: str | None = None
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
