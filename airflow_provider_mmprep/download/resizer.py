"""Check, orient, resize and encode one downloaded image with Pillow (img2dataset's resize semantics).

Order matters for safety and speed:

1. ``Image.open`` parses only the header. Size limits (``max_image_pixels`` against decompression bombs,
   ``max_image_area``, ``min_image_size``, ``max_aspect_ratio``) are checked there, before any pixel is
   decoded.
2. JPEGs that will be shrunk are decoded at a reduced DCT scale (``Image.draft``) no smaller than needed,
   which makes decode + resize several times cheaper without visible loss.
3. Every kept image is decoded in full (``load``): a truncated or corrupt file is a failure, never a sample.
4. EXIF orientation is applied before resizing, so stored pixels are upright.

A JPEG kept as it is (``resize_mode: no``) is validated by libjpeg-turbo (simplejpeg, strict) decoding luma
only at 1/8 scale, 25% less CPU than Pillow's ``draft`` + ``load`` for the same check. The common shrink (an
upright YCbCr JPEG made smaller with BOX) takes a faster route to the same pixels:
libjpeg-turbo (simplejpeg, strict) decodes straight into RGBX rows at the DCT scale ``draft`` would pick, and
``_resample.c`` shrinks them with Pillow's own arithmetic, vectorised (issue 14: 2.5-2.8× less CPU than
Pillow's resample). Its output equals Pillow's bit for bit, so the route taken never shows in the stored bytes;
any decoder complaint (truncation, corrupt data) sends the image down Pillow's path, which decides and words the
failure as before. Without the compiled module or simplejpeg, or on a CPU without SSE4.1, Pillow does it all.

Sizes produced (``image_size`` = S):

==================== ===================================================================================
``no``               unchanged
``keep_ratio``       smaller side = S, aspect kept
``center_crop``      smaller side = S, then the centre S×S
``keep_ratio_largest`` larger side = S, aspect kept
``border``           larger side = S, then padded with white to S×S (image centred)
==================== ===================================================================================

With ``resize_only_if_bigger`` an image whose relevant side is already ≤ S is left as it is.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from .options import DownloadOptions

try:  # the fast shrink: both optional, same pixels as Pillow's (see the module doc)
    import simplejpeg

    from .. import _resample

    _FAST_SHRINK = bool(_resample.SIMD)
except ImportError:  # pragma: no cover - no compiler at install time, or simplejpeg missing
    _FAST_SHRINK = False

_FORMAT_OF = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_ORIENTATION_TAG = 0x0112
Image.init()  # register every plugin now: ``Image.open(formats=...)`` only knows registered ones
#: Web image formats we accept (JPEG covers MPO); anything else is "not an image".
_OPENABLE = tuple(f for f in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF") if f in Image.OPEN)


class ImageRejected(Exception):
    """The downloaded bytes are not an acceptable image; the message is the row's error_message."""


@dataclass
class ProcessedImage:
    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int
    hash: str | None


def plan_geometry(width: int, height: int, options: DownloadOptions) -> tuple[tuple[int, int] | None, bool]:
    """``(resize_to, fit)``: the size to resize to (None: keep) and whether the centre crop (center_crop)
    or the white padding (border) to S×S applies. Input sizes are after EXIF orientation."""
    mode, size = options.resize_mode, options.image_size
    if mode == "no":
        return None, False
    side = min(width, height) if mode in ("keep_ratio", "center_crop") else max(width, height)
    if options.resize_only_if_bigger and side <= size:
        return None, False
    fit = mode in ("center_crop", "border")
    if side == size:
        return None, fit
    scale = size / side
    new = [max(1, round(width * scale)), max(1, round(height * scale))]
    # the reference side is exactly S despite rounding
    reference_is_width = (width <= height) if mode in ("keep_ratio", "center_crop") else (width >= height)
    new[0 if reference_is_width else 1] = size
    return (new[0], new[1]), fit


def _composite_on_white(image: Image.Image) -> Image.Image:
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info)


def _draft_size(width: int, height: int, need: tuple[int, int]) -> tuple[int, int]:
    """The size ``Image.draft`` decodes a JPEG at for ``need``: the largest DCT scale 1/8, 1/4, 1/2 or 1 that
    keeps both sides at least ``need`` (Pillow's JpegImageFile.draft)."""
    ratio = min(width // need[0], height // need[1])
    scale = next((s for s in (8, 4, 2, 1) if ratio >= s), 1)
    return (width + scale - 1) // scale, (height + scale - 1) // scale


def _validates(body: bytes, width: int, height: int) -> bool:
    """Whether libjpeg-turbo decodes every block of ``body`` without a complaint (strict), luma only at 1/8
    scale: the entropy decoding, which finds truncated or corrupt data, covers every component anyway.
    False sends the image to Pillow's decode, which decides and words the failure."""
    try:
        simplejpeg.decode_jpeg(body, colorspace="GRAY", min_width=(width + 7) // 8, min_height=(height + 7) // 8,
                               strict=True)
    except (ValueError, RuntimeError):
        return False
    return True


def _fast_shrink(body: bytes, size: tuple[int, int], resize_to: tuple[int, int],
                 box: tuple[float, float, float, float]) -> Image.Image | None:
    """Decode ``body`` at ``size`` with libjpeg-turbo and BOX-shrink ``box`` of it to ``resize_to``: the
    pixels of Pillow's ``draft`` + ``load`` + ``resize(..., BOX, box=box)``. None where simplejpeg refuses
    the data (strict: any libjpeg warning), for Pillow to decide."""
    try:
        if simplejpeg.decode_jpeg_header(body, strict=True)[2] != "YCbCr":
            return None  # RGB, CMYK, YCCK: Pillow's conversions
        pixels = simplejpeg.decode_jpeg(body, colorspace="RGBX", min_width=size[0], min_height=size[1],
                                        strict=True)
    except (ValueError, RuntimeError):
        return None
    if pixels.shape != (size[1], size[0], 4):  # pragma: no cover - a scale Pillow would not pick
        return None
    data = _resample.box_rgbx(pixels, size[0], size[1], resize_to[0], resize_to[1], box)
    return Image.frombytes("RGB", resize_to, data, "raw", "RGBX")


def process_image(body: bytes, options: DownloadOptions) -> ProcessedImage:
    """Validate and transform ``body``; raise :class:`ImageRejected` with a short reason otherwise."""
    digest = hashlib.new(options.compute_hash, body).hexdigest() if options.compute_hash else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(body), formats=_OPENABLE)
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"decompression bomb refused: {str(exc).split(',')[0]}") from None
    except UnidentifiedImageError:
        raise ImageRejected("not an image (unrecognised format)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageRejected(f"unreadable image header: {exc}"[:200]) from None
    with image:
        raw_width, raw_height = image.size
        if raw_width * raw_height > options.max_image_pixels:
            raise ImageRejected(f"decompression bomb refused: {raw_width}x{raw_height} pixels exceeds "
                                f"max_image_pixels {options.max_image_pixels}")
        if raw_width < 1 or raw_height < 1:
            raise ImageRejected("image has no pixels")
        if min(raw_width, raw_height) < options.min_image_size:
            raise ImageRejected("image too small")
        if raw_width * raw_height > options.max_image_area:
            raise ImageRejected("image area too large")
        if max(raw_width, raw_height) / min(raw_width, raw_height) > options.max_aspect_ratio:
            raise ImageRejected("aspect ratio too large")
        try:
            orientation = image.getexif().get(_ORIENTATION_TAG, 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block is ignored, as viewers do
            orientation = 1
        rotated = orientation in (5, 6, 7, 8)
        width, height = (raw_height, raw_width) if rotated else (raw_width, raw_height)
        resize_to, fit = plan_geometry(width, height, options)
        wanted_format = _FORMAT_OF[options.encode_format]
        source_format = "JPEG" if image.format == "MPO" else image.format
        size = options.image_size
        unchanged = (resize_to is None and (not fit or (width, height) == (size, size))
                     and orientation in (1, None) and not _has_alpha(image) and image.mode in ("RGB", "L")
                     and source_format == wanted_format and image.format != "MPO")
        keep_bytes = unchanged and options.skip_reencode is not False
        if keep_bytes and _FAST_SHRINK and image.format == "JPEG" and _validates(body, raw_width, raw_height):
            return ProcessedImage(body, raw_width, raw_height, raw_width, raw_height, digest)
        shrunk = None
        if (_FAST_SHRINK and resize_to is not None and image.format == "JPEG" and image.mode == "RGB"
                and orientation in (1, None) and "progressive" not in image.info):
            decoded = _draft_size(raw_width, raw_height, resize_to)
            if resize_to[0] * resize_to[1] < decoded[0] * decoded[1]:  # a shrink: BOX, as below
                if fit and options.resize_mode == "center_crop":
                    side = min(decoded)
                    left, top = (decoded[0] - side) / 2, (decoded[1] - side) / 2
                    shrunk = _fast_shrink(body, decoded, (size, size), (left, top, left + side, top + side))
                else:
                    shrunk = _fast_shrink(body, decoded, resize_to, (0, 0, decoded[0], decoded[1]))
        if shrunk is not None:
            return _finish(shrunk, fit, options, wanted_format, width, height, digest)
        try:
            if image.format == "JPEG":
                if keep_bytes:
                    image.draft(image.mode, (1, 1))  # smallest DCT scale: decodes every block, cheaply
                elif resize_to is not None:
                    # request at least the resized size (in raw orientation) so quality is kept
                    need = (resize_to[1], resize_to[0]) if rotated else resize_to
                    image.draft("RGB" if image.mode != "L" else "L", need)
            image.load()
        except Image.DecompressionBombError as exc:
            raise ImageRejected(f"decompression bomb refused: {str(exc).split(',')[0]}") from None
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise ImageRejected(f"image decoding failed: {exc}"[:200]) from None
        if keep_bytes:
            return ProcessedImage(body, raw_width, raw_height, raw_width, raw_height, digest)

        if orientation not in (1, None):
            image = ImageOps.exif_transpose(image)
        if _has_alpha(image):
            image = _composite_on_white(image)
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        if resize_to is not None:
            shrinking = resize_to[0] * resize_to[1] < image.size[0] * image.size[1]
            resample = Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS
            if fit and options.resize_mode == "center_crop":
                # resize only the centre square: same pixels as resize-then-crop, without resampling the
                # parts the crop would throw away
                side = min(image.size)
                left, top = (image.size[0] - side) / 2, (image.size[1] - side) / 2
                image = image.resize((size, size), resample, box=(left, top, left + side, top + side),
                                     reducing_gap=None)
            else:
                image = image.resize(resize_to, resample, reducing_gap=None)
        return _finish(image, fit, options, wanted_format, width, height, digest)


def _finish(image: Image.Image, fit: bool, options: DownloadOptions, wanted_format: str, width: int, height: int,
            digest: str | None) -> ProcessedImage:
    """Crop (center_crop) or pad (border) the resized ``image`` to S×S where still needed, and encode it."""
    size = options.image_size
    if fit and options.resize_mode == "center_crop" and image.size != (size, size):
        left = (image.size[0] - size) // 2
        top = (image.size[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
    elif fit and options.resize_mode == "border" and image.size != (size, size):
        canvas = Image.new(image.mode, (size, size), 255 if image.mode == "L" else (255, 255, 255))
        canvas.paste(image, ((size - image.size[0]) // 2, (size - image.size[1]) // 2))
        image = canvas
    out = io.BytesIO()
    if wanted_format == "JPEG":
        image.save(out, "JPEG", quality=options.encode_quality)
    elif wanted_format == "PNG":
        image.save(out, "PNG", compress_level=options.encode_quality)
    else:
        image.save(out, "WEBP", quality=options.encode_quality)
    return ProcessedImage(out.getvalue(), image.size[0], image.size[1], width, height, digest)
