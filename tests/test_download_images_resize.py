"""Image checks and transforms of download_images: documented sizes, EXIF, alpha, formats, limits."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from airflow_provider_mmprep.download.fetcher import address_refusal, robots_disallowed
from airflow_provider_mmprep.download.options import parse_options
from airflow_provider_mmprep.download.resizer import ImageRejected, process_image
from airflow_provider_mmprep.testing import sample_data
from airflow_provider_mmprep.testing.image_host import decompression_bomb_png


def options(**arguments):
    return parse_options(arguments)


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize(("mode", "source", "expected"), [
    ("no", (300, 200), (300, 200)),
    ("keep_ratio", (300, 200), (150, 100)),
    ("keep_ratio", (60, 40), (150, 100)),  # upscaled unless resize_only_if_bigger
    ("center_crop", (300, 200), (100, 100)),
    ("center_crop", (200, 300), (100, 100)),
    ("keep_ratio_largest", (300, 200), (100, 67)),
    ("keep_ratio_largest", (200, 300), (67, 100)),
    ("border", (300, 200), (100, 100)),
    ("border", (100, 100), (100, 100)),
])
def test_resize_modes_give_documented_sizes(mode: str, source: tuple[int, int], expected: tuple[int, int]) -> None:
    body = sample_data.make_jpeg(1, source)
    result = process_image(body, options(resize_mode=mode, image_size=100))
    assert decoded(result.data).size == expected == (result.width, result.height)
    assert (result.original_width, result.original_height) == source


def test_resize_only_if_bigger_keeps_small_images_and_their_bytes() -> None:
    body = sample_data.make_jpeg(2, (60, 40))
    result = process_image(body, options(resize_mode="center_crop", image_size=100, resize_only_if_bigger=True))
    assert result.data == body and (result.width, result.height) == (60, 40)


def test_border_pads_with_white_around_the_centred_image() -> None:
    body = sample_data.encode(Image.new("RGB", (200, 100), (0, 0, 0)), "PNG")
    image = decoded(process_image(body, options(resize_mode="border", image_size=100, encode_format="png")).data)
    assert image.size == (100, 100)
    assert image.getpixel((50, 5)) == (255, 255, 255) and image.getpixel((50, 50)) == (0, 0, 0)


def test_skip_reencode_semantics() -> None:
    body = sample_data.make_jpeg(3, (120, 80))
    assert process_image(body, options()).data == body  # unset: unchanged image keeps its bytes
    assert process_image(body, options(skip_reencode=True)).data == body
    reencoded = process_image(body, options(skip_reencode=False, encode_quality=40)).data
    assert reencoded != body and decoded(reencoded).size == (120, 80)


def test_exif_orientation_is_applied_when_reencoding() -> None:
    image = Image.new("RGB", (200, 100), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 100, 100))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers rotate 90° clockwise
    body = sample_data.encode(image, "JPEG", quality=95, exif=exif.tobytes())
    result = process_image(body, options())
    upright = decoded(result.data)
    assert upright.size == (100, 200) and (result.original_width, result.original_height) == (100, 200)
    red, green, blue = upright.getpixel((50, 30))  # the red half is now on top
    assert red > 200 and blue < 60
    assert upright.getexif().get(0x0112, 1) == 1


def test_alpha_is_composited_on_white_and_formats_are_honoured() -> None:
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))  # fully transparent red
    body = sample_data.encode(rgba, "PNG")
    jpg = decoded(process_image(body, options()).data)
    assert jpg.format == "JPEG" and min(jpg.getpixel((5, 5))) > 245
    webp = decoded(process_image(body, options(encode_format="webp")).data)
    assert webp.format == "WEBP"


@pytest.mark.parametrize(("body", "reason"), [
    (decompression_bomb_png(), "decompression bomb"),
    (sample_data.make_jpeg(4, (64, 48))[:900], "truncated"),
    (b"<html>not an image</html>", "not an image"),
    (sample_data.make_jpeg(5, (30, 20)), "image too small"),
    (sample_data.make_jpeg(6, (200, 20)), "aspect ratio too large"),
])
def test_bad_images_are_rejected_with_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(ImageRejected, match=reason):
        process_image(body, options(min_image_size=20 if reason != "image too small" else 25,
                                    max_aspect_ratio=5))


def test_pixel_limit_is_checked_from_the_header() -> None:
    body = sample_data.make_jpeg(7, (300, 200))
    with pytest.raises(ImageRejected, match="max_image_pixels"):
        process_image(body, parse_options({}, max_image_pixels=50_000))


def test_robots_and_address_rules() -> None:
    disallowed = ("noai", "noimageai", "noindex", "noimageindex")
    assert robots_disallowed(["noai, noimageai"], disallowed, "mmprep") == "noai"
    assert robots_disallowed(["otherbot: noindex"], disallowed, "mmprep") is None
    assert robots_disallowed(["mmprep: noindex"], disallowed, "mmprep") == "noindex"
    assert robots_disallowed(["nofollow"], disallowed, "mmprep") is None
    assert robots_disallowed(["noai"], (), "mmprep") is None
    for address, kind in [("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("169.254.169.254", "link-local"),
                          ("224.0.0.1", "multicast"), ("::1", "loopback"), ("::ffff:192.168.0.1", "private")]:
        assert address_refusal(address) == kind, address
    assert address_refusal("93.184.216.34") is None


@pytest.mark.parametrize(("address", "kind"), [
    ("100.100.100.200", "shared (carrier-grade NAT)"),  # a cloud metadata address; is_private is False for it
    ("100.64.0.1", "shared (carrier-grade NAT)"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("192.0.2.7", "private"), ("198.18.0.1", "private"), ("240.0.0.1", "reserved"),
    ("fd12::1", "private"), ("fe80::1%eth0", "link-local"),
    ("64:ff9b::a9fe:a9fe", "link-local (IPv4 169.254.169.254 embedded)"),  # NAT64
    ("64:ff9b::a00:1", "private (IPv4 10.0.0.1 embedded)"),
    ("64:ff9b::6464:64c8", "shared (carrier-grade NAT) (IPv4 100.100.100.200 embedded)"),
    ("2002:a9fe:a9fe::1", "link-local (IPv4 169.254.169.254 embedded)"),  # 6to4
    ("2002:7f00:1::", "loopback (IPv4 127.0.0.1 embedded)"),
    ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "private (IPv4 10.0.0.1 embedded)"),  # Teredo client
    ("::ffff:100.100.100.200", "shared (carrier-grade NAT)"),
])
def test_every_non_global_address_is_refused(address: str, kind: str) -> None:
    assert address_refusal(address) == kind


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808",
                                     "2002:808:808::1"])
def test_global_addresses_and_their_ipv6_forms_pass(address: str) -> None:
    assert address_refusal(address) is None


def test_a_literal_metadata_address_is_never_contacted() -> None:
    import asyncio

    from airflow_provider_mmprep.download.fetcher import Fetcher

    async def fetch_all() -> list:
        async with Fetcher(parse_options({"timeout": 2}, threads=2, processes=1)) as fetcher:
            return [await fetcher.fetch(url) for url in ("http://100.100.100.200/latest/meta-data/",
                                                          "http://[64:ff9b::a9fe:a9fe]/latest/")]

    results = asyncio.run(fetch_all())
    assert [r.error for r in results] == [
        "refused shared (carrier-grade NAT) address 100.100.100.200",
        "refused link-local (IPv4 169.254.169.254 embedded) address 64:ff9b::a9fe:a9fe"]
    assert not any(r.transient for r in results)


@pytest.mark.parametrize("mode", ["keep_ratio", "center_crop", "keep_ratio_largest", "border"])
@pytest.mark.parametrize("source", [(512, 384), (384, 512), (641, 479), (1100, 700), (257, 1030), (90, 61)])
def test_the_fast_shrink_gives_pillows_bytes(monkeypatch: pytest.MonkeyPatch, mode: str,
                                             source: tuple[int, int]) -> None:
    """libjpeg-turbo + the compiled BOX (when built) store exactly what Pillow's draft + resize would."""
    from airflow_provider_mmprep.download import resizer

    if not resizer._FAST_SHRINK:
        pytest.skip("the compiled resampler or simplejpeg is not installed here")
    body = sample_data.make_jpeg(8, source)
    for image_size, encode_format in [(100, "jpg"), (256, "jpg"), (37, "png")]:
        opts = options(resize_mode=mode, image_size=image_size, encode_format=encode_format)
        fast = process_image(body, opts)
        monkeypatch.setattr(resizer, "_FAST_SHRINK", False)
        slow = process_image(body, opts)
        monkeypatch.setattr(resizer, "_FAST_SHRINK", True)
        assert fast == slow, (mode, source, image_size, encode_format)


def test_the_fast_shrink_leaves_damaged_and_unusual_jpegs_to_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    """A truncated JPEG fails with Pillow's message; grayscale, CMYK and progressive JPEGs shrink as before."""
    from airflow_provider_mmprep.download import resizer

    opts = options(resize_mode="center_crop", image_size=64)
    truncated = sample_data.make_jpeg(9, (300, 200))[:4000]
    with pytest.raises(ImageRejected, match="image decoding failed: image file is truncated"):
        process_image(truncated, opts)
    picture = sample_data.make_image(10, (300, 200))
    bodies = [sample_data.encode(picture.convert("L"), "JPEG", quality=90),
              sample_data.encode(picture.convert("CMYK"), "JPEG", quality=90),
              sample_data.encode(picture, "JPEG", quality=90, progressive=True)]
    for body in bodies:
        fast = process_image(body, opts)
        monkeypatch.setattr(resizer, "_FAST_SHRINK", False)
        assert process_image(body, opts) == fast
        monkeypatch.setattr(resizer, "_FAST_SHRINK", True)
        assert decoded(fast.data).size == (64, 64)


def test_kept_jpegs_are_validated_whole_by_either_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """resize_mode no: a good JPEG keeps its bytes, a truncated one is refused with Pillow's words, and one with
    a corrupt block gets the same outcome whichever decoder validated it."""
    from airflow_provider_mmprep.download import resizer

    good = sample_data.make_jpeg(11, (320, 240))
    corrupt = bytearray(good)
    corrupt[len(good) // 2: len(good) // 2 + 64] = bytes(64)  # zeroed entropy-coded data: libjpeg warns
    outcomes = {}
    for fast in (True, False) if resizer._FAST_SHRINK else (False,):
        monkeypatch.setattr(resizer, "_FAST_SHRINK", fast)
        assert process_image(good, options()).data == good
        with pytest.raises(ImageRejected, match="image decoding failed: image file is truncated"):
            process_image(good[: len(good) - 500], options())
        try:
            outcomes[fast] = process_image(bytes(corrupt), options()).data
        except ImageRejected as exc:
            outcomes[fast] = str(exc)
    assert len(set(outcomes.values())) == 1
