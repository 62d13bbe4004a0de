"""Frozen encoders for precache_encodings: the class allow-list, NeMo class-path aliases, and construction.

This module imports no torch so that config validation (which checks ``encoder_config.cls`` against the
allow-list) works on a core install; the built-in encoders live in submodules that import torch,
diffusers and transformers (the ``precache`` extra) when they are loaded.

Why an allow-list: ``cls`` is a dotted path the YAML names and we import and call it, so a config file
would otherwise be able to run any callable in the worker image (``os.system``). Only module prefixes that
hold encoders are admitted; a deployment can add its own with the precache YAML key
``allowed_encoder_modules`` (ours).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Iterable

log = logging.getLogger(__name__)

_OURS = "airflow_provider_mmprep.encoders."

#: Module prefixes whose classes may be named by ``encoder_config.cls``.
DEFAULT_ALLOWED_PREFIXES: tuple[str, ...] = (
    "airflow_provider_mmprep.",
    "nemo.collections.",
    "diffusers.",
    "transformers.",
    "open_clip.",
    "torch.nn.",
)

#: NeMo class paths found in NeMo's precache YAMLs → our equivalents. Current NeMo releases no longer
#: ship these classes, so existing YAMLs keep working by resolving them here (kwargs are honoured).
NEMO_ALIASES: dict[str, str] = {
    "nemo.collections.multimodal.models.text_to_image.stable_diffusion.ldm.autoencoder.AutoencoderKL":
        _OURS + "autoencoder_kl.AutoencoderKLImageEncoder",
    "nemo.collections.multimodal.models.stable_diffusion.ldm.autoencoder.AutoencoderKL":
        _OURS + "autoencoder_kl.AutoencoderKLImageEncoder",
    "nemo.collections.multimodal.modules.stable_diffusion.encoders.modules.FrozenCLIPEmbedder":
        _OURS + "text.CLIPTextEncoder",
    "nemo.collections.multimodal.modules.imagen.encoder.t5encoder.T5Encoder":
        _OURS + "text.T5TextEncoder",
}


class EncoderRefused(ValueError):
    """``cls`` is outside the allow-list or cannot be imported."""


def allowed_prefixes(extra: Iterable[str] = ()) -> tuple[str, ...]:
    return DEFAULT_ALLOWED_PREFIXES + tuple(p for p in extra if p)


def check_allowed(cls_path: str, extra: Iterable[str] = ()) -> None:
    """Raise :class:`EncoderRefused` unless ``cls_path`` starts with an allowed module prefix."""
    prefixes = allowed_prefixes(extra)
    if "." not in cls_path or not any(cls_path.startswith(p) for p in prefixes):
        raise EncoderRefused(
            f"{cls_path!r} is not in an allowed module ({', '.join(prefixes)}); to trust another module add "
            f"its prefix to allowed_encoder_modules in the precache YAML")


def check_kwargs(kwargs: dict[str, Any]) -> None:
    """Refuse ``trust_remote_code``: it would run code fetched with the weights, defeating the allow-list."""
    if kwargs.get("trust_remote_code"):
        raise EncoderRefused("trust_remote_code is not allowed: it runs code shipped with the weights")


def resolve_class_path(cls_path: str) -> str:
    """The class path that will actually be imported: NeMo's known paths map to our built-ins."""
    target = NEMO_ALIASES.get(cls_path)
    if target is not None:
        log.info("encoder %s resolved to the built-in %s (same kwargs; NeMo no longer ships it)",
                 cls_path, target)
        return target
    return cls_path


def import_class(cls_path: str, extra_allowed: Iterable[str] = ()) -> Any:
    """Check the allow-list, apply NeMo aliases and import the named attribute."""
    check_allowed(cls_path, extra_allowed)
    target = resolve_class_path(cls_path)
    module_name, _, attr = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EncoderRefused(f"{cls_path!r}: cannot import module {module_name!r}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise EncoderRefused(f"{cls_path!r}: module {module_name!r} has no attribute {attr!r}") from None


def build_encoder(cls_path: str, kwargs: dict[str, Any], extra_allowed: Iterable[str] = ()) -> Any:
    """Instantiate the encoder ``cls_path(**kwargs)``: the contract of NeMo's precache YAML."""
    check_kwargs(kwargs)
    return import_class(cls_path, extra_allowed)(**kwargs)
