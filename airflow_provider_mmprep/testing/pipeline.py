"""A whole pipeline's worth of local inputs: images on a loopback host, their URL parquet on a loopback
Hugging Face–compatible endpoint, tiny encoders and their precache YAML. Shared by the Airflow end-to-end
test and ``python -m airflow_provider_mmprep.demo``; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .hf_endpoint import FakeHub, HubServer
from .image_host import ImageHost
from .sample_data import add_images, write_url_parquet

DEMO_REPO_ID = "mmprep/demo-captions"


@dataclass
class LocalSources:
    hub: HubServer
    images: ImageHost
    repo_id: str
    urls: int


def write_tiny_precache_config(models_dir: Path, image_size: int = 64, batch_size: int = 16) -> Path:
    """Tiny SD-shaped VAE + CLIP text encoder (random weights, fixed seed) and a precache_sd-style YAML
    naming NeMo's classes, written to ``models_dir/precache.yaml``. Reused when already there."""
    from omegaconf import OmegaConf

    from .precache_fixtures import make_tiny_clip_text, make_tiny_vae, sd_encodings

    path = models_dir / "precache.yaml"
    if path.is_file():
        return path
    vae, clip = models_dir / "vae", models_dir / "clip"
    if not (vae / "config.json").is_file():
        make_tiny_vae(vae, channels=16)
    if not (clip / "config.json").is_file():
        make_tiny_clip_text(clip)
    body = {"batch_size_per_GPU": batch_size, "dataloader_num_workers": 0, "save_original_in_tar": False,
            "image_size": image_size, "device": "cpu", "worker_processes": 1,
            "encodings": sd_encodings(vae, clip), "lightning": {"devices": 1}}
    tmp = path.with_suffix(".yaml.tmp")
    OmegaConf.save(OmegaConf.create(body), tmp)
    tmp.replace(path)
    return path


@contextlib.contextmanager
def local_sources(images: int = 200, parquet_files: int = 1, image_size: tuple[int, int] = (96, 72),
                  repo_id: str = DEMO_REPO_ID, set_env: bool = True, failing: int = 0) -> Iterator[LocalSources]:
    """Start the image host and the hub endpoint; the dataset repo holds ``parquet_files`` URL parquets
    (``URL``, ``TEXT``) over ``images`` procedural JPEGs. ``failing`` more URLs answer 404, spread evenly
    among the others (as dead links are in LAION). With ``set_env``, ``HF_ENDPOINT`` points at the
    endpoint while the context is open."""
    with ImageHost() as host:
        urls = add_images(host, images, size=image_size, distinct=min(images, 64))
        for number in range(failing):
            urls.insert((number + 1) * len(urls) // (failing + 1), host.url(f"/missing/{number}.jpg"))
        files = {}
        per_file = -(-len(urls) // parquet_files)
        with tempfile.TemporaryDirectory() as scratch:
            for number in range(parquet_files):
                chunk = urls[number * per_file:(number + 1) * per_file]
                written = write_url_parquet(Path(scratch) / f"{number}.parquet", chunk)
                files[f"data/train-{number:05d}.parquet"] = written.read_bytes()
        fake = FakeHub()
        fake.add_repo(repo_id, files)
        with HubServer(fake) as hub:
            saved = os.environ.get("HF_ENDPOINT")
            if set_env:
                os.environ["HF_ENDPOINT"] = hub.url
            try:
                yield LocalSources(hub, host, repo_id, len(urls))
            finally:
                if set_env:
                    if saved is None:
                        os.environ.pop("HF_ENDPOINT", None)
                    else:
                        os.environ["HF_ENDPOINT"] = saved

