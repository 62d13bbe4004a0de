"""precache_encodings: end-to-end throughput vs the same encoders' forward pass alone, in one run.

    /work/main/.venv/bin/python benchmarks/bench_precache.py [--tars 4 --per-tar 48 --repeats 5]

Shards of JPEG photos-like images with captions are encoded by a tiny SD-shaped VAE (random weights, the
real AutoencoderKL architecture) and a tiny CLIP text model, through the whole stage (tar reading, JPEG
decode and NeMo's transform in a DataLoader worker, encoders, pickling and tar writing in the writer
thread). The anchor is the same encoders' forward passes (normalise + VAE + CLIP, cast) on the very same
batches, already decoded and tokenized in memory. ratio = end-to-end samples/s ÷ forward-only samples/s
(target ≥ 0.9: the pipeline keeps the encoders busy).

On CPU the "device" is one core (torch threads = 1 in both measurements) and the host pipeline gets one
DataLoader worker, the analogue of a GPU fed by CPU workers. Model loading is excluded from both sides
(the stage reports it separately). Use --device cuda on a GPU machine.
"""

from __future__ import annotations

import argparse
import logging
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from airflow_provider_mmprep.config import load_config  # noqa: E402
from airflow_provider_mmprep.precache.data import BatchDataset, InputSpec, JobSampler, normalize_on_device  # noqa: E402,E501
from airflow_provider_mmprep.precache.engine import (  # noqa: E402
    _to_device, call_encoder, compute_dtype, interpret_output, place_encoder)
from airflow_provider_mmprep.encoders import build_encoder  # noqa: E402
from airflow_provider_mmprep.stages import run_stage_task  # noqa: E402
from airflow_provider_mmprep.testing import precache_fixtures as fx  # noqa: E402

_PRECISION = {16: torch.float16, 32: torch.float32}


def cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (the DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def prepare_forward_only(precache, tars, device_name: str):
    """Build the encoders and decode/tokenize every batch once, in memory."""
    device = torch.device(device_name)
    encoders = []
    for spec in precache.encodings:
        encoder = build_encoder(spec.encoder_config.cls, spec.encoder_config.kwargs)
        dtype = compute_dtype(spec, precache, device)
        encoders.append((spec, place_encoder(encoder, device, dtype), dtype))
    inputs = [InputSpec(s.modality, s.extension, getattr(e, "text_preprocessor", None) if s.modality == "text"
                        else None) for s, e, _ in encoders]
    dataset = BatchDataset(tars, inputs, precache.image_size, precache.crop_size)
    batches = [dataset[job] for job in JobSampler(tars, precache.batch_size_per_GPU)]
    if device.type == "cuda":
        batches = [{**b, "images": _to_device(b["images"], device), "texts": _to_device(b["texts"], device)}
                   for b in batches]
        torch.cuda.synchronize()
    return device, encoders, batches


def forward_only(device, encoders, batches) -> tuple[int, float]:
    """Time only the encoders (normalise, encode, cast) on the prepared batches."""
    samples = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            for number, (spec, encoder, dtype) in enumerate(encoders):
                if spec.modality == "image":
                    output = call_encoder(encoder, normalize_on_device(batch["images"][spec.extension], dtype))
                else:
                    output = call_encoder(encoder, batch["texts"][number])
                encoded, _ = interpret_output(output, spec)
                encoded.to(_PRECISION[spec.precision])  # the anchor keeps results on the device: no copy back
            samples += len(batch["kept"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return samples, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tars", type=int, default=4)
    parser.add_argument("--per-tar", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--vae-channels", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sd-vae", action="store_true",
                        help="SD 1.x VAE architecture at full size (random weights) instead of the tiny one")
    parser.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench-precache-"))
    try:
        vae = fx.make_sd_vae(root / "vae") if args.sd_vae else fx.make_tiny_vae(root / "vae", channels=args.vae_channels)
        clip = fx.make_tiny_clip_text(root / "clip")
        side = args.image_size
        tars = fx.write_shards(root / "in", args.tars, args.per_tar,
                               sizes=((side * 3 // 2, side), (side, side * 4 // 3), (side * 5 // 4, side * 5 // 4)))
        precache = {"batch_size_per_GPU": args.batch_size, "dataloader_num_workers": args.workers,
                    "image_size": side, "device": args.device, "compute_dtype": args.compute_dtype, "encodings": fx.sd_encodings(vae, clip)}
        config = load_config(fx.write_precache_configs(root / "conf", root / "in", root / "out", precache))
        print(f"precache benchmark: {args.tars} tars x {args.per_tar} samples, {side}px, batch {args.batch_size},"
              f" device {args.device} ({'SD-VAE size' if args.sd_vae else f'tiny VAE, width {args.vae_channels}'},"
              f" compute {args.compute_dtype}), torch threads {torch.get_num_threads()}, DataLoader workers {args.workers}")
        prepared = prepare_forward_only(config.precache, tars, args.device)
        # anchor, run, anchor, run, ..., anchor: each run is compared with the anchors either side of it,
        # which cancels most of the drift that other work on a shared machine causes
        anchors = []
        ratios = []
        cpu = {"forward": [], "end-to-end": []}

        def anchor_rate() -> float:
            used = cpu_seconds()
            samples, seconds = forward_only(*prepared)
            cpu["forward"].append((cpu_seconds() - used) / samples * 1000)
            anchors.append(samples / seconds)
            return anchors[-1]

        anchor_rate()
        for repeat in range(args.repeats):
            shutil.rmtree(root / "out", ignore_errors=True)
            used = cpu_seconds()
            summary = run_stage_task(config, "precache_encodings", 0, 1)
            cpu["end-to-end"].append((cpu_seconds() - used) / summary["samples"] * 1000)
            end_to_end = summary["samples"] / summary["pipeline_seconds"]
            before, after = anchors[-1], anchor_rate()
            ratios.append(end_to_end / ((before + after) / 2))
            print(f"run {repeat + 1}: forward only {before:7.1f} / {after:7.1f} samples/s (before/after) | "
                  f"end-to-end {end_to_end:7.1f} samples/s (+ {summary['seconds'] - summary['pipeline_seconds']:.2f}s "
                  f"set-up) | ratio {ratios[-1]:.3f}")
        print(f"CPU ms per sample (all processes; insensitive to other load): forward only "
              f"{statistics.median(cpu['forward']):.1f}, end-to-end {statistics.median(cpu['end-to-end']):.1f}"
              f" (includes decoding, transform, pickling, tar writing, model set-up)")
        print(f"ratio end-to-end / forward-only: median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f}; target >= 0.9)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
