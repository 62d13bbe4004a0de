"""The run report: built from realistic stage outputs written here (tars, img2dataset stats/parquet,
manifests, wdinfo.pkl), checked for its numbers and resume commands, and rendered in headless Chromium."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import pickle
import re
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from airflow_provider_mmprep.cli import build_parser, main
from airflow_provider_mmprep.config import PipelineConfig, load_config
from airflow_provider_mmprep.manifest import write_manifest
from airflow_provider_mmprep.report import build_report_html, default_report_path, resume_commands, write_report
from airflow_provider_mmprep.testing.browser import dump_dom, find_chromium, screenshot

CHUNK = 8
T0 = 1_760_000_000.0  # a fixed epoch so times in the fixtures are deterministic

# (status, error_message) pattern of one 10-URL shard: 7 ok, 3 failures of different kinds
SHARD_STATUSES = [("success", None)] * 7 + [
    ("failed_to_download", "HTTP Error 404: Not Found"),
    ("failed_to_download", "timed out"),
    ("failed_to_resize", "image decoding error: cannot identify image file"),
]


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), int(T0)
            tar.addfile(info, io.BytesIO(data))


def _write_download_shard(folder: Path, shard: int, part_rows: list[tuple[str, str]], start: float,
                          statuses: list[tuple[str, str | None]]) -> int:
    """One img2dataset shard: tar of the successes, parquet of every URL's status, stats json."""
    keys, members = [], []
    for index, ((url, caption), (status, _)) in enumerate(zip(part_rows, statuses)):
        key = f"{shard:05d}{index:04d}"
        keys.append(key)
        if status == "success":
            members += [(f"{key}.jpg", _jpeg(shard * 100 + index)), (f"{key}.txt", caption.encode()),
                        (f"{key}.json", json.dumps({"url": url, "caption": caption, "key": key}).encode())]
    _write_tar(folder / f"{shard:05d}.tar", members)
    pq.write_table(pa.table({
        "URL": [u for u, _ in part_rows], "TEXT": [c for _, c in part_rows], "key": keys,
        "status": [s for s, _ in statuses], "error_message": [e for _, e in statuses],
        "width": [16 if s == "success" else None for s, _ in statuses],
        "height": [16 if s == "success" else None for s, _ in statuses],
    }), folder / f"{shard:05d}.parquet")
    successes = sum(s == "success" for s, _ in statuses)
    status_dict = {"success": successes}
    for status, error in statuses:
        if error:
            status_dict[error] = status_dict.get(error, 0) + 1
    duration = 4.0 + shard
    (folder / f"{shard:05d}_stats.json").write_text(json.dumps({
        "count": len(statuses), "successes": successes,
        "failed_to_download": sum(s == "failed_to_download" for s, _ in statuses),
        "failed_to_resize": sum(s == "failed_to_resize" for s, _ in statuses),
        "duration": duration, "start_time": start, "end_time": start + duration, "status_dict": status_dict,
    }))
    return successes


def _write_sample_tar(path: Path, first_key: int, count: int, pickles: bool, task_id: int, when: float) -> None:
    members = []
    for key in range(first_key, first_key + count):
        name = f"{key:09d}"
        if pickles:
            sample = {"autoencoderkl_image": np.zeros((8, 4, 4), np.float16),
                      "clip-vit-large-patch14_text": np.zeros((80, 768), np.float32)}
            members.append((f"{name}.pickle", pickle.dumps(sample)))
        else:
            members += [(f"{name}.jpg", _jpeg(key)), (f"{name}.txt", f"caption {key}".encode())]
    _write_tar(path, members)
    write_manifest(path, count, task_id=task_id, file_ext_in_tar=[".pickle"] if pickles else [".jpg", ".txt"])
    manifest = path.with_name(path.name + ".manifest.json")
    os.utime(manifest, (when, when))


def make_run_outputs(root: Path, *, missing_precache_tar: bool = True) -> dict[str, int]:
    """A finished-but-imperfect run under ``root`` as the stages leave it; returns the expected counts."""
    parquet_dir = root / "parquet"
    parquet_dir.mkdir(parents=True)
    raw = root / "tarfiles_raw"
    urls = successes = 0
    for part in range(2):  # two parquet parts → two download_images tasks, two shards of 10 URLs each
        rows = [(f"http://127.0.0.1:1/img/{part}/{i}.jpg", f"a photo number {i} of part {part}")
                for i in range(20)]
        pq.write_table(pa.table({"URL": [u for u, _ in rows], "TEXT": [c for _, c in rows]}),
                       parquet_dir / f"part{part}.parquet")
        for shard in range(2):
            successes += _write_download_shard(raw / f"part{part}", shard, rows[shard * 10:(shard + 1) * 10],
                                               T0 + part * 3 + shard * 6, SHARD_STATUSES)
            urls += 10
    # reorganize_tar: 28 images → 3 full tars of 8 and a short one of 4, one task
    reorganized = root / "tarfiles_reorganized"
    sizes = [8, 8, 8, 4]
    for index, size in enumerate(sizes):
        _write_sample_tar(reorganized / f"{index:05d}.tar", index * CHUNK, size, False, 0, T0 + 20 + index)
    # precache_encodings, 4 tasks over the 4 reorganized tars (same names); the last one never finished
    precached = root / "tarfiles_precached"
    done = sizes[:3] if missing_precache_tar else sizes
    for index, size in enumerate(done):
        _write_sample_tar(precached / f"{index:05d}.tar", index * CHUNK, size, True, index, T0 + 40 + 2 * index)
    with (root / "wdinfo.pkl").open("wb") as fh:
        pickle.dump({"tar_files": [f"{i:05d}.tar" for i in range(3)], "chunk_size": CHUNK,
                     "total_key_count": 3 * CHUNK}, fh)
    return {"urls": urls, "successes": successes, "parts": 2}


OVERRIDES_FOR = lambda root: [f"dataset_repo_id=org/sample", f"dataset_output_root={root}",  # noqa: E731
                              f"reorganize_tar.tar_chunk_size={CHUNK}"]


@pytest.fixture
def run_root(tmp_path: Path, nemo_config: Callable[..., Path]) -> tuple[Path, list[str], PipelineConfig]:
    root = tmp_path / "dataset"
    make_run_outputs(root)
    config_path = nemo_config()
    overrides = OVERRIDES_FOR(root)
    return config_path, overrides, load_config(config_path, overrides)


def _images(page: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(b)))
            for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def _text(page: str) -> str:
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)))


def test_report_counts_plots_and_resume_commands(run_root) -> None:
    config_path, overrides, cfg = run_root
    path = write_report(cfg, overrides=overrides, run_id="manual__2026-01-01")
    assert path == default_report_path(cfg) == Path(cfg.generate_wdinfo.output_wdinfo_path).parent / "report.html"
    page = path.read_text()
    text = _text(page)
    # download_parquet: 2 parts, 40 rows
    assert "parquet parts 2" in text and "URL rows 40" in text
    # download_images: 4 shards × 10 URLs, 7 ok each
    assert "URLs tried 40" in text and "images downloaded 28 (70.0%)" in text
    assert "failed to download 8" in text and "failed to resize 4" in text
    # failures by reason, from the parquet error_message column
    assert "HTTP Error 404: Not Found" in text and "timed out" in text
    # reorganize: one short tar of 4; precache: 3 of 4 tars; wdinfo consistent
    assert "short tars (< tar_chunk_size 8) 1" in text
    assert "samples 28" in text and "samples 24" in text
    assert "total_key_count 24" in text and "listed tars not found 0" in text
    # four real PNG plots: status mix, download throughput, tar throughput, shard sizes
    images = _images(page)
    assert len(images) == 4 and all(im.format == "PNG" and im.width > 300 for im in images)
    # precache task 3 owns the unfinished tar 00003.tar: exactly that task is reported, with both commands
    assert "1 task(s) to redo: 3" in text
    assert "input 00003.tar has no finished output tar" in text
    commands = re.search(r"<pre>(.*?)</pre>", page, re.S).group(1)
    commands = html.unescape(commands).splitlines()
    run_line = next(c for c in commands if c.startswith("mmprep run"))
    assert run_line.endswith("--stage precache_encodings --task-id 3 --task-count 4")
    args = build_parser().parse_args(run_line.split()[1:])  # the command the CLI accepts, as printed
    assert (args.command, args.stage, args.task_id, args.task_count) == ("run", ["precache_encodings"], 3, 4)
    assert args.config == str(config_path) and args.overrides == overrides
    assert "mmprep clear download_multimodal manual__2026-01-01 --stage precache_encodings --task-ids 3" \
        in commands
    # download tasks with failed URLs get the retry_failed variant
    assert "download_images.retry_failed=true --stage download_images --task-id 0 --task-count 2" in page
    assert "<script" not in page  # a static page: nothing runs when it is opened


def test_complete_run_reports_nothing_to_redo(tmp_path: Path, nemo_config) -> None:
    root = tmp_path / "dataset"
    make_run_outputs(root, missing_precache_tar=False)
    cfg = load_config(nemo_config(), OVERRIDES_FOR(root))
    text = _text(build_report_html(cfg))
    assert "No failed or missing tasks found." in text
    assert "task(s) to redo" not in text


def test_airflow_task_states_add_failed_map_indices(run_root) -> None:
    _, overrides, cfg = run_root
    page = build_report_html(cfg, task_states={"reorganize_tar": {0: "failed"},
                                               "precache_encodings": {1: "success", 2: "upstream_failed"}},
                             dag_id="my_dag", run_id="r1")
    assert "mmprep clear my_dag r1 --stage reorganize_tar --task-ids 0" in page
    assert "mmprep clear my_dag r1 --stage precache_encodings --task-ids 2-3" in page
    assert "Airflow state upstream_failed" in page


def test_disabled_and_missing_stages_are_said_so(tmp_path: Path, nemo_config) -> None:
    config_path = nemo_config({"download_parquet:\n  enable: True": "download_parquet:\n  enable: False",
                               "precache_encodings:\n  enable: True": "precache_encodings:\n  enable: False"})
    cfg = load_config(config_path, [f"dataset_output_root={tmp_path / 'empty'}"])
    out = write_report(cfg, tmp_path / "elsewhere" / "r.html")
    text = _text(out.read_text())
    assert "Disabled (download_parquet.enable: false)" in text
    assert "Disabled (precache_encodings.enable: false)" in text
    assert "stage not run yet" in text and "wdinfo.pkl not found" in text
    assert "No download_images status data" in text and "No tars with manifests yet." in text
    assert _images(out.read_text()) == []


def test_failure_reasons_fall_back_to_the_shard_parquet(run_root) -> None:
    _, _, cfg = run_root
    for stats_file in Path(cfg.download_images.output_dir).glob("*/*_stats.json"):
        stats = json.loads(stats_file.read_text())
        del stats["status_dict"]
        stats_file.write_text(json.dumps(stats))
    text = _text(build_report_html(cfg))
    # the same reasons and counts, now from the `status` / `error_message` columns
    assert "HTTP Error 404: Not Found 4" in text and "timed out 4" in text
    assert "image decoding error: cannot identify image file 4" in text


def test_download_task_stopped_part_way_is_to_redo(run_root) -> None:
    _, _, cfg = run_root
    last_shard = Path(cfg.download_images.output_dir) / "part1" / "00001_stats.json"
    last_shard.unlink()  # as if the pod died before its second shard was finished
    text = _text(build_report_html(cfg))
    assert "10 of 20 URLs of its part have a status" in text
    assert "--stage download_images --task-id 1 --task-count 2" in text
    assert "URLs tried 30" in text


@pytest.mark.parametrize("form", ["renamed", "marker"])
def test_short_tar_marked_incomplete(run_root, form: str) -> None:
    _, _, cfg = run_root
    short = Path(cfg.reorganize_tar.output_dir) / "00003.tar"
    if form == "renamed":  # the short tar itself carries the suffix, with its manifest
        marked = short.with_name("00003.tar.INCOMPLETE")
        short.rename(marked)
        short.with_name("00003.tar.manifest.json").unlink()
        write_manifest(marked, 4)
    else:  # an empty marker beside the tar
        short.with_name("00003.tar.INCOMPLETE").touch()
    text = _text(build_report_html(cfg))
    assert "marked .INCOMPLETE (not listed in wdinfo as full) 1" in text
    assert "without an .INCOMPLETE mark" not in text
    assert "short tars (< tar_chunk_size 8) 1" in text and "samples 28" in text


def test_unmarked_short_tar_is_flagged(run_root) -> None:
    _, _, cfg = run_root
    assert "1 tar(s) hold fewer than tar_chunk_size samples without an .INCOMPLETE mark: 00003.tar" \
        in _text(build_report_html(cfg))


def test_resume_lines_are_capped_but_clear_covers_all(run_root) -> None:
    _, _, cfg = run_root
    lines = resume_commands(cfg, {"precache_encodings": list(range(60))}, {"precache_encodings": 1024})
    assert sum(line.startswith("mmprep run") for line in lines) == 50
    assert "# ... 10 more precache_encodings tasks: 50-59" in lines
    assert lines[-1].endswith("--stage precache_encodings --task-ids 0-59")


def test_report_without_matplotlib_still_has_counts_and_commands(run_root, monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    _, _, cfg = run_root
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    page = build_report_html(cfg)
    assert _images(page) == []
    assert "matplotlib is not installed" in page and "URLs tried 40" in _text(page)
    assert "--stage precache_encodings --task-id 3 --task-count 4" in page


def test_wdinfo_with_a_class_reference_is_not_unpickled(run_root) -> None:
    _, _, cfg = run_root
    wdinfo = Path(cfg.generate_wdinfo.output_wdinfo_path)
    wdinfo.write_bytes(pickle.dumps({"tar_files": [Path("a.tar")], "chunk_size": 8, "total_key_count": 8}))
    text = _text(build_report_html(cfg))
    assert "cannot be read" in text and "pathlib" in text
    assert "1 task(s) to redo: 0" in text  # generate_wdinfo must be rerun


def test_cli_report_subcommand(run_root, tmp_path: Path, capsys) -> None:
    config_path, overrides, _ = run_root
    out = tmp_path / "cli" / "report.html"
    assert main(["report", str(config_path), *overrides, "--out", str(out), "--run-id", "r7"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert "mmprep clear download_multimodal r7" in out.read_text()
    assert main(["report", str(config_path), "dataset_output_root=x"]) == 2  # dataset_repo_id missing


# --------------------------------------------------------------------------------------------------------
# Headless Chromium
# --------------------------------------------------------------------------------------------------------

CHROMIUM = find_chromium()
# Appended to a *copy* of the page (the report itself has no script): after load, the title says how many
# images decoded, which --dump-dom then shows.
PROBE = ("<script>window.addEventListener('load',()=>{const i=[...document.images];"
         "document.title='decoded '+i.filter(x=>x.complete&&x.naturalWidth>0).length+' of '+i.length;});"
         "</script>")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (Debian: apt-get install -y chromium); "
                                             "the headless render check needs it")
def test_report_renders_in_headless_chromium(run_root, tmp_path: Path) -> None:
    _, overrides, cfg = run_root
    path = write_report(cfg, overrides=overrides)
    probe = tmp_path / "probe.html"
    probe.write_text(path.read_text().replace("</body>", PROBE + "</body>"))
    assert "<title>decoded 4 of 4</title>" in dump_dom(probe.as_uri())

    # MMPREP_REPORT_SCREENSHOT=/some/where.png keeps the screenshot for a look
    shot = screenshot(path.as_uri(), os.environ.get("MMPREP_REPORT_SCREENSHOT", tmp_path / "report.png"),
                      width=1200, height=3600)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 3600)
    # not a blank page: many distinct colours (text, tables, the plots' bars and lines)
    assert len(image.getcolors(maxcolors=1 << 20) or []) > 200


def test_retry_shards_do_not_count_urls_twice(run_root) -> None:
    """A retry_failed round re-tries URLs already counted as download failures: 'URLs tried' stays the
    number of input URLs, and each recovered URL moves from failed_to_download to images downloaded."""
    _, _, cfg = run_root
    part = Path(cfg.download_images.output_dir) / "part0"
    (part / "00009_stats.json").write_text(json.dumps({
        "count": 3, "successes": 2, "failed_to_download": 1, "failed_to_resize": 0, "retry_round": True,
        "duration": 1.0, "start_time": 2000.0, "end_time": 2001.0,
        "status_dict": {"success": 2, "HTTP Error 404: Not Found": 1}}))
    _write_tar(part / "00009.tar", [])
    text = _text(build_report_html(cfg))
    assert "URLs tried 40" in text and "images downloaded 30 (75.0%)" in text
    assert "failed to download 6" in text and "failed to resize 4" in text


def test_precache_task_owning_only_the_marked_short_tar_has_nothing_to_redo(run_root) -> None:
    _, _, cfg = run_root  # precache's output for 00003.tar is missing, as precache leaves a marked tar out
    (Path(cfg.reorganize_tar.output_dir) / "00003.tar.INCOMPLETE").touch()
    text = _text(build_report_html(cfg))
    assert "input 00003.tar has no finished output tar" not in text
    assert "--stage precache_encodings" not in text


def test_input_smaller_than_one_tar_says_nothing_to_encode(run_root) -> None:
    _, _, cfg = run_root
    reorganized = Path(cfg.reorganize_tar.output_dir)
    for index in range(3):
        (reorganized / f"{index:05d}.tar").unlink()
        (reorganized / f"{index:05d}.tar.manifest.json").unlink()
    (reorganized / "00003.tar.INCOMPLETE").touch()
    for tar in Path(cfg.precache_encodings.output_dir).iterdir():
        tar.unlink()
    text = _text(build_report_html(cfg))
    assert "nothing to encode" in text and "process_incomplete_tars" in text
    assert "--stage precache_encodings" not in text


def _set_stats(folder: Path, **fields) -> None:
    for stats_file in sorted(folder.glob("*_stats.json")):
        stats = json.loads(stats_file.read_text())
        stats.update(fields)
        stats_file.write_text(json.dumps(stats))


def test_download_task_whose_urls_all_failed_is_to_redo(run_root) -> None:
    _, _, cfg = run_root
    part = Path(cfg.download_images.output_dir) / "part1"
    _set_stats(part, successes=0, failed_to_download=10, failed_to_resize=0, retryable=0,
               status_dict={"refused loopback address 127.0.0.1": 10})
    text = _text(build_report_html(cfg))
    assert "20 of 20 URLs failed (max_failed_share 1)" in text
    assert "--stage download_images --task-id 1 --task-count 2" in text
    assert "--stage download_images --task-ids 1 " in text  # the clear line: task 1 only


def test_retry_suggestion_only_while_transient_failures_remain(run_root) -> None:
    _, _, cfg = run_root
    out = Path(cfg.download_images.output_dir)
    _set_stats(out / "part0", retryable=1)  # mmprep's stats: one transient failure per shard
    _set_stats(out / "part1", retryable=0)  # only permanent failures: nothing a retry would change
    text = _text(build_report_html(cfg))
    assert "1 download task(s) finished with failed URLs" in text
    assert "download_images.retry_failed=true --stage download_images --task-id 0" in text
    # a retry round settled both transient failures of part0: nothing left to suggest
    (out / "part0" / "00002_stats.json").write_text(json.dumps({
        "count": 2, "successes": 1, "failed_to_download": 1, "failed_to_resize": 0, "retryable": 0,
        "retry_round": True, "status_dict": {"success": 1, "HTTP 404": 1}}))
    assert "finished with failed URLs" not in _text(build_report_html(cfg))
