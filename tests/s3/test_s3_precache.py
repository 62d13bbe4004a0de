"""precache_encodings reading input tars from s3:// and/or writing its outputs there (a real S3 server), with
tiny local models: every output file (tars, manifests, ``.INCOMPLETE`` markers) byte-identical to the local
run's, in rounds of spooled tars; reruns skip; the stage's layout answers see the S3 outputs; an unfinished
upload left by a killed run is removed and nothing but finished outputs sits at final names."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from airflow_provider_mmprep.config import load_config  # noqa: E402
from airflow_provider_mmprep.stages import precache_encodings, run_stage_task  # noqa: E402
from airflow_provider_mmprep.storage import Store  # noqa: E402
from airflow_provider_mmprep.testing import precache_fixtures as fx  # noqa: E402
from airflow_provider_mmprep.testing.s3_server import SeaweedS3  # noqa: E402

STAGE = "precache_encodings"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"vae": fx.make_tiny_vae(root / "vae"), "clip": fx.make_tiny_clip_text(root / "clip")}


def precache(models) -> dict:
    return {"batch_size_per_GPU": 2, "dataloader_num_workers": 0, "save_original_in_tar": ["image"],
            "image_size": 64, "encodings": fx.sd_encodings(models["vae"], models["clip"]),
            "lightning": {"devices": 1, "precision": 16}}


def config(tmp_path: Path, name: str, input_dir: str, output_dir: str, body: dict):
    path = fx.write_precache_configs(tmp_path / f"conf-{name}", input_dir, output_dir, body,
                                     process_incomplete_tars=True)
    return load_config(path)


def local_tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def store_tree(url: str) -> dict[str, bytes]:
    store = Store(url)
    return {name: store.read_bytes(name) for name in store.list_files()}


def test_outputs_on_s3_are_the_local_runs_bytes(tmp_path: Path, models, s3_env: SeaweedS3, s3_bucket: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    shards = fx.write_shards(tmp_path / "in", 5, 3)
    shards[-1].with_name(shards[-1].name + ".INCOMPLETE").touch()  # reorganize_tar's short last tar
    body = precache(models)
    reference = tmp_path / "reference"
    run_stage_task(config(tmp_path, "ref", str(tmp_path / "in"), str(reference), body), STAGE, 0, 1)
    expected = local_tree(reference)
    assert "00004.tar.INCOMPLETE" in expected and "00003.tar.manifest.json" in expected and len(expected) == 11

    s3_env.filesystem().put(f"{tmp_path / 'in'}/", f"{s3_bucket}/in", recursive=True)
    monkeypatch.setattr(precache_encodings, "SPOOL_TARS_PER_DEVICE", 2)  # three rounds of spooled tars
    cases = [("s3->s3", f"s3://{s3_bucket}/in", f"s3://{s3_bucket}/out"),
             ("local->s3", str(tmp_path / "in"), f"s3://{s3_bucket}/out2"),
             ("s3->local", f"s3://{s3_bucket}/in", str(tmp_path / "out3"))]
    for where, source, target in cases:
        cfg = config(tmp_path, where.replace(">", ""), source, target, body)
        first = run_stage_task(cfg, STAGE, 0, 2)
        second = run_stage_task(cfg, STAGE, 1, 2)
        assert first["encoded_tars"] + second["encoded_tars"] == 5, where
        got = store_tree(target) if target.startswith("s3://") else local_tree(Path(target))
        assert got == expected, where  # tars, manifests and the marker, byte for byte
        again = run_stage_task(cfg, STAGE, 0, 1)
        assert again["encoded_tars"] == 0 and again["already_done"] == 5, where
        assert precache_encodings.incomplete_tasks(cfg, 2) == {}, where
        finished, unlisted = precache_encodings.finished_outputs(cfg)
        assert sorted(t.name for t in finished) == [f"{i:05d}.tar" for i in range(5)] and unlisted == []
        assert precache_encodings.output_state(cfg).marked == ["00004.tar"]
        assert not precache_encodings.spool_folder(target).exists()


def test_a_killed_runs_upload_is_removed_and_the_tar_redone(tmp_path: Path, models, s3_env: SeaweedS3,
                                                            s3_bucket: str) -> None:
    fx.write_shards(tmp_path / "in", 2, 3)
    body = precache(models)
    run_stage_task(config(tmp_path, "ref", str(tmp_path / "in"), str(tmp_path / "ref"), body), STAGE, 0, 1)
    url = f"s3://{s3_bucket}/out"
    cfg = config(tmp_path, "s3", str(tmp_path / "in"), url, body)
    run_stage_task(cfg, STAGE, 0, 1)
    store = Store(url)
    fs = store.fs
    # what a SIGKILL in the middle of 00001.tar's upload leaves: its manifest never written (the old output
    # gone with it: a tar being redone loses its manifest first), an unfinished multipart upload at its name
    store.remove("00001.tar.manifest.json")
    store.remove("00001.tar")
    upload = fs.call_s3("create_multipart_upload", Bucket=s3_bucket, Key="out/00001.tar")
    fs.call_s3("upload_part", Bucket=s3_bucket, Key="out/00001.tar", UploadId=upload["UploadId"], PartNumber=1,
               Body=b"x" * (5 * 2**20))
    assert precache_encodings.incomplete_tasks(cfg, 1) == {0: "input 00001.tar has no finished output tar"}
    rerun = run_stage_task(cfg, STAGE, 0, 1)
    assert rerun["already_done"] == 1 and rerun["encoded_tars"] == 1
    assert store_tree(url) == local_tree(tmp_path / "ref")
    assert fs.list_multipart_uploads(s3_bucket) == []


def test_inputs_in_s3_are_read_in_ranges_never_whole(tmp_path: Path, models, s3_env: SeaweedS3, s3_bucket: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Input tars with manifests naming their member offsets (as download_images and reorganize_tar write
    them) are indexed from the offsets and read as ranged reads of each batch's members, in forked DataLoader
    workers too: no input is ever opened for a whole read; outputs equal the local run's."""
    from airflow_provider_mmprep.manifest import write_manifest
    from airflow_provider_mmprep.tarindex import offsets_of

    for tar in fx.write_shards(tmp_path / "in", 3, 5):
        write_manifest(tar, 5, member_offsets=offsets_of(tar), source="test")
    body = {**precache(models), "dataloader_num_workers": 2}
    run_stage_task(config(tmp_path, "ref", str(tmp_path / "in"), str(tmp_path / "ref"), body), STAGE, 0, 1)
    expected = local_tree(tmp_path / "ref")
    s3_env.filesystem().put(f"{tmp_path / 'in'}/", f"{s3_bucket}/in", recursive=True)

    real_open_read = Store.open_read

    def open_read(self: Store, name: str, **kwargs):
        if name.endswith(".tar"):
            raise AssertionError(f"{self.url(name)} opened for a whole read")
        return real_open_read(self, name, **kwargs)

    monkeypatch.setattr(Store, "open_read", open_read)
    target = f"s3://{s3_bucket}/out"
    cfg = config(tmp_path, "s3", f"s3://{s3_bucket}/in", target, body)
    assert sum(run_stage_task(cfg, STAGE, t, 2)["encoded_tars"] for t in range(2)) == 3
    assert store_tree(target) == expected
