"""Image decoding: formats, colour modes, alpha, sizes and invalid data."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image

from service.images import (
    ImageError,
    ImageTooLargeError,
    convert_image,
    decode_image,
    describe_error,
    open_image,
)
from tests.service.conftest import example_digits

MNIST_SHAPE = (28, 28, 1)
RGB_SHAPE = (32, 32, 3)
MAX_PIXELS = 4096 * 4096


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def digit_image() -> tuple[Image.Image, np.ndarray]:
    path, _ = example_digits()[0]
    image = Image.open(path)
    return image, np.asarray(image)


def test_decode_png_digit_unchanged():
    image, pixels = digit_image()
    decoded = decode_image(encode(image, "PNG"), MNIST_SHAPE, MAX_PIXELS)
    assert decoded.dtype == np.uint8
    assert decoded.shape == MNIST_SHAPE
    np.testing.assert_array_equal(decoded[:, :, 0], pixels)


@pytest.mark.parametrize("format", ["PNG", "BMP", "TIFF", "PPM", "GIF", "WEBP"])
def test_decode_lossless_formats_exact(format):
    image, pixels = digit_image()
    options = {"lossless": True} if format == "WEBP" else {}
    decoded = decode_image(encode(image, format, **options), MNIST_SHAPE, MAX_PIXELS)
    np.testing.assert_array_equal(decoded[:, :, 0], pixels)


def test_decode_jpeg_close_to_original():
    image, pixels = digit_image()
    decoded = decode_image(encode(image, "JPEG", quality=95), MNIST_SHAPE, MAX_PIXELS)
    difference = np.abs(decoded[:, :, 0].astype(int) - pixels.astype(int))
    assert difference.mean() < 4


def test_decode_rgb_to_greyscale():
    _, pixels = digit_image()
    rgb = Image.fromarray(np.stack([pixels] * 3, axis=2))
    decoded = decode_image(encode(rgb, "PNG"), MNIST_SHAPE, MAX_PIXELS)
    np.testing.assert_array_equal(decoded[:, :, 0], pixels)


def test_decode_greyscale_to_rgb():
    pixels = np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) % 256
    grey = Image.fromarray(pixels.astype(np.uint8))
    decoded = decode_image(encode(grey, "PNG"), RGB_SHAPE, MAX_PIXELS)
    assert decoded.shape == RGB_SHAPE
    for channel in range(3):
        np.testing.assert_array_equal(decoded[:, :, channel], pixels)


def test_decode_alpha_composited_over_black():
    _, pixels = digit_image()
    white = np.full_like(pixels, 255)
    # White strokes whose opacity is the digit: over black this is the digit.
    rgba = Image.fromarray(np.stack([white, white, white, pixels], axis=2))
    decoded = decode_image(encode(rgba, "PNG"), MNIST_SHAPE, MAX_PIXELS)
    difference = np.abs(decoded[:, :, 0].astype(int) - pixels.astype(int))
    assert difference.max() <= 1


def test_decode_palette_with_transparency():
    palette_image = Image.new("P", (28, 28), 0)
    palette_image.putpalette([255, 255, 255] * 2)
    palette_image.info["transparency"] = 0
    palette_image.putpixel((3, 4), 1)
    decoded = decode_image(encode(palette_image, "PNG"), MNIST_SHAPE, MAX_PIXELS)
    assert decoded[4, 3, 0] == 255
    assert decoded[0, 0, 0] == 0  # transparent white became black


def test_decode_sixteen_bit_scaled_not_clipped():
    values = np.full((28, 28), 65535, dtype=np.uint16)
    values[0, 0] = 257 * 100
    image = Image.fromarray(values)
    decoded = decode_image(encode(image, "PNG"), MNIST_SHAPE, MAX_PIXELS)
    assert decoded[0, 0, 0] == 100
    assert decoded[1, 1, 0] == 255


def test_decode_resizes_any_size():
    image = Image.new("L", (300, 123), 255)
    decoded = decode_image(encode(image, "PNG"), MNIST_SHAPE, MAX_PIXELS)
    assert decoded.shape == MNIST_SHAPE
    assert (decoded == 255).all()


def test_decode_cmyk_jpeg():
    image = Image.new("CMYK", (40, 40), (0, 0, 0, 0))  # white
    decoded = decode_image(encode(image, "JPEG"), MNIST_SHAPE, MAX_PIXELS)
    assert decoded.min() > 240


def test_decode_applies_exif_orientation():
    pixels = np.zeros((28, 28), np.uint8)
    pixels[0, :] = 255  # top row white
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    data = encode(image, "JPEG", quality=100, exif=exif)
    decoded = decode_image(data, MNIST_SHAPE, MAX_PIXELS)[:, :, 0]
    assert decoded[:, -1].mean() > 200  # the top row is now the right column
    assert decoded[0, :-3].mean() < 50


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"this is not an image", "not a readable image"),
        (b"%PDF-1.4\n1 0 obj\n", "not a readable image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n", "not a readable image"),
    ],
)
def test_decode_rejects_non_images(data, message):
    with pytest.raises(ImageError, match=message) as caught:
        decode_image(data, MNIST_SHAPE, MAX_PIXELS)
    assert caught.value.status_code == 400


def test_decode_rejects_truncated_png():
    data = encode(Image.new("L", (200, 200), 7), "PNG", compress_level=0)
    with pytest.raises(ImageError, match="truncated or corrupt") as caught:
        decode_image(data[: len(data) // 2], MNIST_SHAPE, MAX_PIXELS)
    assert caught.value.status_code == 400


def test_open_image_reads_header_only():
    data = encode(Image.new("L", (200, 100), 7), "PNG", compress_level=0)
    image = open_image(data[: len(data) // 2], MAX_PIXELS)
    assert image.size == (200, 100)
    with pytest.raises(ImageError, match="truncated or corrupt"):
        convert_image(image, MNIST_SHAPE)


def test_open_image_rejects_empty_data():
    with pytest.raises(ImageError, match="empty"):
        open_image(b"", MAX_PIXELS)


def test_decode_rejects_too_many_pixels():
    data = encode(Image.new("L", (100, 50), 0), "PNG")
    with pytest.raises(ImageTooLargeError, match="100x50 = 5000 pixels") as caught:
        decode_image(data, MNIST_SHAPE, max_pixels=4999)
    assert caught.value.status_code == 413


def test_decode_rejects_decompression_bomb_header():
    # A PNG header that declares 30,000 x 30,000 pixels: Pillow itself refuses it
    # before the service's own limit is checked.
    data = encode(Image.new("L", (1, 1), 0), "PNG")
    bomb = bytearray(data)
    bomb[16:24] = (30000).to_bytes(4, "big") * 2  # IHDR width and height
    bomb[29:33] = zlib.crc32(bomb[12:29]).to_bytes(4, "big")  # IHDR checksum
    with pytest.raises(ImageTooLargeError, match="too many pixels"):
        decode_image(bytes(bomb), MNIST_SHAPE, MAX_PIXELS)


def test_decode_rejects_float_images():
    image = Image.fromarray(np.zeros((28, 28), np.float32))
    with pytest.raises(ImageError, match="mode F"):
        decode_image(encode(image, "TIFF"), MNIST_SHAPE, MAX_PIXELS)


def test_describe_error_hides_image_bytes():
    error = SyntaxError("broken PNG file (chunk b'\\x01\\x02zz')")
    assert describe_error(error) == "broken PNG file (chunk <bytes>)"
    quoted = ValueError('bad marker b"\\xff\\"" in b\'abc\'')
    assert describe_error(quoted) == "bad marker <bytes> in <bytes>"
    assert describe_error(ValueError("the club's 'b' file")) == "the club's 'b' file"
    assert len(describe_error(ValueError("x" * 1000))) == 200
