"""img2dataset's option names, read from ``download_images.img2dataset_additional_arguments`` and checked once.

Users bring option dicts written for img2dataset; each known name keeps img2dataset's meaning and default, a
name we do not know is reported in a warning that names it (never silently dropped), and a bad value is a
:class:`~airflow_provider_mmprep.stages.StageError` naming its full YAML key path.

One deliberate difference: ``skip_reencode`` unset means *keep an image's original bytes when nothing about
it has to change* (same format, no resize, no EXIF rotation, no alpha). img2dataset re-encodes such images,
which only loses quality and costs CPU; ``skip_reencode: false`` given explicitly restores that behaviour.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

KEY_PREFIX = "download_images.img2dataset_additional_arguments"
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
ENCODE_FORMATS = ("jpg", "png", "webp")
INPUT_FORMATS = ("parquet", "csv", "tsv", "json", "jsonl", "csv.gz", "tsv.gz", "json.gz", "jsonl.gz", "txt",
                 "txt.gz")
DEFAULT_DISALLOWED = ("noai", "noimageai", "noindex", "noimageindex")

#: img2dataset options that make no sense here (we always write WebDataset shards to ``output_dir``, with the
#: parallelism NeMo's keys give): accepted with a warning saying why they are ignored.
_IGNORED_IMG2DATASET = {
    "url_list": "the input is download_images.input_dir",
    "output_folder": "the output is download_images.output_dir",
    "processes_count": "use download_images.download_num_processes",
    "thread_count": "use download_images.download_num_threads",
    "output_format": "mmprep always writes webdataset shards",
    "enable_wandb": "not supported", "wandb_project": "not supported",
    "distributor": "tasks are distributed by the runner", "subjob_size": "not used",
    "oom_shard_count": "shard names are always 5 digits", "extract_exif": "not supported",
    "bbox_col": "blurring is not supported", "verify_hash": "not supported",
    "upscale_interpolation": "lanczos is used", "downscale_interpolation": "area averaging is used",
    "disable_all_reencoding": "use skip_reencode", "max_shard_retry": "use retry_failed",
    "timeout_s": "use timeout", "min_image_area": "not an img2dataset option",
}


@dataclass(frozen=True)
class DownloadOptions:
    """Everything a worker needs to fetch, check, transform and write one shard."""

    url_col: str = "URL"
    caption_col: str | None = "TEXT"
    input_format: str = "parquet"
    save_additional_columns: tuple[str, ...] = ()
    resize_mode: str = "no"
    image_size: int = 256
    resize_only_if_bigger: bool = False
    encode_format: str = "jpg"
    encode_quality: int = 95
    skip_reencode: bool | None = None  # None: keep unchanged images' bytes (see module doc)
    min_image_size: int = 0
    max_image_area: float = float("inf")
    max_aspect_ratio: float = float("inf")
    number_sample_per_shard: int = 10_000
    timeout: float = 10.0
    retries: int = 0
    user_agent_token: str | None = None
    disallowed_header_directives: tuple[str, ...] = DEFAULT_DISALLOWED
    compute_hash: str | None = "sha256"
    # ours (download_images.* keys, not img2dataset's)
    threads: int = 64  # fetches in flight per worker process
    processes: int = 1
    image_threads: int = 2  # Pillow work per worker process (it releases the GIL, so these run in parallel)
    allow_private_addresses: bool = False
    max_image_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 89_478_485
    max_redirects: int = 5
    max_connections_per_host: int = 32
    #: img2dataset's incremental_mode: "incremental" skips complete shards made with the same options,
    #: "overwrite" redoes the whole part on every run
    incremental_mode: str = "incremental"
    # Prepended to every key: the part's index, so keys stay unique across the parts of a dataset (each
    # part restarts img2dataset's shard numbering, and reorganize_tar merges all parts into one order).
    key_prefix: str = ""
    # Not an option of the YAML: where finished shards go when output_dir is a URL (set by the stage; the
    # shard's pieces are written to a local spool folder, then uploaded by :func:`.shard.publish_pieces`).
    publish_to: str | None = field(default=None, compare=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def shaping(self) -> dict[str, Any]:
        """The options that decide a shard's content: which URLs are refused, how images are checked and
        transformed, the layout. A complete shard made with other values is stale and redone. Left out:
        parallelism, politeness and timeouts/retries (they change only which fetches fail transiently,
        which ``retry_failed`` handles)."""
        names = ("url_col", "caption_col", "input_format", "save_additional_columns", "resize_mode", "image_size",
                 "resize_only_if_bigger", "encode_format", "encode_quality", "skip_reencode", "min_image_size",
                 "max_image_area", "max_aspect_ratio", "number_sample_per_shard", "disallowed_header_directives",
                 "compute_hash", "allow_private_addresses", "max_image_bytes", "max_image_pixels",
                 "max_redirects", "key_prefix")
        body = {}
        for name in names:
            value = getattr(self, name)
            body[name] = list(value) if isinstance(value, tuple) else \
                str(value) if isinstance(value, float) and value == float("inf") else value
        return body

    def fingerprint(self) -> str:
        """Short hash of :meth:`shaping`, recorded in each shard's stats and manifest."""
        return hashlib.sha256(json.dumps(self.shaping(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def extension(self) -> str:
        return self.encode_format

    @property
    def user_agent(self) -> str:
        from .. import __version__ as version  # noqa: PLC0415 - avoid a cycle at import time

        token = f"; {self.user_agent_token}" if self.user_agent_token else ""
        return (f"mmprep/{version} (airflow-provider-mmprep image downloader; compatible img2dataset"
                f"{token}; honours X-Robots-Tag)")


def _fail(name: str, message: str) -> None:
    from ..stages import StageError  # noqa: PLC0415

    raise StageError(f"{KEY_PREFIX}.{name}: {message}")


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    _fail(name, f"expected true or false, got {value!r}")
    raise AssertionError


def _as_number(name: str, value: Any, kind: type, minimum: float | None = None) -> Any:
    if isinstance(value, bool) or value is None:
        _fail(name, f"expected a number, got {value!r}")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        _fail(name, f"expected a number, got {value!r}")
        raise AssertionError from None
    if kind is int and float(value) != number:
        _fail(name, f"expected an integer, got {value!r}")
    if minimum is not None and number < minimum:
        _fail(name, f"must be at least {minimum}, got {value!r}")
    return number


def _as_str_list(name: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [v.strip() for v in value.strip("[]").split(",") if v.strip().strip("'\"")]
        value = [v.strip("'\"") for v in value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        _fail(name, f"expected a list of strings, got {value!r}")
    return tuple(value)


def parse_options(arguments: dict[str, Any] | None, *, threads: int = 64, processes: int = -1,
                  allow_private_addresses: bool = False, **ours: Any) -> DownloadOptions:
    """Validate img2dataset options (plus our parallelism/safety keys); warn about names we do not use."""
    args = dict(arguments or {})
    values: dict[str, Any] = {}
    warnings: list[str] = []

    def take(name: str) -> Any:
        return args.pop(name)

    if "url_col" in args:
        values["url_col"] = str(take("url_col"))
    if "caption_col" in args:
        caption = take("caption_col")
        values["caption_col"] = None if caption in (None, "", False) else str(caption)
    if "input_format" in args:
        fmt = str(take("input_format")).lower()
        if fmt not in INPUT_FORMATS:
            _fail("input_format", f"expected one of {', '.join(INPUT_FORMATS)}, got {fmt!r}")
        values["input_format"] = fmt
    if "save_additional_columns" in args:
        values["save_additional_columns"] = _as_str_list("save_additional_columns", take("save_additional_columns"))
    if "resize_mode" in args:
        mode = take("resize_mode")
        mode = "no" if mode is False or mode is None else str(mode)
        if mode not in RESIZE_MODES:
            _fail("resize_mode", f"expected one of {', '.join(RESIZE_MODES)}, got {mode!r}")
        values["resize_mode"] = mode
    if "image_size" in args:
        values["image_size"] = _as_number("image_size", take("image_size"), int, 1)
    if "resize_only_if_bigger" in args:
        values["resize_only_if_bigger"] = _as_bool("resize_only_if_bigger", take("resize_only_if_bigger"))
    if "encode_format" in args:
        fmt = str(take("encode_format")).lower()
        fmt = "jpg" if fmt == "jpeg" else fmt
        if fmt not in ENCODE_FORMATS:
            _fail("encode_format", f"expected one of {', '.join(ENCODE_FORMATS)}, got {fmt!r}")
        values["encode_format"] = fmt
    if "encode_quality" in args:
        values["encode_quality"] = _as_number("encode_quality", take("encode_quality"), int, 0)
    fmt = values.get("encode_format", "jpg")
    quality = values.get("encode_quality", 95 if fmt != "png" else 9)
    values["encode_quality"] = quality
    if fmt == "png" and not 0 <= quality <= 9:
        _fail("encode_quality", f"for png it is the compression level 0-9, got {quality}")
    if fmt != "png" and not 0 <= quality <= 100:
        _fail("encode_quality", f"expected 0-100, got {quality}")
    if "skip_reencode" in args:
        values["skip_reencode"] = _as_bool("skip_reencode", take("skip_reencode"))
    if "min_image_size" in args:
        values["min_image_size"] = _as_number("min_image_size", take("min_image_size"), int, 0)
    for name in ("max_image_area", "max_aspect_ratio"):
        if name in args:
            raw = take(name)
            values[name] = float("inf") if raw in (None, "inf") else _as_number(name, raw, float, 0)
    if "number_sample_per_shard" in args:
        values["number_sample_per_shard"] = _as_number("number_sample_per_shard", take("number_sample_per_shard"),
                                                       int, 1)
    if "timeout" in args:
        values["timeout"] = _as_number("timeout", take("timeout"), float, 0.001)
    if "retries" in args:
        values["retries"] = _as_number("retries", take("retries"), int, 0)
    if "user_agent_token" in args:
        token = take("user_agent_token")
        values["user_agent_token"] = None if token in (None, "") else str(token)
    if "disallowed_header_directives" in args:
        values["disallowed_header_directives"] = tuple(
            d.lower() for d in _as_str_list("disallowed_header_directives", take("disallowed_header_directives")))
    if "incremental_mode" in args:
        mode = str(take("incremental_mode")).lower()
        if mode not in ("incremental", "overwrite"):
            _fail("incremental_mode", f"expected incremental or overwrite, got {mode!r}")
        values["incremental_mode"] = mode
    if "compute_hash" in args:
        algorithm = take("compute_hash")
        if algorithm in (None, "", False, "none", "None"):
            values["compute_hash"] = None
        elif str(algorithm) not in hashlib.algorithms_available:
            _fail("compute_hash", f"unknown hash {algorithm!r} (e.g. sha256, md5, sha512)")
        else:
            values["compute_hash"] = str(algorithm)

    for name in sorted(args):
        if name in _IGNORED_IMG2DATASET:
            warnings.append(f"{KEY_PREFIX}.{name}: ignored ({_IGNORED_IMG2DATASET[name]})")
        else:
            warnings.append(f"{KEY_PREFIX}.{name}: unknown option, ignored")
    for warning in warnings:
        log.warning("%s", warning)

    cpus = os.cpu_count() or 1
    values["processes"] = cpus if processes == -1 else max(1, int(processes))
    values["threads"] = max(1, int(threads))
    values["allow_private_addresses"] = bool(allow_private_addresses)
    values.update({k: v for k, v in ours.items() if v is not None})
    return DownloadOptions(**values, warnings=tuple(warnings))
