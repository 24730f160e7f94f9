"""Decode uploaded images and convert them to the model's input size and channels."""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# A Python bytes literal, as Pillow quotes parts of the data in some messages.
BYTES_LITERAL = re.compile(r"""\bb(['"]).*?(?<!\\)\1""")
MAX_MESSAGE_CHARS = 200

# Formats that Pillow may open. Restricting them keeps Pillow away from plugins
# such as EPS, which runs Ghostscript when it is installed.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF", "PPM")
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class ImageError(Exception):
    """An uploaded image cannot be classified; carries the HTTP status and a code."""

    status_code = 400
    code = "invalid_image"


class ImageTooLargeError(ImageError):
    status_code = 413
    code = "image_too_large"


def decode_image(
    data: bytes, input_shape: tuple[int, int, int], max_pixels: int
) -> np.ndarray:
    """Decode one image and convert it to uint8 (height, width, channels).

    Any size is resized to the model's input size (aspect ratio not kept).
    Colour images become greyscale for a 1-channel model and greyscale
    images become RGB for a 3-channel one. Transparent pixels are composited
    over black, the background of MNIST digits. Raises ImageError.
    """
    return convert_image(open_image(data, max_pixels), input_shape)


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Read the image's header and check its size, without decoding the pixels.

    Raises ImageError.
    """
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    return _open(data, max_pixels)


def convert_image(image: Image.Image, input_shape: tuple[int, int, int]) -> np.ndarray:
    """Decode an image from open_image into uint8 (height, width, channels).

    This is decode_image's expensive half. Raises ImageError.
    """
    height, width, channels = input_shape
    target_mode = "L" if channels == 1 else "RGB"

    # Pillow's decoders raise many exception types on corrupt or truncated
    # data (OSError, ValueError, SyntaxError, struct.error, ...), and all of
    # them mean the upload is invalid.
    try:
        image.draft(target_mode, (width, height))  # cheaper JPEG decoding
        image.load()
        image = ImageOps.exif_transpose(image)
        image = _convert_mode(image, target_mode)
    except ImageError:
        raise
    except Exception as error:
        raise ImageError(
            f"the image data is truncated or corrupt: {describe_error(error)}"
        ) from error

    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8).reshape(height, width, channels)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Read the image header and check the pixel count before decoding."""
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(
            f"the image has too many pixels: {error}; the maximum is {max_pixels}"
        ) from error
    except UnidentifiedImageError as error:
        raise ImageError(
            "the data is not a readable image; accepted formats: "
            f"{', '.join(ALLOWED_FORMATS)}"
        ) from error
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageError(
            f"the data is not a readable image: {describe_error(error)}"
        ) from error

    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"the image is {width}x{height} = {width * height} pixels; "
            f"the maximum is {max_pixels}"
        )
    return image


def _convert_mode(image: Image.Image, target_mode: str) -> Image.Image:
    """Convert to ``target_mode`` ("L" or "RGB"), flattening alpha onto black."""
    if image.mode in SIXTEEN_BIT_MODES:
        # 16-bit greyscale (PNG, TIFF): Pillow's convert("L") would clip values
        # above 255, so scale 0..65535 to 0..255 instead.
        values = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(values.round(), 0, 255).astype(np.uint8))
    elif image.mode == "F":
        raise ImageError(
            "floating-point images (mode F) are not supported; send 8- or 16-bit images"
        )

    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    return image.convert(target_mode)


def describe_error(error: Exception) -> str:
    """Return a decoder's message without the upload's bytes, for clients and logs."""
    message = BYTES_LITERAL.sub("<bytes>", str(error))
    return message[:MAX_MESSAGE_CHARS]
