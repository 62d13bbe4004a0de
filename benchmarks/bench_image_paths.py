"""CPU per image of the ways to shrink a downloaded JPEG (issue 14), against the current path as anchor.

One command::

    /work/main/.venv/bin/python benchmarks/bench_image_paths.py [--rounds 9] [--images 16] [--size 256]

For the benchmark's own JPEGs (512×384, ~75 KB, quality 90) and photo-sized ones (640×480, 1024×768,
1600×1200), ``center_crop`` to ``--size`` with a q95 JPEG out, each path is timed in this one thread
(``time.process_time``: every thread of the process, so libvips' worker threads count), rounds interleaved,
the minimum per path reported with its ratio to ``process_image`` (the stage's own function, as shipped) and,
for the output, PSNR against a LANCZOS resample of the full decode (quality) and against the Pillow path:

- ``process_image``: the stage (fast shrink where built, see ``download/resizer.py``);
- ``pillow``: ``process_image`` with the fast shrink off (Pillow's draft + load + BOX + save);
- ``pillow reduce()``: draft, then ``reduce()`` by the integer part of the factor, then BOX;
- ``simplejpeg M/8 + Pillow``: libjpeg-turbo's DCT scaling to the smallest M/8 ≥ the target, Pillow BOX + save;
- ``simplejpeg + simplejpeg``: full decode, Pillow BOX, simplejpeg encode;
- ``pyvips thumbnail``: ``thumbnail_buffer(crop=centre)`` (shrink-on-load) + ``jpegsave_buffer(Q=95)``;
- components: Pillow decode, simplejpeg decode, Pillow BOX, the compiled BOX, Pillow encode.

Paths whose package is not installed (simplejpeg, pyvips) are skipped with a note.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from airflow_provider_mmprep.download import resizer  # noqa: E402
from airflow_provider_mmprep.download.options import parse_options  # noqa: E402
from airflow_provider_mmprep.testing.sample_data import make_jpeg  # noqa: E402

SIZES = [(512, 384), (640, 480), (1024, 768), (1600, 1200)]


def centre(width: int, height: int) -> tuple[float, float, float, float]:
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def paths(size: int) -> dict[str, Callable[[bytes], bytes | object]]:
    options = parse_options({"resize_mode": "center_crop", "image_size": size, "encode_quality": 95})
    fast = resizer._FAST_SHRINK

    def stage(body: bytes) -> bytes:
        return resizer.process_image(body, options).data

    def pillow(body: bytes) -> bytes:
        resizer._FAST_SHRINK = False
        try:
            return resizer.process_image(body, options).data
        finally:
            resizer._FAST_SHRINK = fast

    def save(image: Image.Image) -> bytes:
        out = io.BytesIO()
        image.save(out, "JPEG", quality=95)
        return out.getvalue()

    def pillow_reduce(body: bytes) -> bytes:
        image = Image.open(io.BytesIO(body))
        scale = size / min(image.size)
        image.draft("RGB", (round(image.size[0] * scale), round(image.size[1] * scale)))
        image.load()
        box = centre(*image.size)
        factor = int((box[2] - box[0]) / size)
        if factor >= 2:
            image = image.reduce(factor, box=tuple(int(v) for v in box))
            box = (0, 0, *image.size)
        return save(image.resize((size, size), Image.Resampling.BOX, box=centre(*image.size), reducing_gap=None))

    found: dict[str, Callable[[bytes], bytes | object]] = {"process_image": stage, "pillow": pillow,
                                                             "pillow reduce()": pillow_reduce}
    try:
        import simplejpeg
    except ImportError:
        print("  (simplejpeg not installed: its paths skipped)")
    else:
        def sj_scaled(body: bytes) -> bytes:
            height, width, _, _ = simplejpeg.decode_jpeg_header(body)
            scale = size / min(width, height)
            pixels = simplejpeg.decode_jpeg(body, min_width=round(width * scale), min_height=round(height * scale))
            image = Image.fromarray(pixels)
            return save(image.resize((size, size), Image.Resampling.BOX, box=centre(*image.size), reducing_gap=None))

        def sj_both(body: bytes) -> bytes:
            image = Image.fromarray(simplejpeg.decode_jpeg(body))
            image = image.resize((size, size), Image.Resampling.BOX, box=centre(*image.size), reducing_gap=None)
            return simplejpeg.encode_jpeg(np.asarray(image), 95, colorsubsampling="420")

        found["simplejpeg M/8 + Pillow"] = sj_scaled
        found["simplejpeg + simplejpeg"] = sj_both
        found["  simplejpeg full decode"] = lambda body: simplejpeg.decode_jpeg(body, colorspace="RGBX")
    try:
        import pyvips
    except (ImportError, OSError):
        print("  (pyvips not installed: its path skipped)")
    else:
        pyvips.cache_set_max(0)
        found["pyvips thumbnail"] = lambda body: pyvips.Image.thumbnail_buffer(
            body, size, height=size, crop="centre").jpegsave_buffer(Q=95)
    return found


def component_paths(body: bytes, size: int) -> dict[str, Callable[[bytes], object]]:
    image = Image.open(io.BytesIO(body))
    image.load()
    box = centre(*image.size)
    small = image.resize((size, size), Image.Resampling.BOX, box=box, reducing_gap=None)

    def pillow_decode(data: bytes) -> Image.Image:
        decoded = Image.open(io.BytesIO(data))
        decoded.load()
        return decoded

    found: dict[str, Callable[[bytes], object]] = {
        "  Pillow full decode": pillow_decode,
        "  Pillow BOX": lambda _data: image.resize((size, size), Image.Resampling.BOX, box=box, reducing_gap=None),
        "  Pillow q95 encode": lambda _data: small.save(io.BytesIO(), "JPEG", quality=95)}
    if resizer._FAST_SHRINK:
        rgbx = image.convert("RGBX").tobytes()
        found["  compiled BOX (_resample.c)"] = lambda _data: resizer._resample.box_rgbx(
            rgbx, image.size[0], image.size[1], size, size, box)
    return found


def psnr(data: bytes, reference: np.ndarray) -> float:
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float64)
    mse = float(np.mean((pixels - reference) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    print(f"fast shrink built and on: {resizer._FAST_SHRINK}")
    for source in SIZES:
        bodies = [make_jpeg(i, source) for i in range(args.images)]
        found = {**paths(args.size), **component_paths(bodies[0], args.size)}
        times: dict[str, list[float]] = {name: [] for name in found}
        for _ in range(args.rounds):
            for name, function in found.items():
                start = time.process_time()
                for body in bodies:
                    function(body)
                times[name].append(1000 * (time.process_time() - start) / len(bodies))
        references, pillow_outputs = [], []
        for body in bodies:
            image = Image.open(io.BytesIO(body)).convert("RGB")
            references.append(np.asarray(image.resize((args.size, args.size), Image.Resampling.LANCZOS,
                                                      box=centre(*image.size)), np.float64))
            pillow_outputs.append(np.asarray(Image.open(io.BytesIO(found["pillow"](body))), np.float64))
        anchor = min(times["process_image"])
        print(f"{source[0]}x{source[1]} JPEGs (mean {sum(map(len, bodies)) // len(bodies) // 1024} KB), center_crop "
              f"{args.size}, q95; CPU ms per image (min of {args.rounds} interleaved rounds), ratio to process_image")
        for name, values in times.items():
            line = f"  {name:30s} {min(values):6.3f} ms  {min(values) / anchor:5.2f}"
            if not name.startswith("  "):
                outputs = [found[name](body) for body in bodies]
                line += (f"   PSNR vs LANCZOS {np.mean([psnr(o, r) for o, r in zip(outputs, references)]):5.2f} dB, "
                         f"vs Pillow path {np.mean([psnr(o, p) for o, p in zip(outputs, pillow_outputs)]):5.1f} dB")
            print(line, flush=True)


if __name__ == "__main__":
    main()
