"""Make WebDataset shards shaped like download_images output, for tests, benchmarks and demos.

Image members are random bytes (reorganize_tar never decodes them), captions and metadata are small
text; sizes, counts and gaps are drawn from a seeded generator so every run builds the same files.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path
from typing import Iterable, Mapping

from ..manifest import write_manifest
from ..tarindex import offsets_of

SampleSpec = tuple[str, Mapping[str, bytes]]  # (key, {extension without dot: data})


def write_tar(path: str | Path, samples: Iterable[SampleSpec]) -> Path:
    """Write ``samples`` (members of each adjacent, in the given order) as an uncompressed tar."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
    return path


def download_style_samples(shard: int, count: int, rng: random.Random, image_bytes: tuple[int, int],
                           key_digits: int = 9, shard_digits: int = 4) -> list[SampleSpec]:
    """``count`` samples keyed like img2dataset (shard × 10^k + index): ``.jpg``, ``.txt``, ``.json``."""
    samples: list[SampleSpec] = []
    for index in range(count):
        key = f"{shard * 10 ** (key_digits - shard_digits) + index:0{key_digits}d}"
        image = rng.randbytes(rng.randint(*image_bytes))
        caption = f"caption {shard}/{index}: " + " ".join(rng.choice(["a", "red", "cat", "on", "mat"])
                                                          for _ in range(8))
        meta = {"key": key, "status": "success", "caption": caption, "width": 64, "height": 48}
        samples.append((key, {"jpg": image, "txt": caption.encode(), "json": json.dumps(meta).encode()}))
    return samples


def make_download_output(root: str | Path, parts: int, shards_per_part: int, samples_per_shard: tuple[int, int],
                         image_bytes: tuple[int, int] = (2_000, 6_000), seed: int = 0,
                         manifests: bool = False, member_offsets: bool = True) -> list[Path]:
    """download_images-like tree ``root/<part>/{shard:05d}.tar`` with uneven sample counts; returns tars.
    With ``manifests``, each tar gets the manifest download_images writes beside it (without
    ``member_offsets``: as versions before they were recorded did)."""
    rng = random.Random(seed)
    tars = []
    for part in range(parts):
        for shard in range(shards_per_part):
            count = rng.randint(*samples_per_shard)
            tar = write_tar(Path(root) / f"part-{part:03d}" / f"{shard:05d}.tar",
                            download_style_samples(shard, count, rng, image_bytes))
            if manifests:
                extra = {"member_offsets": offsets_of(tar)} if member_offsets else {}
                write_manifest(tar, count, shard=shard, extensions=["jpg", "json", "txt"],
                               every_sample_has=["jpg", "json", "txt"], source="download_images", **extra)
            tars.append(tar)
    return tars
