"""precache_encodings end to end on real shards and tiny local models: layout, NeMo shapes and dtypes,
values, task slicing, resume after SIGKILL, multi-process path, and reading back with webdataset."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from airflow_provider_mmprep.config import PrecacheConfig, load_config  # noqa: E402
from airflow_provider_mmprep.manifest import read_manifest  # noqa: E402
from airflow_provider_mmprep.precache.data import resize_and_crop  # noqa: E402
from airflow_provider_mmprep.report import build_report_html  # noqa: E402
from airflow_provider_mmprep.safepickle import safe_loads  # noqa: E402
from airflow_provider_mmprep.stages import StageError, precache_encodings, run_stage_task  # noqa: E402
from airflow_provider_mmprep.testing import precache_fixtures as fx  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STAGE = "precache_encodings"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"vae": fx.make_tiny_vae(root / "vae"), "clip": fx.make_tiny_clip_text(root / "clip"),
            "t5": fx.make_tiny_t5(root / "t5")}


def _precache(models, **overrides):
    body = {"batch_size_per_GPU": 3, "dataloader_num_workers": 0, "save_original_in_tar": False,
            "image_size": 64, "encodings": fx.sd_encodings(models["vae"], models["clip"]),
            "lightning": {"devices": 8, "precision": 16}}
    body.update(overrides)
    return body


def _run(tmp_path, input_dir, precache, name="out", task_id=0, task_count=1, **stage):
    config = fx.write_precache_configs(tmp_path / f"conf-{name}", input_dir, tmp_path / name, precache, **stage)
    return run_stage_task(load_config(config), STAGE, task_id, task_count), tmp_path / name


def _members(tar_path):
    with tarfile.open(tar_path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def _pickles(tar_path):
    return {name[: -len(".pickle")]: safe_loads(data) for name, data in _members(tar_path)
            if name.endswith(".pickle")}


def _tree_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def test_sd_config_writes_nemo_layout_shapes_values_and_originals(tmp_path, models):
    shards = fx.write_shards(tmp_path / "in", 2, 5, bad_keys=["000000003"], incomplete_last=2)
    summary, out = _run(tmp_path, tmp_path / "in", _precache(models, save_original_in_tar=True))
    assert summary["encoded_tars"] == 2 and summary["samples"] == 9 and summary["skipped_samples"] == 1
    # one output tar per complete input tar, same names; the .INCOMPLETE shard left alone (NeMo's glob)
    assert sorted(p.name for p in out.iterdir()) == [
        "00000.tar", "00000.tar.manifest.json", "00001.tar", "00001.tar.manifest.json"]
    for shard in shards[:2]:
        inputs = dict(_members(shard))
        outputs = _members(out / shard.name)
        keys = [name.split(".")[0] for name, _ in outputs if name.endswith(".pickle")]
        expected_keys = [n.split(".")[0] for n in inputs if n.endswith(".txt") and n != "000000003.txt"]
        assert keys == expected_keys  # input order, bad sample left out
        # pickle then the originals, byte for byte
        for key in keys:
            names = [name for name, _ in outputs if name.startswith(key + ".")]
            assert names == [f"{key}.pickle", f"{key}.jpg", f"{key}.txt"]
        for name, data in outputs:
            if not name.endswith(".pickle"):
                assert data == inputs[name]
        for record in _pickles(out / shard.name).values():
            assert set(record) == {"autoencoderkl_image", "clip-vit-large-patch14_text"}
            assert record["autoencoderkl_image"].shape == (8, 8, 8)
            assert record["autoencoderkl_image"].dtype == np.float16
            assert record["clip-vit-large-patch14_text"].shape == (80, 32)
            assert record["clip-vit-large-patch14_text"].dtype == np.float32
            assert not record["clip-vit-large-patch14_text"][77:].any()
    manifest = read_manifest(out / "00000.tar")
    assert manifest["sample_count"] == 4 and manifest["source_sample_count"] == 5
    assert manifest["skipped_samples"] == [
        {"key": "000000003", "reason": "UnidentifiedImageError: cannot identify image file"}]
    assert manifest["encodings"] == {
        "autoencoderkl_image": {"shape": [8, 8, 8], "dtype": "float16"},
        "clip-vit-large-patch14_text": {"shape": [80, 32], "dtype": "float32"}}

    # values: NeMo's transform (smallest side to 64 bicubic, centre crop, [-1, 1]) then the encoders
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextModel
    inputs = dict(_members(shards[1]))
    key = "000000006"
    image = Image.open(io.BytesIO(inputs[f"{key}.jpg"])).convert("RGB")
    assert image.size == (64, 96)  # portrait: resized to 64x96 (no-op), crop rows 16..80
    pixels = np.asarray(image)[16:80]
    x = torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    x = (x - 0.5) / 0.5
    vae = AutoencoderKL.from_pretrained(str(models["vae"]))
    expected_image = vae.encode(x).latent_dist.parameters[0].detach().to(torch.float16).numpy()
    tokens = AutoTokenizer.from_pretrained(str(models["clip"]))(
        [inputs[f"{key}.txt"].decode()], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    expected_text = CLIPTextModel.from_pretrained(str(models["clip"]))(tokens["input_ids"]).last_hidden_state[0].detach()
    record = _pickles(out / shards[1].name)[key]
    np.testing.assert_allclose(record["autoencoderkl_image"].astype(np.float32),
                               expected_image.astype(np.float32), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(record["clip-vit-large-patch14_text"][:77], expected_text.numpy(),
                               rtol=1e-5, atol=1e-5)

    # a rerun skips finished tars and changes nothing
    before = _tree_bytes(out)
    again, _ = _run(tmp_path, tmp_path / "in", _precache(models, save_original_in_tar=True))
    assert again["already_done"] == 2 and again["encoded_tars"] == 0
    assert _tree_bytes(out) == before


def test_resize_and_crop_follows_torchvision_arithmetic():
    landscape = Image.new("RGB", (300, 200))
    assert resize_and_crop(landscape, 512, 512).size == (512, 512)
    wide = Image.fromarray(np.tile(np.arange(100, dtype=np.uint8)[None, :, None], (50, 1, 3)))
    cropped = resize_and_crop(wide, 64, 64)  # 100x50 → 128x64, crop columns 32..96
    expected = wide.resize((128, 64), Image.BICUBIC).crop((32, 0, 96, 64))
    assert np.array_equal(np.asarray(cropped), np.asarray(expected))
    odd = Image.new("RGB", (101, 77))  # long side truncated: int(64 * 101 / 77) = 83, left = round(9.5) = 10
    assert resize_and_crop(odd, 64, 48).size == (48, 48)


def test_minilm_encoded_and_mask_stores_only_valid_rows(tmp_path):
    from transformers import AutoModel, AutoTokenizer
    folder = fx.minilm_folder()
    fx.write_shards(tmp_path / "in", 1, 3)
    precache = {"batch_size_per_GPU": 3, "dataloader_num_workers": 1, "image_size": 64, "encodings": [{
        "modality": "text", "extension": "txt", "key": "minilm_text", "precision": 16, "store_pad_tokens": False,
        "encoder_config": {"cls": "airflow_provider_mmprep.encoders.text.TransformersTextEncoder",
                           "from_pretrained": str(folder), "max_length": 32, "return_mask": True}}]}
    summary, out = _run(tmp_path, tmp_path / "in", precache)
    assert summary["samples"] == 3
    captions = {name.split(".")[0]: data.decode() for name, data in _members(tmp_path / "in" / "00000.tar")
                if name.endswith(".txt")}
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    records = _pickles(out / "00000.tar")
    assert list(records) == list(captions)
    for key, record in records.items():
        tokens = tokenizer([captions[key]], return_tensors="pt")
        expected = model(**tokens).last_hidden_state[0].detach().numpy()
        stored = record["minilm_text"]
        assert stored.dtype == np.float16 and stored.shape == (tokens["input_ids"].shape[1], 384)
        np.testing.assert_allclose(stored.astype(np.float32), expected, rtol=1e-2, atol=2e-3)
    manifest = read_manifest(out / "00000.tar")
    assert manifest["encodings"]["minilm_text"] == {"shape": [None, 384], "dtype": "float16",
                                                    "pad_tokens_stored": False}


def test_batch_of_exactly_two_with_pads_stored_and_precision_casting(tmp_path, models):
    fx.write_shards(tmp_path / "in", 1, 2)
    encodings = fx.sd_encodings(models["vae"], models["clip"])
    encodings[0]["precision"], encodings[1]["precision"] = 32, 16  # the other way round from NeMo's file
    encodings.append({"modality": "text", "extension": "txt", "key": "t5_text", "precision": 16,
                      "store_pad_tokens": True,  # T5 returns (enc, mask): pads kept, enc only
                      "encoder_config": {"cls": "nemo.collections.multimodal.modules.imagen.encoder.t5encoder.T5Encoder",
                                         "encoder_path": str(models["t5"]), "max_seq_len": 24}})
    summary, out = _run(tmp_path, tmp_path / "in", _precache(models, batch_size_per_GPU=2, encodings=encodings))
    records = _pickles(out / "00000.tar")
    assert len(records) == 2
    for record in records.values():
        assert record["autoencoderkl_image"].shape == (8, 8, 8)
        assert record["autoencoderkl_image"].dtype == np.float32
        assert record["clip-vit-large-patch14_text"].shape == (80, 32)
        assert record["clip-vit-large-patch14_text"].dtype == np.float16
        assert record["t5_text"].shape == (24, 32) and record["t5_text"].dtype == np.float16


def test_tasks_split_tars_and_any_task_count_gives_the_same_bytes(tmp_path, models):
    fx.write_shards(tmp_path / "in", 3, 2)
    precache = _precache(models, batch_size_per_GPU=2)
    single, single_out = _run(tmp_path, tmp_path / "in", precache, name="single")
    first, split_out = _run(tmp_path, tmp_path / "in", precache, name="split", task_id=0, task_count=2)
    assert first["task_tars"] == 2 and sorted(p.name for p in split_out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    second, _ = _run(tmp_path, tmp_path / "in", precache, name="split", task_id=1, task_count=2)
    assert second["task_tars"] == 1 and second["encoded_tars"] == 1
    assert _tree_bytes(split_out) == _tree_bytes(single_out)


def test_a_resolved_config_encodes_the_same_bytes_as_its_yaml(tmp_path, models):
    """The precache stage reads its blocks (encodings, encoder kwargs, crop size) from a resolved config
    (``mmprep validate --resolved-out``) as it reads them from the validated YAML."""
    from airflow_provider_mmprep.cli import main

    fx.write_shards(tmp_path / "in", 2, 3)
    precache = _precache(models, save_original_in_tar=["text"])
    _, from_yaml = _run(tmp_path, tmp_path / "in", precache, name="yaml")
    config = fx.write_precache_configs(tmp_path / "conf-resolved", tmp_path / "in", tmp_path / "resolved", precache)
    resolved = tmp_path / "resolved.json"
    assert main(["validate", str(config), "--resolved-out", str(resolved), "-q"]) == 0
    assert main(["run", str(resolved), "--stage", STAGE, "--task-id", "0", "--task-count", "1", "-q"]) == 0
    assert _tree_bytes(tmp_path / "resolved") == _tree_bytes(from_yaml) and len(_tree_bytes(from_yaml)) >= 2


def test_incomplete_shard_encoded_only_when_asked(tmp_path, models):
    fx.write_shards(tmp_path / "in", 1, 2, incomplete_last=1)  # the short shard renamed .tar.INCOMPLETE
    summary, out = _run(tmp_path, tmp_path / "in", _precache(models), process_incomplete_tars=True)
    assert summary["encoded_tars"] == 2
    manifest = read_manifest(out / "00001.tar.INCOMPLETE")
    assert manifest["sample_count"] == 1 and manifest["short"] is True


def test_shard_with_an_incomplete_marker_beside_it(tmp_path, models):
    shards = fx.write_shards(tmp_path / "in", 2, 2)
    marker = shards[1].with_name(shards[1].name + ".INCOMPLETE")
    marker.touch()  # how reorganize_tar marks its short last tar
    summary, out = _run(tmp_path, tmp_path / "in", _precache(models))
    assert summary["input_tars"] == 1 and sorted(p.name for p in out.glob("*.tar")) == ["00000.tar"]
    summary, out = _run(tmp_path, tmp_path / "in", _precache(models), name="all", process_incomplete_tars=True)
    assert summary["encoded_tars"] == 2
    assert (out / "00001.tar.INCOMPLETE").read_bytes() == b"" and read_manifest(out / "00001.tar")["short"]
    assert read_manifest(out / "00000.tar")["short"] is False and not (out / "00000.tar.INCOMPLETE").exists()
    marker.unlink()  # reorganize_tar completed the shard on a later run (same bytes here): marker goes
    shards[1].write_bytes(shards[1].read_bytes() + b"\0" * 10240)  # changed input: re-encoded
    summary, out = _run(tmp_path, tmp_path / "in", _precache(models), name="all", process_incomplete_tars=True)
    assert summary["encoded_tars"] == 1 and not (out / "00001.tar.INCOMPLETE").exists()


def test_report_asks_the_stage_which_tars_each_task_owns(tmp_path, models):
    """5 input tars, the last marked short the way reorganize_tar marks it, 2 tasks, every output written:
    task 1 owns 00002-00003 (the marked tar is nobody's), so the report finds nothing to redo. A lister of
    its own (glob *.tar) would give task 1 00004.tar too and call it failed."""
    shards = fx.write_shards(tmp_path / "in", 5, 2)
    shards[4].with_name(shards[4].name + ".INCOMPLETE").touch()
    config = fx.write_precache_configs(tmp_path / "conf", tmp_path / "in", tmp_path / "out",
                                       _precache(models), node_array_size=2)
    cfg = load_config(config)
    for task_id in range(2):
        run_stage_task(cfg, STAGE, task_id, 2)
    assert [p.name for p in precache_encodings.task_inputs(cfg, 1, 2)] == ["00002.tar", "00003.tar"]
    assert precache_encodings.expected_outputs(cfg, 1, 2) == [tmp_path / "out" / "00002.tar",
                                                              tmp_path / "out" / "00003.tar"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == [f"{j:05d}.tar" for j in range(4)]
    assert precache_encodings.incomplete_tasks(cfg, 2) == {}
    page = build_report_html(cfg)
    assert "No failed or missing tasks found." in page and "task(s) to redo" not in page
    assert "00004.tar" not in page and "--stage precache_encodings" not in page

    (tmp_path / "out" / "00003.tar").unlink()  # an output lost: exactly its task is to redo
    assert precache_encodings.incomplete_tasks(cfg, 2) == {1: "input 00003.tar has no finished output tar"}
    page = build_report_html(cfg)
    assert "1 task(s) to redo: 1" in page
    assert "--stage precache_encodings --task-id 1 --task-count 2" in page


def test_changed_encodings_redo_finished_tars(tmp_path, models):
    fx.write_shards(tmp_path / "in", 1, 2)
    _run(tmp_path, tmp_path / "in", _precache(models))
    encodings = fx.sd_encodings(models["vae"], models["clip"])[:1]
    summary, out = _run(tmp_path, tmp_path / "in", _precache(models, encodings=encodings))
    assert summary["encoded_tars"] == 1
    assert set(next(iter(_pickles(out / "00000.tar").values()))) == {"autoencoderkl_image"}


def test_refused_encoder_and_bad_output_are_stage_errors(tmp_path, models):
    fx.write_shards(tmp_path / "in", 1, 2)
    config = load_config(fx.write_precache_configs(tmp_path / "conf", tmp_path / "in", tmp_path / "out",
                                                   _precache(models)))
    # a PrecacheConfig built without the loader's check is still refused when the encoder is built
    evil = _precache(models, encodings=[{"modality": "text", "extension": "txt", "key": "x",
                                         "encoder_config": {"cls": "os.system"}}])
    with pytest.raises(StageError, match=r"encodings\.0\.encoder_config.*os\.system.*allowed"):
        run_stage_task(config.model_copy(update={"precache": PrecacheConfig.model_validate(evil)}), STAGE, 0, 1)
    no_mask = fx.sd_encodings(models["vae"], models["clip"])
    no_mask[1]["store_pad_tokens"] = False  # CLIP returns a tensor, not (encoded, mask)
    with pytest.raises(StageError, match=r"encodings\.1 .*not a tuple \(encoded, mask\)"):
        run_stage_task(config.model_copy(update={"precache": PrecacheConfig.model_validate(
            _precache(models, encodings=no_mask))}), STAGE, 0, 1)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tar")]
    from airflow_provider_mmprep.config import BUNDLED_LAUNCHER_SCRIPTS_PATH, load_precache_config
    nemo_file = load_precache_config(
        BUNDLED_LAUNCHER_SCRIPTS_PATH / "conf/data_preparation/multimodal/precache_sd.yaml")
    with pytest.raises(StageError, match=r"encodings\.0\.encoder_config: cannot build .*AutoencoderKL.*"
                                         r"from_pretrained: /path/to/vae\.bin is neither a folder nor a file"):
        run_stage_task(config.model_copy(update={"precache": nemo_file.model_copy(update={"device": "cpu"})}),
                       STAGE, 0, 1)
    same = load_config(fx.write_precache_configs(tmp_path / "conf2", tmp_path / "in", tmp_path / "in",
                                                 _precache(models)))
    with pytest.raises(StageError, match="output_dir: must differ from input_dir"):
        run_stage_task(same, STAGE, 0, 1)
    missing = load_config(fx.write_precache_configs(tmp_path / "conf3", tmp_path / "nope", tmp_path / "o",
                                                    _precache(models)))
    with pytest.raises(StageError, match="input_dir: folder not found"):
        run_stage_task(missing, STAGE, 0, 1)


def test_output_reads_with_webdataset_and_the_numpy_only_unpickler(tmp_path, models):
    import webdataset as wds
    fx.write_shards(tmp_path / "in", 2, 3)
    _, out = _run(tmp_path, tmp_path / "in", _precache(models, save_original_in_tar=["text"]))
    urls = [str(p) for p in sorted(out.glob("*.tar"))]
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode(
        wds.handle_extension("pickle", safe_loads))
    samples = list(dataset)
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(6)]
    for sample in samples:
        assert set(sample) >= {"pickle", "txt"} and "jpg" not in sample
        assert sample["pickle"]["autoencoderkl_image"].shape == (8, 8, 8)


def test_multiple_worker_processes_give_the_same_output(tmp_path, models):
    """The one-process-per-GPU path, exercised with two CPU processes."""
    fx.write_shards(tmp_path / "in", 3, 2)
    precache = _precache(models, batch_size_per_GPU=2, dataloader_num_workers=1)
    _, single_out = _run(tmp_path, tmp_path / "in", precache, name="single")
    summary, multi_out = _run(tmp_path, tmp_path / "in", {**precache, "device": "cpu", "worker_processes": 2},
                              name="multi")
    assert summary["devices"] == ["cpu", "cpu"] and summary["encoded_tars"] == 3
    assert _tree_bytes(multi_out) == _tree_bytes(single_out)


def test_resume_after_sigkill_equals_a_clean_run(tmp_path, models):
    fx.write_shards(tmp_path / "in", 5, 2)
    encodings = fx.sd_encodings(models["vae"], models["clip"])
    encodings.append({"modality": "image", "extension": "jpg", "key": "slow", "precision": 32,
                      "encoder_config": {"cls": "airflow_provider_mmprep.testing.precache_fixtures.SleepyEncoder",
                                         "delay": 0.25}})
    precache = _precache(models, batch_size_per_GPU=1, encodings=encodings, save_original_in_tar=True)
    config = fx.write_precache_configs(tmp_path / "conf", tmp_path / "in", tmp_path / "out", precache)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "airflow_provider_mmprep.cli", "run", str(config),
                                "--stage", STAGE, "--task-id", "0", "--task-count", "1"], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "out"
    deadline = time.monotonic() + 120
    while not (out / "00000.tar.manifest.json").exists():
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = sorted(p.name for p in out.glob("*.tar"))
    assert "00000.tar" in finished and len(finished) < 5  # interrupted part-way
    summary, _ = _run(tmp_path, tmp_path / "in", precache, name="out")
    assert summary["already_done"] == len(finished) and summary["encoded_tars"] == 5 - len(finished)
    _, clean = _run(tmp_path, tmp_path / "in", precache, name="clean")
    assert _tree_bytes(out) == _tree_bytes(clean)  # no temporaries left, same bytes


@pytest.mark.parametrize("claimed", [1, 9])
def test_a_wrong_upstream_manifest_count_loses_or_invents_no_sample(tmp_path, models, claimed):
    from airflow_provider_mmprep.manifest import write_manifest
    shards = fx.write_shards(tmp_path / "in", 1, 5)
    write_manifest(shards[0], claimed)  # reorganize_tar's count is used to plan batches, not trusted blindly
    summary, out = _run(tmp_path, tmp_path / "in", _precache(models, batch_size_per_GPU=2))
    assert summary["samples"] == 5
    assert list(_pickles(out / "00000.tar")) == [f"{i:09d}" for i in range(5)]
    assert read_manifest(out / "00000.tar")["source_sample_count"] == 5


def _children(pid):
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_encoder_processes_exit_when_their_task_is_killed(tmp_path, models):
    fx.write_shards(tmp_path / "in", 4, 6)  # 12 one-second batches per process: far from done when killed
    encodings = [{"modality": "image", "extension": "jpg", "key": "slow", "precision": 32,
                  "encoder_config": {"cls": "airflow_provider_mmprep.testing.precache_fixtures.SleepyEncoder",
                                     "delay": 1.0}}]
    precache = _precache(models, batch_size_per_GPU=1, encodings=encodings, device="cpu", worker_processes=2)
    config = fx.write_precache_configs(tmp_path / "conf", tmp_path / "in", tmp_path / "out", precache)
    process = subprocess.Popen([sys.executable, "-m", "airflow_provider_mmprep.cli", "run", str(config),
                                "--stage", STAGE, "--task-id", "0", "--task-count", "1"], cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "out"
    deadline = time.monotonic() + 120
    # wait until the encoder processes are encoding (a temporary tar exists)
    while not any(p.name.endswith(".mmprep-tmp") for p in out.glob(".*")) if out.is_dir() else True:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    encoders = [c for c in _children(process.pid) if "spawn" in Path(f"/proc/{c}/cmdline").read_text()]
    assert len(encoders) == 2
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 6
    while any(Path(f"/proc/{c}").exists() and "Z" not in Path(f"/proc/{c}/stat").read_text().split()[2]
              for c in encoders):
        assert time.monotonic() < deadline, "encoder processes outlived their killed task"
        time.sleep(0.1)


def test_a_failed_writer_surfaces_in_the_encoding_loop_instead_of_blocking_it(tmp_path: Path) -> None:
    """The writer dies on its first tar (its folder is gone); the producer must get the error, not hang on a
    full queue, and nothing may be left behind."""
    from airflow_provider_mmprep.precache.writer import EncodedBatch, TarOutput, TarWriterThread

    source = tmp_path / "in.tar"
    source.write_bytes(b"")
    output = TarOutput(source, tmp_path / "missing" / "out.tar", originals=())
    writer = TarWriterThread([output], on_tar_done=lambda info: None, depth=1)

    def batch(last: bool) -> EncodedBatch:
        return EncodedBatch(0, last, kept=[], bad=[], arrays={}, masks={})

    started = time.monotonic()
    with pytest.raises(RuntimeError, match="precache writer failed"):
        for _ in range(10):  # more batches than the queue holds
            writer.put(batch(False))
    with pytest.raises(RuntimeError, match="precache writer failed"):
        writer.close()
    assert time.monotonic() - started < 10
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_truncated_input_tar_fails_the_task_and_names_it(tmp_path, models, workers):
    shards = fx.write_shards(tmp_path / "in", 2, 4)
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])  # cut mid-member; no manifest, so its headers are read
    with pytest.raises(StageError, match=r"unreadable shard: 00001.tar is damaged: member '.*' truncated"):
        _run(tmp_path, tmp_path / "in", _precache(models, dataloader_num_workers=workers))
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    if workers == 0:  # in-process reading goes tar by tar: the first was finished before the second was read
        assert left == ["00000.tar", "00000.tar.manifest.json"]
    assert set(left) <= {"00000.tar", "00000.tar.manifest.json"}  # never a partial output


def test_a_member_name_climbing_out_is_refused(tmp_path, models):
    fx.write_shards(tmp_path / "in", 1, 2)
    with tarfile.open(tmp_path / "in" / "00000.tar", "a") as tar:
        info = tarfile.TarInfo("../escape.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(StageError, match=r"member '\.\./escape\.jpg' is absolute or contains '\.\.'"):
        _run(tmp_path, tmp_path / "in", _precache(models))
