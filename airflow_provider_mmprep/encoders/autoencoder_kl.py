"""Stable Diffusion's AutoencoderKL as a frozen image encoder (diffusers), standing in for NeMo's class.

``encode(x)`` takes a batch in [-1, 1] and returns diffusers' ``latent_dist`` (a diagonal Gaussian), which
precache stores as its ``.parameters``: mean and logvar concatenated on channels, ``[8, H/8, W/8]`` for SD,
unclamped and unscaled, exactly what NeMo's Stable Diffusion training reads.

Weights come from ``from_pretrained``, as NeMo's YAML gives it:

- a diffusers folder (``config.json`` + weights, or a pipeline folder with a ``vae/`` subfolder); or
- a single checkpoint file (``.bin``/``.pt``/``.ckpt``/``.safetensors``) holding either diffusers-named
  weights (what NeMo's ``vae.bin`` is) or original LDM-named ones (``encoder.down.0.block.0...``), with
  the architecture taken from NeMo's ``ddconfig`` + ``embed_dim``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

_PREFIXES = ("first_stage_model.", "vae.", "model.")


def diffusers_config_from_ddconfig(ddconfig: dict[str, Any], embed_dim: int) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` constructor arguments equivalent to NeMo/LDM's ``ddconfig``."""
    ch = int(ddconfig.get("ch", 128))
    ch_mult = list(ddconfig.get("ch_mult", [1, 2, 4, 4]))
    if not ddconfig.get("double_z", True):
        raise ValueError("ddconfig.double_z: false is not a KL autoencoder (no logvar to store)")
    z_channels = int(ddconfig.get("z_channels", embed_dim))
    if z_channels != embed_dim:
        raise ValueError(f"ddconfig.z_channels ({z_channels}) must equal embed_dim ({embed_dim}) "
                         "for the diffusers AutoencoderKL")
    return {
        "in_channels": int(ddconfig.get("in_channels", 3)),
        "out_channels": int(ddconfig.get("out_ch", 3)),
        "down_block_types": ["DownEncoderBlock2D"] * len(ch_mult),
        "up_block_types": ["UpDecoderBlock2D"] * len(ch_mult),
        "block_out_channels": [ch * m for m in ch_mult],
        "layers_per_block": int(ddconfig.get("num_res_blocks", 2)),
        "latent_channels": embed_dim,
        "sample_size": int(ddconfig.get("resolution", 256)),
        "force_upcast": False,
    }


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:  # weights only: a checkpoint must not be able to run code
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    for prefix in _PREFIXES:
        if any(k.startswith(prefix + "encoder.") for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    return state


class AutoencoderKLImageEncoder(nn.Module):
    """Frozen SD VAE encoder. Kwargs follow NeMo's ``AutoencoderKL`` (unknown ones are logged, ignored).

    ``upcast``: run in float32 even when the stage computes in half precision; ``None`` (default) follows
    an explicit ``force_upcast: true`` in the diffusers folder's config (SDXL's VAE overflows in fp16).
    """

    def __init__(self, from_pretrained: str | None = None, ddconfig: dict[str, Any] | None = None,
                 embed_dim: int = 4, upcast: bool | None = None, subfolder: str | None = None,
                 **ignored: Any):
        super().__init__()
        from diffusers import AutoencoderKL

        ignored.pop("double_z", None)
        if ignored:
            log.info("AutoencoderKLImageEncoder: ignoring NeMo kwargs not needed to encode: %s",
                     ", ".join(sorted(ignored)))
        if not from_pretrained:
            raise ValueError("encoder_config.from_pretrained: required (a diffusers folder or a checkpoint file)")
        source = Path(str(from_pretrained))
        explicit_upcast = False
        if source.is_dir():
            folder = source / subfolder if subfolder else source
            if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
                folder = folder / "vae"
            raw_config = json.loads((folder / "config.json").read_text())
            explicit_upcast = bool(raw_config.get("force_upcast", False))
            self.vae = AutoencoderKL.from_pretrained(str(folder))
        elif source.is_file():
            if ddconfig is None:
                raise ValueError("encoder_config.ddconfig: required when from_pretrained is a single file")
            config = diffusers_config_from_ddconfig(ddconfig, int(embed_dim))
            self.vae = AutoencoderKL(**config)
            state = _load_state_dict(source)
            if any(k.startswith("encoder.down.") for k in state):  # original LDM names
                from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
                state = convert_ldm_vae_checkpoint(state, config)
            try:
                missing, unexpected = self.vae.load_state_dict(state, strict=False)
            except RuntimeError as exc:  # shape mismatches
                raise ValueError(f"encoder_config.from_pretrained: {source} does not match ddconfig/embed_dim: "
                                 f"{str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else exc}"
                                 ) from None
            needed = [k for k in missing if k.startswith(("encoder.", "quant_conv."))]
            if needed or unexpected:
                raise ValueError(f"encoder_config.from_pretrained: {source} does not match ddconfig/embed_dim "
                                 f"(missing {needed[:3]}, unexpected {unexpected[:3]})")
        else:
            raise ValueError(f"encoder_config.from_pretrained: {source} is neither a folder nor a file")
        self.upcast = explicit_upcast if upcast is None else bool(upcast)
        self.vae.eval().requires_grad_(False)

    def mmprep_to(self, device: torch.device, dtype: torch.dtype) -> "AutoencoderKLImageEncoder":
        """Place for the stage: keep float32 where the VAE must not run in half precision."""
        if self.upcast and dtype != torch.float32:
            log.info("AutoencoderKLImageEncoder: force_upcast set, computing in float32 instead of %s", dtype)
            dtype = torch.float32
        return self.to(device=device, dtype=dtype)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def encode(self, images: torch.Tensor) -> Any:
        """``images``: ``[B, 3, H, W]`` in [-1, 1] → the Gaussian ``latent_dist`` (``.parameters``: ``[B, 8, H/8, W/8]``)."""
        return self.vae.encode(images.to(self.dtype)).latent_dist

    forward = encode
