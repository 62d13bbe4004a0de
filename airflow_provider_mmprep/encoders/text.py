"""Frozen text encoders on transformers models loaded from a local folder.

Tokenizing is split from encoding: ``text_preprocessor`` is a small picklable callable the precache stage
runs in its DataLoader workers (CPU), so the accelerator only sees ready token tensors; ``encode`` also
accepts plain strings, so the classes honour NeMo's ``encode(list[str])`` contract on their own.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)


class Tokenize:
    """Picklable tokenizer call with fixed settings: strings → ``{input_ids, attention_mask}`` tensors."""

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer, self.max_length = tokenizer, int(max_length)

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                                 padding="max_length", return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def _local_or_hub(path: str, what: str) -> str:
    if not Path(path).exists() and "/" in path and not path.startswith(("/", ".")):
        log.warning("%s %r is not a local folder; transformers will look in its cache/the Hub", what, path)
    return path


class TransformersTextEncoder(nn.Module):
    """Any transformers encoder (``AutoModel``) with its tokenizer; ``last_hidden_state`` per token.

    ``return_mask: true`` makes ``encode`` return ``(encoded, mask)``: the form precache needs for
    ``store_pad_tokens: false`` (only rows where mask == 1 are stored).
    """

    def __init__(self, from_pretrained: str, max_length: int = 77, return_mask: bool = False,
                 zero_pad_rows: bool = False, **ignored: Any):
        super().__init__()
        from transformers import AutoTokenizer
        if ignored:
            log.info("%s: ignoring kwargs %s", type(self).__name__, ", ".join(sorted(ignored)))
        path = _local_or_hub(str(from_pretrained), "encoder_config.from_pretrained")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = self._load_model(path).eval().requires_grad_(False)
        self.max_length, self.return_mask, self.zero_pad_rows = int(max_length), return_mask, zero_pad_rows
        self.text_preprocessor = Tokenize(self.tokenizer, self.max_length)

    def _load_model(self, path: str) -> nn.Module:
        from transformers import AutoModel
        return AutoModel.from_pretrained(path)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _tokens(self, batch: Sequence[str] | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens = batch if isinstance(batch, Mapping) else self.text_preprocessor(batch)
        return {k: v.to(self.device, non_blocking=True) for k, v in tokens.items()}

    def _hidden(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state

    def encode(self, batch: Sequence[str] | Mapping[str, torch.Tensor]) -> Any:
        tokens = self._tokens(batch)
        hidden = self._hidden(tokens)
        mask = tokens["attention_mask"]
        if self.zero_pad_rows:
            hidden = hidden.masked_fill(mask[..., None] == 0, 0)
        return (hidden, mask) if self.return_mask else hidden

    forward = encode


class CLIPTextEncoder(TransformersTextEncoder):
    """NeMo's ``FrozenCLIPEmbedder``: CLIP text tower at ``max_length`` 77, ``last_hidden_state`` padded with
    zero rows to a multiple of 8 (``[80, 768]`` for CLIP-L), as NeMo's precached SD datasets hold it.

    Kwargs as NeMo's: ``version`` (a local folder holding the CLIP text model and tokenizer), ``max_length``,
    ``layer`` (last | pooled | hidden) and ``layer_idx``; ``device``/``freeze``/``use_fp16`` are the
    stage's business and ignored.
    """

    def __init__(self, version: str, max_length: int = 77, layer: str = "last", layer_idx: int | None = None,
                 pad_to_multiple_of: int = 8, **ignored: Any):
        for name in ("device", "freeze", "use_fp16"):
            ignored.pop(name, None)
        if layer not in ("last", "pooled", "hidden"):
            raise ValueError(f"encoder_config.layer: expected last, pooled or hidden, got {layer!r}")
        if layer == "hidden" and layer_idx is None:
            raise ValueError("encoder_config.layer_idx: required with layer: hidden")
        self.layer, self.layer_idx, self.pad_to_multiple_of = layer, layer_idx, int(pad_to_multiple_of)
        super().__init__(from_pretrained=version, max_length=max_length, **ignored)

    def _load_model(self, path: str) -> nn.Module:
        from transformers import CLIPTextModel
        return CLIPTextModel.from_pretrained(path)

    def _hidden(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        # NeMo feeds input_ids only (CLIP's causal mask; padding tokens attend like in training)
        outputs = self.model(input_ids=tokens["input_ids"], output_hidden_states=self.layer == "hidden")
        if self.layer == "pooled":
            return outputs.pooler_output[:, None, :]
        hidden = outputs.hidden_states[self.layer_idx] if self.layer == "hidden" else outputs.last_hidden_state
        multiple = self.pad_to_multiple_of
        if multiple > 1 and hidden.shape[1] % multiple:
            pad_rows = multiple - hidden.shape[1] % multiple
            hidden = torch.nn.functional.pad(hidden, (0, 0, 0, pad_rows))
        return hidden


class T5TextEncoder(TransformersTextEncoder):
    """T5 encoder (NeMo's imagen ``T5Encoder``): returns ``(encoded [B, L, D], mask [B, L])``.

    Tokenized at ``max_length = max_seq_len`` directly: the same encodings as padding to 512 and
    truncating, at a fraction of the compute. Pad rows are zeroed as NeMo does. Weights from
    ``encoder_path`` (NeMo's key) or ``from_pretrained``: a local T5 folder.
    """

    def __init__(self, max_seq_len: int = 512, encoder_path: str | None = None,
                 from_pretrained: str | None = None, **ignored: Any):
        path = from_pretrained or encoder_path
        if not path:
            raise ValueError("encoder_config.encoder_path: required (a local T5 folder)")
        super().__init__(from_pretrained=path, max_length=max_seq_len, return_mask=True, zero_pad_rows=True,
                         **ignored)

    def _load_model(self, path: str) -> nn.Module:
        from transformers import T5EncoderModel
        return T5EncoderModel.from_pretrained(path)
