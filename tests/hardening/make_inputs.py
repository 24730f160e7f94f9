"""Write the hostile and unusual images in inputs/ that test_hostile_inputs.py posts.

The files are committed; run this script again only to change them:

    .venv/bin/python tests/hardening/make_inputs.py

Each file starts from the real MNIST test digit examples/digits/
mnist-test-00000-label-7.png. Images that the service must classify keep
"label-7" in their names; the others must get a defined 4xx.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
INPUTS = HERE / "inputs"
DIGIT = HERE.parents[1] / "examples" / "digits" / "mnist-test-00000-label-7.png"
# EXIF orientation 6: the stored pixels must be turned 90 degrees clockwise
# for display.
EXIF_ORIENTATION = 0x0112
ROTATE_CLOCKWISE = 6


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_bomb(width: int, height: int) -> bytes:
    """A PNG that declares width x height 8-bit grey pixels and carries a few."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 4096)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", pixels)
        + png_chunk(b"IEND", b"")
    )


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the frame header (SOF0) of a baseline JPEG to declare another size."""
    marker = data.index(b"\xff\xc0")
    # SOF0: marker, length (2 bytes), precision (1), height (2), width (2).
    start = marker + 5
    return data[:start] + struct.pack(">HH", height, width) + data[start + 4 :]


def gif_with_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite a GIF's logical screen size, which Pillow reports as the image size."""
    return data[:6] + struct.pack("<HH", width, height) + data[10:]


def webp_with_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the size in a lossless WebP's VP8L header (14 bits each, minus one)."""
    chunk = data.index(b"VP8L")
    start = chunk + 9  # chunk id, chunk size, signature byte 0x2f
    (bits,) = struct.unpack("<I", data[start : start + 4])
    bits = (bits & ~0x0FFFFFFF) | (width - 1) | ((height - 1) << 14)
    return data[:start] + struct.pack("<I", bits) + data[start + 4 :]


def corrupt_middle(data: bytes, fraction: float = 0.5, length: int = 64) -> bytes:
    start = int(len(data) * fraction)
    return (
        data[:start]
        + bytes(255 - b for b in data[start : start + length])
        + data[start + length :]
    )


def main() -> None:
    INPUTS.mkdir(exist_ok=True)
    digit = Image.open(DIGIT).convert("L")
    large = digit.resize((280, 280), Image.Resampling.LANCZOS)
    files: dict[str, bytes] = {}

    # Declared sizes far beyond the pixel limit, with almost no data.
    files["bomb-100000x100000.png"] = png_bomb(100_000, 100_000)
    files["bomb-65500x65500.jpg"] = jpeg_with_size(encode(digit, "JPEG"), 65500, 65500)
    files["bomb-65535x65535.gif"] = gif_with_size(encode(digit, "GIF"), 65535, 65535)
    files["bomb-16384x16384.webp"] = webp_with_size(
        encode(digit, "WEBP", lossless=True), 16384, 16384
    )

    # Truncated and corrupt data.
    for format, suffix in (
        ("PNG", "png"),
        ("JPEG", "jpg"),
        ("WEBP", "webp"),
        ("GIF", "gif"),
    ):
        whole = encode(large, format)
        files[f"truncated-half.{suffix}"] = whole[: len(whole) // 2]
        files[f"truncated-header.{suffix}"] = whole[:20]
    files["corrupt-idat.png"] = corrupt_middle(encode(large, "PNG"))
    jpeg = encode(large, "JPEG")
    tables = jpeg.index(b"\xff\xc4")  # the first Huffman table
    files["corrupt-huffman.jpg"] = (
        jpeg[: tables + 4] + b"\xff" * 40 + jpeg[tables + 44 :]
    )
    files["not-an-image.eps"] = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\n"

    # Unusual but valid images of the digit 7.
    # 0..255 stretched to 0..65535, as a 16-bit scan of the digit would be.
    sixteen_bit = Image.fromarray(np.asarray(digit).astype(np.uint16) * 257)
    files["label-7-16bit.png"] = encode(sixteen_bit, "PNG")
    files["label-7-cmyk.jpg"] = encode(digit.convert("CMYK"), "JPEG", quality=95)
    files["label-7-palette.png"] = encode(digit.convert("P"), "PNG")
    files["label-7-palette-large.gif"] = encode(large.convert("P"), "GIF")
    rotated = large.rotate(90, expand=True)  # counter-clockwise
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_CLOCKWISE
    files["label-7-exif-rotated.jpg"] = encode(rotated, "JPEG", quality=95, exif=exif)
    other = Image.open(DIGIT.with_name("mnist-test-00001-label-2.png")).convert("L")
    files["label-7-animated.gif"] = encode(
        digit, "GIF", save_all=True, append_images=[other], duration=100, loop=0
    )
    alpha = Image.merge("LA", (digit, digit))  # the strokes opaque, the rest clear
    files["label-7-transparent.png"] = encode(alpha, "PNG")
    files["label-7-rgb.bmp"] = encode(digit.convert("RGB"), "BMP")
    files["label-7.tiff"] = encode(digit, "TIFF")
    files["label-7.ppm"] = encode(digit, "PPM")
    files["tiny-1x1.png"] = encode(Image.new("L", (1, 1), 255), "PNG")

    for name, data in sorted(files.items()):
        (INPUTS / name).write_bytes(data)
        print(f"{name}: {len(data)} bytes")


if __name__ == "__main__":
    main()
