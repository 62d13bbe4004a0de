"""Built-in encoders, the allow-list, NeMo class-path aliases and output interpretation (tiny local models)."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from airflow_provider_mmprep.config import ConfigError, EncodingSpec, load_precache_config  # noqa: E402
from airflow_provider_mmprep.encoders import (  # noqa: E402
    NEMO_ALIASES, EncoderRefused, build_encoder, check_allowed)
from airflow_provider_mmprep.encoders.autoencoder_kl import AutoencoderKLImageEncoder  # noqa: E402
from airflow_provider_mmprep.encoders.text import CLIPTextEncoder, T5TextEncoder  # noqa: E402
from airflow_provider_mmprep.precache.engine import EncoderOutputError, interpret_output  # noqa: E402
from airflow_provider_mmprep.testing import precache_fixtures as fx  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NEMO_OLD_VAE = "nemo.collections.multimodal.models.stable_diffusion.ldm.autoencoder.AutoencoderKL"
DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"vae": fx.make_tiny_vae(root / "vae"), "clip": fx.make_tiny_clip_text(root / "clip"),
            "t5": fx.make_tiny_t5(root / "t5"), "root": root}


def _images(count=2, size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, size, size, generator=generator) * 2 - 1


# --- allow-list -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["os.system", "builtins.eval", "subprocess.Popen", "nemo_evil.X",
                                  "torch.load", "torchvision.models.resnet50", "system"])
def test_allow_list_refuses_other_modules(path):
    with pytest.raises(EncoderRefused, match="allowed_encoder_modules"):
        check_allowed(path)
    with pytest.raises(EncoderRefused):
        build_encoder(path, {})


def test_allow_list_refusal_names_the_key_path_at_load(tmp_path):
    config = tmp_path / "precache.yaml"
    config.write_text("encodings:\n  - {modality: image, extension: jpg, key: a, encoder_config: "
                      "{cls: airflow_provider_mmprep.encoders.text.CLIPTextEncoder, version: x}}\n"
                      "  - {modality: text, extension: txt, key: b, encoder_config: {cls: os.system}}\n")
    with pytest.raises(ConfigError) as caught:
        load_precache_config(config)
    assert caught.value.problems == [
        f"{config}: encodings.1.encoder_config.cls: 'os.system' is not in an allowed module "
        "(airflow_provider_mmprep., nemo.collections., diffusers., transformers., open_clip., torch.nn.); "
        "to trust another module add its prefix to allowed_encoder_modules in the precache YAML"]


def test_trust_remote_code_is_refused(tmp_path):
    config = tmp_path / "precache.yaml"
    config.write_text("encodings:\n  - {modality: text, extension: txt, key: b, encoder_config: "
                      "{cls: transformers.pipeline, task: feature-extraction, trust_remote_code: true}}\n")
    with pytest.raises(ConfigError, match=r"encodings\.0\.encoder_config\.trust_remote_code: .*not allowed"):
        load_precache_config(config)
    with pytest.raises(EncoderRefused):
        build_encoder("transformers.pipeline", {"trust_remote_code": True})


def test_allow_list_is_extendable_from_the_config(tmp_path):
    config = tmp_path / "precache.yaml"
    config.write_text("allowed_encoder_modules: [collections.]\nencodings:\n"
                      "  - {modality: text, extension: txt, key: b, encoder_config: {cls: collections.OrderedDict}}\n")
    precache = load_precache_config(config)
    spec = precache.encodings[0]
    built = build_encoder(spec.encoder_config.cls, {"a": 1}, precache.allowed_encoder_modules)
    assert dict(built) == {"a": 1}
    with pytest.raises(EncoderRefused):
        build_encoder(spec.encoder_config.cls, {})  # without the config's extension


def test_config_and_encoders_package_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['diffusers'] = None; "
            "sys.modules['transformers'] = None\n"
            "import airflow_provider_mmprep.config, airflow_provider_mmprep.encoders\n"
            "import airflow_provider_mmprep.stages.precache_encodings\n"
            "from airflow_provider_mmprep.config import load_precache_config\n"
            f"load_precache_config({str(REPO / 'airflow_provider_mmprep/launcher_conf/conf/data_preparation/multimodal/precache_sd.yaml')!r})\n"
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# --- NeMo class paths --------------------------------------------------------------------------------------

def test_nemo_class_paths_resolve_to_builtins_with_their_kwargs(models, caplog):
    images = _images()
    reference = AutoencoderKLImageEncoder(from_pretrained=str(models["vae"])).encode(images).parameters
    caplog.set_level(logging.INFO, logger="airflow_provider_mmprep.encoders")
    for path in (fx.NEMO_VAE, NEMO_OLD_VAE):
        vae = build_encoder(path, {"from_pretrained": str(models["vae"]), "embed_dim": 4, "ddconfig": DDCONFIG,
                                   "double_z": True})
        assert isinstance(vae, AutoencoderKLImageEncoder)
        torch.testing.assert_close(vae.encode(images).parameters, reference, rtol=0, atol=0)
    clip = build_encoder(fx.NEMO_CLIP, {"version": str(models["clip"]), "device": "cuda", "max_length": 16})
    assert isinstance(clip, CLIPTextEncoder) and clip.max_length == 16
    assert clip.encode(["a red cat"]).shape == (1, 16, 32)  # 16 is a multiple of 8: no pad rows
    logged = [r.getMessage() for r in caplog.records]
    for path in (fx.NEMO_VAE, NEMO_OLD_VAE, fx.NEMO_CLIP):
        assert any(path in line and NEMO_ALIASES[path] in line for line in logged)


def test_vae_single_checkpoint_file_with_diffusers_names_matches_folder(models, tmp_path):
    from diffusers import AutoencoderKL
    reference_model = AutoencoderKL.from_pretrained(str(models["vae"]))
    checkpoint = tmp_path / "vae.bin"  # NeMo's from_pretrained: diffusers-named weights in one file
    torch.save(reference_model.state_dict(), checkpoint)
    images = _images()
    expected = reference_model.encode(images).latent_dist.parameters
    from_file = build_encoder(fx.NEMO_VAE, {"from_pretrained": str(checkpoint), "ddconfig": DDCONFIG,
                                            "embed_dim": 4})
    torch.testing.assert_close(from_file.encode(images).parameters, expected, rtol=0, atol=0)
    assert expected.shape == (2, 8, 8, 8)  # mean and logvar, 4 channels each, H/8


def _to_ldm_names(state: dict) -> dict:
    """diffusers VAE names → the original LDM names (what CompVis/NeMo checkpoints hold)."""
    out = {}
    for name, value in state.items():
        new = name
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", r"encoder.down.\1.downsample.conv", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)", lambda m: f"decoder.up.{3 - int(m.group(1))}", new)
        new = re.sub(r"(decoder\.up\.\d+)\.resnets\.(\d+)", r"\1.block.\2", new)
        new = re.sub(r"(decoder\.up\.\d+)\.upsamplers\.0\.conv", r"\1.upsample.conv", new)
        new = new.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        new = new.replace("mid_block.attentions.0.group_norm", "mid.attn_1.norm")
        for ours, theirs in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            new = new.replace(f"mid_block.attentions.0.{ours}", f"mid.attn_1.{theirs}")
        new = new.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if "mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out["first_stage_model." + new] = value
    return out


def test_vae_single_checkpoint_file_with_original_ldm_names(models, tmp_path):
    from diffusers import AutoencoderKL
    reference_model = AutoencoderKL.from_pretrained(str(models["vae"]))
    checkpoint = tmp_path / "model.ckpt"
    torch.save({"state_dict": _to_ldm_names(reference_model.state_dict())}, checkpoint)
    images = _images()
    encoder = AutoencoderKLImageEncoder(from_pretrained=str(checkpoint), ddconfig=DDCONFIG, embed_dim=4)
    torch.testing.assert_close(encoder.encode(images).parameters,
                               reference_model.encode(images).latent_dist.parameters, rtol=1e-5, atol=1e-5)


def test_vae_checkpoint_not_matching_ddconfig_is_refused(models, tmp_path):
    from diffusers import AutoencoderKL
    checkpoint = tmp_path / "vae.bin"
    torch.save(AutoencoderKL.from_pretrained(str(models["vae"])).state_dict(), checkpoint)
    with pytest.raises(ValueError, match="does not match ddconfig"):
        AutoencoderKLImageEncoder(from_pretrained=str(checkpoint), ddconfig={**DDCONFIG, "ch": 64}, embed_dim=4)


def test_vae_force_upcast_keeps_float32(tmp_path):
    folder = fx.make_tiny_vae(tmp_path / "vae", force_upcast=True)
    encoder = AutoencoderKLImageEncoder(from_pretrained=str(folder)).mmprep_to(torch.device("cpu"), torch.float16)
    assert encoder.dtype == torch.float32
    plain = AutoencoderKLImageEncoder(from_pretrained=str(folder), upcast=False)
    assert plain.mmprep_to(torch.device("cpu"), torch.bfloat16).dtype == torch.bfloat16


# --- text encoders -----------------------------------------------------------------------------------------

def test_clip_is_last_hidden_state_at_77_padded_to_80_rows(models):
    from transformers import AutoTokenizer, CLIPTextModel
    texts = ["a red cat on the beach", "dog"]
    encoder = CLIPTextEncoder(version=str(models["clip"]), max_length=77)
    encoded = encoder.encode(texts)
    assert encoded.shape == (2, 80, 32)
    assert torch.count_nonzero(encoded[:, 77:]) == 0
    tokens = AutoTokenizer.from_pretrained(str(models["clip"]))(texts, padding="max_length", max_length=77,
                                                                  truncation=True, return_tensors="pt")
    expected = CLIPTextModel.from_pretrained(str(models["clip"]))(input_ids=tokens["input_ids"]).last_hidden_state
    torch.testing.assert_close(encoded[:, :77], expected)
    # tokenized in a worker, encoded later: same result
    torch.testing.assert_close(encoder.encode(encoder.text_preprocessor(texts)), encoded)


def test_t5_tokenized_at_max_seq_len_equals_512_then_truncated(models):
    texts = ["a small house with a tree", "city at night"]
    short = T5TextEncoder(max_seq_len=16, encoder_path=str(models["t5"]))
    full = T5TextEncoder(max_seq_len=512, encoder_path=str(models["t5"]))
    encoded, mask = short.encode(texts)
    long_encoded, long_mask = full.encode(texts)
    assert encoded.shape == (2, 16, 32) and mask.shape == (2, 16)
    torch.testing.assert_close(mask, long_mask[:, :16])
    torch.testing.assert_close(encoded, long_encoded[:, :16], rtol=1e-4, atol=1e-5)
    assert torch.count_nonzero(encoded[mask == 0]) == 0  # pad rows zeroed as NeMo does


# --- output interpretation ------------------------------------------------------------------------------

def _spec(**overrides):
    base = {"modality": "text", "extension": "txt", "key": "k", "encoder_config": {"cls": "torch.nn.Identity"}}
    return EncodingSpec.model_validate({**base, **overrides})


def test_a_batch_of_two_tensors_is_not_mistaken_for_encoded_and_mask():
    batch_of_two = torch.randn(2, 5, 3)  # len() == 2, like an (encoded, mask) pair
    encoded, mask = interpret_output(batch_of_two, _spec(store_pad_tokens=True))
    assert mask is None and encoded is batch_of_two
    with pytest.raises(EncoderOutputError, match="not a tuple"):
        interpret_output(batch_of_two, _spec(store_pad_tokens=False))
    pair = (torch.randn(2, 5, 3), torch.ones(2, 5))
    encoded, mask = interpret_output(pair, _spec(store_pad_tokens=False))
    assert encoded is pair[0] and mask is pair[1]
    encoded, mask = interpret_output(pair, _spec(store_pad_tokens=True))  # keep pads: the encoded part only
    assert encoded is pair[0] and mask is None


def test_gaussian_output_is_stored_as_its_parameters(models):
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(str(models["vae"]))
    images = _images()
    spec = _spec(modality="image", extension="jpg")
    for output in (vae.encode(images), vae.encode(images).latent_dist):
        encoded, mask = interpret_output(output, spec)
        assert mask is None and encoded.shape == (2, 8, 8, 8)
        torch.testing.assert_close(encoded[:, :4], vae.encode(images).latent_dist.mean)


def test_clip_l_width_gives_nemo_shape_80_by_768(tmp_path):
    folder = fx.make_tiny_clip_text(tmp_path / "clip-l", hidden=768, layers=1)
    encoded = build_encoder(fx.NEMO_CLIP, {"version": str(folder), "max_length": 77}).encode(["a cat", "dog"])
    assert encoded.shape == (2, 80, 768) and encoded.dtype == torch.float32


def test_devices_follow_visible_gpus_lightning_devices_and_worker_processes(monkeypatch):
    from airflow_provider_mmprep.config import PrecacheConfig
    from airflow_provider_mmprep.stages import StageError
    from airflow_provider_mmprep.stages.precache_encodings import plan_devices

    def precache(**extra):
        return PrecacheConfig.model_validate({"encodings": [{"modality": "text", "extension": "txt", "key": "k",
                                                             "encoder_config": {"cls": "torch.nn.Identity"}}],
                                              **extra})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert plan_devices(precache()) == ["cpu"]
    assert plan_devices(precache(worker_processes=2)) == ["cpu", "cpu"]
    with pytest.raises(StageError, match="precache.device"):
        plan_devices(precache(device="cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert plan_devices(precache()) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert plan_devices(precache(lightning={"devices": 8})) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert plan_devices(precache(lightning={"devices": 2})) == ["cuda:0", "cuda:1"]
    assert plan_devices(precache(device="cpu")) == ["cpu"]
