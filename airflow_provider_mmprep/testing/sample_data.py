"""Procedural image-text data for tests, the demo and benchmarks: no downloads, fully deterministic.

Images are smooth colour waves plus noise, JPEG-encoded, so they weigh what web photos weigh (a 512×384
image is ~75 KB at quality 90) and decoding/re-encoding costs what it costs on real data. The same
``index`` always gives the same bytes.

Typical use with :class:`~airflow_provider_mmprep.testing.image_host.ImageHost`::

    with ImageHost(latency=(0.02, 0.2)) as host:
        urls = add_images(host, count=100)             # registers /img/0.jpg ... on the host
        write_url_parquet(tmp / "part0.parquet", urls)  # URL, TEXT columns, like LAION's parquet
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # pragma: no cover
    from .image_host import ImageHost

_WORDS = ("red", "green", "blue", "wave", "sunset", "ocean", "forest", "city", "cat", "dog", "mountain",
          "river", "painting", "photo", "abstract", "pattern", "bright", "dark", "soft", "sharp")


def make_image(index: int, size: tuple[int, int] = (512, 384), mode: str = "RGB") -> Image.Image:
    """A deterministic picture for ``index``: three colour waves of random direction plus Gaussian noise."""
    width, height = size
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.empty((height, width, 3), np.float32)
    for channel in range(3):
        fx, fy = rng.uniform(0.005, 0.05, 2)
        phase = rng.uniform(0, 2 * np.pi)
        pixels[..., channel] = 127 + 100 * np.sin(x * fx + y * fy + phase)
    pixels += rng.normal(0, 12, pixels.shape).astype(np.float32)
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")
    return image if mode == "RGB" else image.convert(mode)


def encode(image: Image.Image, fmt: str = "JPEG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def make_jpeg(index: int, size: tuple[int, int] = (512, 384), quality: int = 90,
              exif_orientation: int | None = None) -> bytes:
    """JPEG bytes of :func:`make_image`; ``exif_orientation`` (1–8) adds an EXIF Orientation tag."""
    image = make_image(index, size)
    params: dict[str, Any] = {"quality": quality}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        params["exif"] = exif.tobytes()
    return encode(image, "JPEG", **params)


def make_png(index: int, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    return encode(make_image(index, size, mode), "PNG")


def caption(index: int) -> str:
    """A deterministic caption with a little non-ASCII text, as web captions have."""
    rng = np.random.default_rng(10_000 + index)
    words = [_WORDS[i] for i in rng.integers(0, len(_WORDS), 6)]
    return f"{' '.join(words)} #{index} — é✓"


def add_images(host: "ImageHost", count: int, size: tuple[int, int] = (512, 384), distinct: int | None = None,
               start: int = 0, quality: int = 90) -> list[str]:
    """Register ``count`` JPEGs on ``host`` as ``/img/<i>.jpg`` and return their URLs in order.

    ``distinct`` limits how many different images are encoded (URL i serves image ``i % distinct``), which
    keeps a benchmark host of thousands of URLs cheap to build and small in memory.
    """
    distinct = count if distinct is None else max(1, min(distinct, count))
    bodies = [make_jpeg(start + i, size, quality) for i in range(distinct)]
    urls = []
    for i in range(start, start + count):
        path = f"/img/{i}.jpg"
        host.add(path, bodies[(i - start) % distinct])
        urls.append(host.url(path))
    return urls


def write_url_parquet(path: str | Path, urls: Sequence[str], captions: Iterable[str] | None = None,
                      extra_columns: dict[str, Sequence[Any]] | None = None, url_col: str = "URL",
                      caption_col: str = "TEXT", row_group_size: int = 1000) -> Path:
    """Write a LAION-style parquet: ``URL``, ``TEXT`` (captions default to :func:`caption` of the row)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    texts = list(captions) if captions is not None else [caption(i) for i in range(len(urls))]
    columns: dict[str, Any] = {url_col: pa.array(list(urls), pa.string()),
                               caption_col: pa.array(texts, pa.string())}
    for name, values in (extra_columns or {}).items():
        columns[name] = pa.array(list(values))
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path
