"""app.media: what every upload becomes, and how bad uploads are refused."""

from __future__ import annotations

import base64
import contextlib
import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import ExifTags, Image

from app.errors import BadRequest, PayloadTooLarge, Unprocessable, UnsupportedMedia
from app.media import (
    AudioHeader,
    DecodedAudio,
    ResizeMode,
    _draft_jpeg,
    audio_header,
    decode_audio,
    decode_image,
    encode_audio,
    encode_image,
    image_geometry,
    parse_base64,
)
from app.runner import to_rgb8
from tests.support import LONG_CLIP, SHARED_DATA, ffmpeg_audio, live_ogg_opus

PHOTO = sorted((SHARED_DATA / "images").glob("*.jpg"))[0]
SPEECH = sorted((SHARED_DATA / "audio" / "speech").glob("*.ogg"))[0]

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
YELLOW = (255, 255, 0)
WHITE = (255, 255, 255)
IMAGE_FORMAT_NAMES = ("PNG", "JPEG", "WebP", "GIF", "BMP", "TIFF")
ACCEPTED_IMAGES = "PNG, JPEG, WebP, GIF (first frame), BMP or TIFF"
AUDIO_FORMAT_NAMES = ("WAV", "FLAC", "OGG", "MP3", "M4A", "MP4", "AAC", "WebM", "Opus")
ACCEPTED_AUDIO = (
    "WAV, FLAC, MP3, OGG (Vorbis or Opus), M4A or MP4 (AAC or ALAC; an MP4's audio track), "
    "WebM or Matroska (Opus or Vorbis), AIFF or another format libsndfile reads"
)


def image_bytes(img: Image.Image, fmt: str, **options: object) -> bytes:
    """Save a Pillow image to bytes in a container format."""
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise_png(width: int = 64, height: int = 64) -> bytes:
    """An incompressible RGB PNG, so that cutting it anywhere loses pixel data."""
    rng = np.random.default_rng(0)
    return image_bytes(Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)), "PNG")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR declaring width x height RGB, with no pixel data at all."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def rgb_at(pixels: torch.Tensor, y: int, x: int) -> tuple[int, int, int]:
    """The 0..255 colour of one pixel of a [3, H, W] tensor in [-1, 1]."""
    red, green, blue = ((pixels[:, y, x] + 1.0) * 127.5).round().int().tolist()
    return red, green, blue


def near(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int) -> bool:
    """Every channel within tolerance levels of the expected colour."""
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def sine(freq_hz: float, sample_rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    """A sine wave [T] float32."""
    t = np.arange(round(sample_rate * seconds)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def audio_bytes(
    samples: np.ndarray,
    sample_rate: int,
    fmt: str = "WAV",
    subtype: str = "PCM_16",
    endian: str = "FILE",
) -> bytes:
    """Write samples [T] or [T, C] with libsndfile."""
    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate, format=fmt, subtype=subtype, endian=endian)
    return buffer.getvalue()


def flac_of_unknown_length(samples: np.ndarray, sample_rate: int) -> bytes:
    """A FLAC whose STREAMINFO total-samples field is 0 (unknown), as a pipe writer leaves it."""
    data = bytearray(audio_bytes(samples, sample_rate, "FLAC"))
    streaminfo = 8  # after "fLaC" and the metadata block header
    data[streaminfo + 13] &= 0xF0  # the 36-bit count: the low nibble of byte 13, bytes 14..17
    data[streaminfo + 14 : streaminfo + 18] = bytes(4)
    return bytes(data)


def peak_hz(wave: torch.Tensor, sample_rate: int) -> float:
    """The strongest frequency of a [T] signal, in Hz."""
    signal = wave.numpy() * np.hanning(len(wave))
    return float(np.argmax(np.abs(np.fft.rfft(signal)))) * sample_rate / len(signal)


def names_all(detail: str, names: tuple[str, ...]) -> bool:
    """The error sentence names every accepted format."""
    return all(name in detail for name in names)


# Images: formats and colour modes


@pytest.mark.parametrize(
    ("fmt", "tolerance"),
    [("PNG", 0), ("JPEG", 8), ("WEBP", 8), ("GIF", 0), ("BMP", 0), ("TIFF", 0)],
)
def test_each_accepted_image_format_decodes_to_model_size_and_colour(
    fmt: str, tolerance: int
) -> None:
    colour = (200, 40, 90)
    data = image_bytes(Image.new("RGB", (48, 32), colour), fmt)
    pixels = decode_image(data, (16, 24))
    assert pixels.shape == (3, 16, 24) and pixels.dtype == torch.float32
    assert near(rgb_at(pixels, 8, 12), colour, tolerance)


def test_real_photo_decodes_to_model_size_in_range() -> None:
    pixels = decode_image(PHOTO.read_bytes(), (256, 256))
    assert pixels.shape == (3, 256, 256)
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0 and pixels.std() > 0.1


def test_exif_orientation_6_is_applied_before_resizing() -> None:
    stored = Image.new("RGB", (640, 320), RED)
    stored.paste(BLUE, (320, 0, 640, 320))  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: top red, bottom blue
    data = image_bytes(stored, "JPEG", exif=exif.tobytes())
    pixels = decode_image(data, (64, 32), "stretch")
    assert near(rgb_at(pixels, 8, 24), RED, 12)
    assert near(rgb_at(pixels, 56, 8), BLUE, 12)


def exif_jpeg(img: Image.Image, orientation: int) -> bytes:
    """A JPEG of img whose EXIF Orientation tag is orientation."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return image_bytes(img, "JPEG", exif=exif)


@pytest.mark.parametrize(
    ("orientation", "size", "resize", "drafted"),
    [
        (1, (64, 64), "crop", (400, 200)),
        (1, (64, 64), "pad", (200, 100)),
        (1, (64, 64), "stretch", (400, 200)),
        (1, (16, 200), "crop", (800, 400)),
        (1, (16, 200), "pad", (200, 100)),
        (1, (16, 200), "stretch", (800, 400)),
        # shown upright, the 1600x800 photo is 800x1600: the model's width falls on its height
        *[(orientation, (16, 200), "crop", (1600, 800)) for orientation in (5, 6, 7, 8)],
        *[(orientation, (16, 200), "stretch", (1600, 800)) for orientation in (5, 6, 7, 8)],
        *[(orientation, (100, 50), "crop", (400, 200)) for orientation in (5, 6, 7, 8)],
    ],
)
def test_jpeg_is_decoded_at_the_smallest_scale_leaving_3x_the_pixels_it_needs(
    orientation: int, size: tuple[int, int], resize: ResizeMode, drafted: tuple[int, int]
) -> None:
    # libjpeg scales by 1/2, 1/4 or 1/8; the kept part must keep 3x the model's pixels a side
    data = exif_jpeg(Image.new("RGB", (1600, 800), RED), orientation)
    with Image.open(io.BytesIO(data)) as img:
        _draft_jpeg(img, size, resize)
        assert img.size == drafted


def test_crop_decodes_a_jpeg_whole_when_its_kept_part_needs_every_pixel() -> None:
    noise = np.random.default_rng(5).integers(0, 256, (400, 800, 3), np.uint8)
    data = image_bytes(Image.fromarray(noise), "JPEG", quality=90)
    with Image.open(io.BytesIO(data)) as whole:
        lossless = image_bytes(whole.convert("RGB"), "PNG")
    pixels = decode_image(data, (16, 300), "crop")
    assert torch.equal(pixels, decode_image(lossless, (16, 300), "crop"))


def test_gif_first_frame_is_used() -> None:
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    data = image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert rgb_at(decode_image(data, (16, 16)), 8, 8) == RED


def test_multi_picture_jpeg_from_a_camera_decodes_its_first_picture() -> None:
    pictures = [Image.new("RGB", (32, 32), RED), Image.new("RGB", (32, 32), BLUE)]
    data = image_bytes(pictures[0], "MPO", save_all=True, append_images=pictures[1:])
    assert near(rgb_at(decode_image(data, (16, 16)), 8, 8), RED, 8)


def test_palette_png_with_transparency_composites_over_white() -> None:
    img = Image.new("P", (32, 16), 0)
    img.putpalette([*RED, *GREEN])
    img.paste(1, (16, 0, 32, 16))
    data = image_bytes(img, "PNG", transparency=0)  # index 0 (red) fully transparent
    pixels = decode_image(data, (16, 32), "stretch")
    assert rgb_at(pixels, 8, 4) == WHITE
    assert rgb_at(pixels, 8, 28) == GREEN


def test_half_transparent_greyscale_png_composites_over_white() -> None:
    data = image_bytes(Image.new("LA", (16, 16), (0, 128)), "PNG")
    assert rgb_at(decode_image(data, (16, 16)), 8, 8) == (127, 127, 127)


def test_greyscale_png_becomes_equal_rgb_channels() -> None:
    data = image_bytes(Image.new("L", (16, 16), 64), "PNG")
    assert rgb_at(decode_image(data, (16, 16)), 8, 8) == (64, 64, 64)


def test_16bit_greyscale_png_is_scaled_to_8_bits_not_clipped() -> None:
    img = Image.fromarray(np.full((16, 16), 128 * 257, np.uint16))
    assert img.mode == "I;16"
    assert rgb_at(decode_image(image_bytes(img, "PNG"), (16, 16)), 8, 8) == (128, 128, 128)


def test_float_greyscale_tiff_reads_0_to_1_and_refuses_nan() -> None:
    half = Image.fromarray(np.full((16, 16), 0.5, np.float32))
    assert rgb_at(decode_image(image_bytes(half, "TIFF"), (16, 16)), 8, 8) == (128, 128, 128)
    levels = np.full((16, 16), 0.5, np.float32)
    levels[3, 3] = np.nan
    with pytest.raises(Unprocessable) as caught:
        decode_image(image_bytes(Image.fromarray(levels), "TIFF"), (16, 16))
    assert caught.value.detail == (
        "The image holds NaN or infinite pixel values; send finite values "
        "(float greyscale is read as 0..1)."
    )


def test_float_greyscale_outside_0_to_1_is_clipped_to_black_and_white() -> None:
    levels = np.array([[-0.5, 0.0, 0.5, 1.0, 2.0]], np.float32)
    pixels = decode_image(image_bytes(Image.fromarray(levels), "TIFF"), (1, 5))
    assert [rgb_at(pixels, 0, x)[0] for x in range(5)] == [0, 0, 128, 255, 255]


def test_16bit_greyscale_takes_one_level_per_257() -> None:
    # level = round(value / 257): 65,407 / 257 = 254.502 rounds up; 129 / 257 = 0.502 too
    values = np.array([[0, 128, 129, 65_407, 65_535]], np.uint16)
    pixels = decode_image(image_bytes(Image.fromarray(values), "PNG"), (1, 5))
    assert [rgb_at(pixels, 0, x)[0] for x in range(5)] == [0, 0, 1, 255, 255]


def test_32bit_integer_greyscale_tiff_is_read_as_0_to_65535() -> None:
    img = Image.fromarray(np.full((16, 16), 128 * 257, np.int32))
    assert img.mode == "I"
    assert rgb_at(decode_image(image_bytes(img, "TIFF"), (16, 16)), 8, 8) == (128, 128, 128)


def test_cmyk_jpeg_converts_to_rgb() -> None:
    data = image_bytes(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95)
    assert near(rgb_at(decode_image(data, (16, 16)), 8, 8), RED, 10)


def test_half_transparent_rgba_composites_over_white() -> None:
    data = image_bytes(Image.new("RGBA", (16, 16), (0, 0, 0, 128)), "PNG")
    assert rgb_at(decode_image(data, (16, 16)), 8, 8) == (127, 127, 127)


# Images: resize geometry on a 200x100 image of four vertical bands


def banded_image() -> bytes:
    """200x100 PNG: green, red, blue, yellow bands, each 50 px wide."""
    img = Image.new("RGB", (200, 100))
    for index, colour in enumerate((GREEN, RED, BLUE, YELLOW)):
        img.paste(colour, (50 * index, 0, 50 * index + 50, 100))
    return image_bytes(img, "PNG")


def test_crop_fills_the_short_side_and_keeps_the_centre() -> None:
    pixels = decode_image(banded_image(), (64, 64), "crop")
    assert near(rgb_at(pixels, 32, 2), RED, 10)
    assert near(rgb_at(pixels, 32, 61), BLUE, 10)
    assert near(rgb_at(pixels, 0, 16), RED, 10) and near(rgb_at(pixels, 63, 48), BLUE, 10)


def test_pad_fits_inside_and_letterboxes_with_white() -> None:
    pixels = decode_image(banded_image(), (64, 64), "pad")
    assert rgb_at(pixels, 4, 32) == WHITE and rgb_at(pixels, 60, 32) == WHITE
    assert near(rgb_at(pixels, 32, 4), GREEN, 10)
    assert near(rgb_at(pixels, 32, 60), YELLOW, 10)


def test_pad_letterboxes_a_tall_image_left_and_right() -> None:
    pixels = decode_image(image_bytes(Image.new("RGB", (100, 200), RED), "PNG"), (64, 64), "pad")
    assert rgb_at(pixels, 32, 4) == WHITE and rgb_at(pixels, 32, 60) == WHITE
    assert rgb_at(pixels, 32, 32) == RED and rgb_at(pixels, 2, 20) == RED


def test_stretch_maps_the_whole_image_onto_the_model_size() -> None:
    pixels = decode_image(banded_image(), (64, 64), "stretch")
    for x, colour in ((6, GREEN), (24, RED), (40, BLUE), (58, YELLOW)):
        assert near(rgb_at(pixels, 2, x), colour, 10)


@pytest.mark.parametrize("height", range(150, 400))
def test_crop_takes_any_aspect_ratio_whose_scale_is_not_exact(height: int) -> None:
    # 256x203 once gave a box starting at -1e-14 px, which Pillow refuses (a 500)
    pixels = decode_image(image_bytes(Image.new("RGB", (256, height), RED), "PNG"), (64, 64))
    assert rgb_at(pixels, 32, 32) == RED


@pytest.mark.parametrize(
    ("source", "size", "resize", "crop_box", "content_box"),
    [
        # the centre, on the whole model image
        ((200, 100), (64, 64), "crop", [50.0, 0.0, 150.0, 100.0], [0, 0, 64, 64]),
        # all of it, inside the letterbox
        ((200, 100), (64, 64), "pad", [0.0, 0.0, 200.0, 100.0], [0, 16, 64, 48]),
        # all of it, on the whole model image
        ((200, 100), (64, 64), "stretch", [0.0, 0.0, 200.0, 100.0], [0, 0, 64, 64]),
        # all of it, between side bars
        ((100, 200), (64, 64), "pad", [0.0, 0.0, 100.0, 200.0], [16, 0, 48, 64]),
        # edges rounded to a thousandth of a pixel
        ((100, 100), (64, 96), "crop", [0.0, 16.667, 100.0, 83.333], [0, 0, 96, 64]),
    ],
)
def test_geometry_names_the_source_box_kept_and_the_model_box_it_fills(
    source: tuple[int, int],
    size: tuple[int, int],
    resize: ResizeMode,
    crop_box: list[float],
    content_box: list[int],
) -> None:
    data = image_bytes(Image.new("RGB", source, RED), "PNG")
    assert image_geometry(data, size, resize) == {
        "source_size": list(source),
        "crop_box": crop_box,
        "content_box": content_box,
        "resize_filter": "bicubic",
    }


@pytest.mark.parametrize(
    ("width", "height", "content_box"),
    [(1000, 4, [0, 31, 64, 32]), (4, 1000, [31, 0, 32, 64])],
)
def test_geometry_gives_a_padded_strip_thinner_than_a_pixel_one_pixel(
    width: int, height: int, content_box: list[int]
) -> None:
    data = image_bytes(Image.new("RGB", (width, height), RED), "PNG")
    geometry = image_geometry(data, (64, 64), "pad")
    assert geometry is not None and geometry["content_box"] == content_box


def test_geometry_gives_the_upright_size_of_an_exif_rotated_photo() -> None:
    img = Image.new("RGB", (200, 100), RED)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored 200x100, shown 100x200
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", exif=exif)
    assert image_geometry(buffer.getvalue(), (64, 64), "crop") == {
        "source_size": [100, 200],
        "crop_box": [0.0, 50.0, 100.0, 150.0],
        "content_box": [0, 0, 64, 64],
        "resize_filter": "bicubic",
    }


@pytest.mark.parametrize(
    ("orientation", "upright"),
    [(n, [200, 100]) for n in (1, 2, 3, 4)] + [(n, [100, 200]) for n in (5, 6, 7, 8)],
)
def test_geometry_swaps_the_sides_for_each_exif_orientation_that_transposes(
    orientation: int, upright: list[int]
) -> None:
    geometry = image_geometry(
        exif_jpeg(Image.new("RGB", (200, 100), RED), orientation), (64, 64), "stretch"
    )
    assert geometry is not None and geometry["source_size"] == upright


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def exif_orientation(orientation: int) -> bytes:
    """An eXIf chunk's data: the EXIF (TIFF) bytes without the "Exif\\0\\0" of a JPEG's."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return exif.tobytes().removeprefix(b"Exif\x00\x00")


def png_then(chunk: bytes, before_end: bool = True) -> bytes:
    """A 200x100 PNG with ``chunk`` after its image data: before IEND, or after it."""
    png = image_bytes(Image.new("RGB", (200, 100), RED), "PNG")
    body, end = png[:-12], png[-12:]  # IEND is the last 12 bytes
    return body + chunk + end if before_end else png + chunk


def test_geometry_finds_a_png_exif_orientation_written_after_the_image_data() -> None:
    data = png_then(png_chunk(b"eXIf", exif_orientation(6)))
    with Image.open(io.BytesIO(data)) as img:
        assert img.getexif()[ExifTags.Base.Orientation] == 6  # Pillow finds it too, decoding
    geometry = image_geometry(data, (64, 64), "crop")
    assert geometry is not None and geometry["source_size"] == [100, 200]


def test_geometry_of_an_exif_rotated_tiff_is_its_upright_size() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (200, 100), RED).save(buffer, "TIFF", tiffinfo={274: 6})
    geometry = image_geometry(buffer.getvalue(), (64, 64), "crop")
    assert geometry is not None and geometry["source_size"] == [100, 200]
    assert decode_image(buffer.getvalue(), (64, 32), "stretch").shape == (3, 64, 32)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_geometry_of_an_image_whose_exif_has_no_orientation_is_as_stored(fmt: str) -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "tokserve"
    if fmt == "PNG":  # after the image data, where only the chunk walk finds it
        data = png_then(png_chunk(b"eXIf", exif.tobytes().removeprefix(b"Exif\x00\x00")))
    else:
        data = image_bytes(Image.new("RGB", (200, 100), RED), "JPEG", exif=exif)
    geometry = image_geometry(data, (64, 64), "crop")
    assert geometry is not None and geometry["source_size"] == [200, 100]


def test_geometry_ignores_an_exif_chunk_after_a_pngs_end() -> None:
    data = png_then(png_chunk(b"eXIf", exif_orientation(6)), before_end=False)
    geometry = image_geometry(data, (64, 64), "crop")
    assert geometry is not None and geometry["source_size"] == [200, 100]


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_geometry_of_a_png_decodes_no_pixels_so_damaged_image_data_still_has_its_size(
    damage: str,
) -> None:
    png = image_bytes(Image.new("RGB", (200, 100), RED), "PNG")
    idat = png.index(b"IDAT") + 4
    if damage == "corrupt":
        data = png[:idat] + bytes(b ^ 0xFF for b in png[idat : idat + 8]) + png[idat + 8 :]
    else:
        data = png[: idat + 8]
    with pytest.raises(UnsupportedMedia):
        decode_image(data, (64, 64))
    geometry = image_geometry(data, (64, 64), "crop")
    assert geometry is not None and geometry["source_size"] == [200, 100]


def test_geometry_of_an_image_format_not_accepted_is_none() -> None:
    assert (
        image_geometry(image_bytes(Image.new("RGB", (16, 16), RED), "PPM"), (8, 8), "crop") is None
    )


def test_unknown_resize_mode_answers_400_naming_the_modes() -> None:
    with pytest.raises(BadRequest, match="crop, pad or stretch"):
        decode_image(banded_image(), (64, 64), "zoom")  # type: ignore[arg-type]


# Images: bad input


def test_empty_image_answers_400_and_names_formats() -> None:
    with pytest.raises(BadRequest) as caught:
        decode_image(b"", (16, 16))
    assert "empty" in caught.value.detail and names_all(caught.value.detail, IMAGE_FORMAT_NAMES)


def test_garbage_bytes_answer_415_and_name_image_formats() -> None:
    with pytest.raises(UnsupportedMedia) as caught:
        decode_image(b"this is plain text, not a picture", (16, 16))
    assert names_all(caught.value.detail, IMAGE_FORMAT_NAMES)


def test_image_format_not_accepted_answers_415() -> None:
    data = image_bytes(Image.new("RGB", (16, 16), RED), "PPM")
    with pytest.raises(UnsupportedMedia):
        decode_image(data, (16, 16))


def test_truncated_png_answers_415_and_names_formats() -> None:
    data = noise_png()
    with pytest.raises(UnsupportedMedia) as caught:
        decode_image(data[: len(data) // 2], (16, 16))
    assert "truncated" in caught.value.detail and names_all(caught.value.detail, IMAGE_FORMAT_NAMES)


def test_truncated_jpeg_answers_415_and_names_formats() -> None:
    rng = np.random.default_rng(1)
    data = image_bytes(Image.fromarray(rng.integers(0, 256, (128, 128, 3), np.uint8)), "JPEG")
    with pytest.raises(UnsupportedMedia) as caught:
        decode_image(data[: len(data) // 2], (16, 16))
    assert caught.value.detail.startswith(
        "The JPEG image could not be decoded: it is truncated or corrupt ("
    )
    assert caught.value.detail.endswith(f"); send a complete {ACCEPTED_IMAGES}.")


def test_png_cut_inside_its_header_answers_415_without_naming_a_format() -> None:
    with pytest.raises(UnsupportedMedia) as caught:
        decode_image(noise_png()[:16], (16, 16))
    assert caught.value.detail.startswith(
        "The image could not be decoded: it is truncated or corrupt ("
    )
    assert caught.value.detail.endswith(f"); send a complete {ACCEPTED_IMAGES}.")


def test_decompression_bomb_header_answers_413_naming_the_limit() -> None:
    with pytest.raises(PayloadTooLarge) as caught:
        decode_image(png_header_only(100_000, 100_000), (16, 16))
    assert caught.value.detail == (
        "The image declares more pixels than the limit of 40,000,000; send a smaller image."
    )


def test_pixels_over_the_limit_are_refused_from_the_header_before_decoding() -> None:
    # No pixel data follows the header: decoding would fail, so a 413 means it never started.
    with pytest.raises(PayloadTooLarge) as caught:
        decode_image(png_header_only(8000, 8000), (16, 16))
    assert "8000x8000" in caught.value.detail and "40,000,000" in caught.value.detail


def test_max_pixels_limits_real_images() -> None:
    with pytest.raises(PayloadTooLarge) as caught:
        decode_image(noise_png(100, 100), (16, 16), max_pixels=9_999)
    assert caught.value.detail == (
        "The image is 100x100 = 10,000 pixels; at most 9,999 pixels are accepted. "
        "Send a smaller image."
    )


def test_image_of_exactly_max_pixels_is_accepted() -> None:
    assert decode_image(noise_png(100, 100), (16, 16), max_pixels=10_000).shape == (3, 16, 16)


def test_mutated_images_never_raise_anything_but_problems() -> None:
    rng = np.random.default_rng(2)
    originals = [noise_png(24, 24), PHOTO.read_bytes()[:4000]]
    for original in originals:
        for _ in range(100):
            mutated = bytearray(original)
            for position in rng.integers(0, len(mutated), 4):
                mutated[position] = int(rng.integers(0, 256))
            with contextlib.suppress(BadRequest, PayloadTooLarge, UnsupportedMedia):
                decode_image(bytes(mutated), (16, 16))


def test_concurrent_decodes_give_identical_pixels() -> None:
    data = PHOTO.read_bytes()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: decode_image(data, (128, 128), "pad"), range(8)))
    assert all(torch.equal(results[0], other) for other in results[1:])


# Images: encoding


def random_rgb(height: int = 24, width: int = 32) -> np.ndarray:
    """8-bit RGB [H, W, 3], what the image runner hands to encode_image."""
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


def as_pixels(rgb: np.ndarray) -> torch.Tensor:
    """The model input decode_image makes of those 8-bit values: [3, H, W] in [-1, 1]."""
    return torch.from_numpy(rgb.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0)


def test_png_encoding_round_trips_exactly() -> None:
    rgb = random_rgb()
    data = encode_image(rgb, "png")
    assert data.startswith(b"\x89PNG")
    assert torch.equal(decode_image(data, (24, 32)), as_pixels(rgb))


@pytest.mark.parametrize(
    ("fmt", "magic"), [("webp", b"RIFF"), ("JPEG", b"\xff\xd8"), ("Jpg", b"\xff\xd8")]
)
def test_lossy_encodings_round_trip_closely_whatever_the_case(fmt: str, magic: bytes) -> None:
    rgb = np.broadcast_to(np.linspace(0, 255, 32).astype(np.uint8)[None, :, None], (24, 32, 3))
    data = encode_image(rgb, fmt)
    assert data.startswith(magic)
    assert (decode_image(data, (24, 32)) - as_pixels(rgb)).abs().mean() < 0.03


def test_unknown_image_encoding_answers_400_naming_formats() -> None:
    with pytest.raises(BadRequest) as caught:
        encode_image(random_rgb(), "gif")
    assert caught.value.detail == "Unknown image format 'gif'; choose one of png, webp, jpeg."


def test_image_encoding_is_png_unless_asked() -> None:
    rgb = random_rgb()
    data = encode_image(rgb)
    assert data.startswith(b"\x89PNG") and torch.equal(decode_image(data, (24, 32)), as_pixels(rgb))


def test_image_encoding_takes_levels_0_to_255_of_any_integer_type() -> None:
    rgb = random_rgb()
    data = encode_image(rgb.astype(np.int64), "png")
    assert torch.equal(decode_image(data, (24, 32)), as_pixels(rgb))


def test_jpeg_encoding_uses_quality_90() -> None:
    rgb = random_rgb()
    reference = image_bytes(Image.fromarray(rgb), "JPEG", quality=90)
    with (
        Image.open(io.BytesIO(encode_image(rgb, "jpeg"))) as ours,
        Image.open(io.BytesIO(reference)) as theirs,
    ):
        assert ours.quantization == theirs.quantization


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """The (type, body) of each chunk of a PNG, after checking the signature and each CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack_from(">I", data, offset)
        kind, body = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        assert struct.unpack_from(">I", data, offset + 8 + length) == (zlib.crc32(kind + body),)
        chunks.append((kind, body))
        offset += 12 + length
    return chunks


def test_png_encoding_is_an_ihdr_for_8_bit_rgb_one_idat_and_an_empty_iend() -> None:
    chunks = png_chunks(encode_image(random_rgb(24, 32), "png"))
    assert [kind for kind, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    # 32x24, 8 bits, RGB, deflate, adaptive filtering, not interlaced
    assert chunks[0][1] == struct.pack(">IIBBBBB", 32, 24, 8, 2, 0, 0, 0)
    assert chunks[2][1] == b""


def test_png_rows_are_sub_filtered_and_huffman_coded_without_string_matching() -> None:
    idat = png_chunks(encode_image(np.full((64, 64, 3), 200, np.uint8), "png"))[1][1]
    rows = zlib.decompress(idat)
    row_bytes = 1 + 64 * 3
    assert len(rows) == 64 * row_bytes
    assert {rows[y * row_bytes] for y in range(64)} == {1}  # filter type Sub
    # Huffman-only coding spends at least a bit per byte; string matching (LZ77) would shrink
    # a flat image to a few hundred bytes, at three times the encoding time
    assert len(idat) >= len(rows) // 8


# Audio: formats, resampling, channels


@pytest.mark.parametrize(
    ("fmt", "subtype", "sample_rate"),
    [
        ("WAV", "PCM_16", 16000),
        ("WAV", "FLOAT", 16000),
        ("FLAC", "PCM_16", 16000),
        ("OGG", "VORBIS", 16000),
        ("OGG", "OPUS", 48000),
        ("MP3", "MPEG_LAYER_III", 16000),
        ("AIFF", "PCM_16", 16000),
        # codecs libsndfile cannot seek in: read with the length the header declares
        ("WAV", "GSM610", 8000),
        ("AU", "G721_32", 16000),
    ],
)
def test_each_audio_format_decodes_with_its_pitch_and_duration(
    fmt: str, subtype: str, sample_rate: int
) -> None:
    data = audio_bytes(sine(440.0, sample_rate, 1.0), sample_rate, fmt, subtype)
    wave, info = decode_audio(data, 16000)
    assert wave.shape[0] == 1 and wave.dtype == torch.float32
    assert abs(info.duration_s - 1.0) < 0.1 and abs(wave.shape[1] - 16000) < 1600
    assert abs(peak_hz(wave[0], 16000) - 440.0) < 3.0


def test_an_ogg_opus_file_starting_past_granule_0_decodes_in_time() -> None:
    """Read from the open, libsndfile kept such a file's 312 pre-skip samples (the encoder's
    delay, not audio) and cut its last 312: its speech came 6.5 ms late."""
    source = decode_audio(LONG_CLIP.read_bytes(), 48000)[0][0].numpy()[: 3 * 48000]
    wave = decode_audio(live_ogg_opus(source), 48000)[0][0].numpy()
    assert len(wave) == len(source)
    body = slice(1000, len(source) - 1000)
    lags = range(-400, 401)
    best = max(lags, key=lambda lag: float(np.dot(source[body], np.roll(wave, -lag)[body])))
    assert abs(best) <= 8, best


def test_real_speech_clip_decodes_at_the_model_rate() -> None:
    wave, info = decode_audio(SPEECH.read_bytes(), 16000)
    assert info.source_sample_rate == 24000 and info.sample_rate == 16000
    assert abs(wave.shape[1] - info.duration_s * 16000) <= 1
    assert torch.isfinite(wave).all() and wave.abs().max() > 0.01


def test_resampling_44k1_to_24k_keeps_a_1khz_sine_at_1khz() -> None:
    wave, info = decode_audio(audio_bytes(sine(1000.0, 44100, 1.0), 44100), 24000)
    assert wave.shape == (1, 24000) and info.samples == 24000
    assert abs(peak_hz(wave[0], 24000) - 1000.0) <= 1.0


def test_decoded_audio_reports_the_source_and_the_result() -> None:
    stereo = np.stack([sine(300.0, 44100, 0.5)] * 2, axis=1)
    _, info = decode_audio(audio_bytes(stereo, 44100), 22050)
    assert info == DecodedAudio(
        source_sample_rate=44100,
        source_channels=2,
        duration_s=0.5,
        sample_rate=22050,
        samples=11025,
        resampled=True,
        downmixed=True,
    )


@pytest.mark.parametrize(
    ("source_rate", "source_channels", "channels", "resampled", "downmixed"),
    [
        (16000, 1, 1, False, False),
        (16000, 2, 2, False, False),
        (16000, 1, 2, False, False),  # repeated, not mixed
        (8000, 3, 1, True, True),
    ],
)
def test_decoded_audio_says_whether_it_was_resampled_and_downmixed(
    source_rate: int, source_channels: int, channels: int, resampled: bool, downmixed: bool
) -> None:
    clip = np.zeros((source_rate // 10, source_channels), np.float32)
    _, info = decode_audio(audio_bytes(clip, source_rate), 16000, channels=channels)
    assert (info.resampled, info.downmixed) == (resampled, downmixed)


def test_header_preprocessing_reports_what_decoding_does_to_the_file() -> None:
    header = AudioHeader(sample_rate=44100, frames=22050, channels=2)
    assert header.preprocessing(24000, 1) == {
        "source_sample_rate": 44100,
        "source_channels": 2,
        "samples": 22050,
        "resampled": True,
        "downmixed": True,
    }
    assert header.preprocessing(44100, 2) == {
        "source_sample_rate": 44100,
        "source_channels": 2,
        "samples": 22050,
        "resampled": False,
        "downmixed": False,
    }


def test_stereo_is_averaged_to_mono() -> None:
    stereo = np.stack([np.full(800, 0.6, np.float32), np.full(800, 0.2, np.float32)], axis=1)
    wave, _ = decode_audio(audio_bytes(stereo, 8000, subtype="FLOAT"), 8000)
    assert wave.shape == (1, 800)
    assert torch.allclose(wave, torch.full((1, 800), 0.4))


def test_many_channels_become_their_float32_mean_for_a_mono_model() -> None:
    surround = np.random.default_rng(4).uniform(-0.9, 0.9, (800, 3)).astype(np.float32)
    wave, info = decode_audio(audio_bytes(surround, 8000, subtype="FLOAT"), 8000)
    assert info.source_channels == 3
    assert torch.equal(wave[0], torch.from_numpy(surround.mean(axis=1)))


def test_mono_is_repeated_for_a_stereo_model() -> None:
    mono = sine(200.0, 8000, 0.1)
    wave, _ = decode_audio(audio_bytes(mono, 8000, subtype="FLOAT"), 8000, channels=2)
    assert wave.shape == (2, 800)
    assert torch.equal(wave[0], torch.from_numpy(mono)) and torch.equal(wave[1], wave[0])


def test_three_channels_for_a_stereo_model_answer_422() -> None:
    surround = np.zeros((800, 3), np.float32)
    with pytest.raises(Unprocessable, match="3 channels"):
        decode_audio(audio_bytes(surround, 8000), 8000, channels=2)


def test_audio_header_states_the_rate_frames_and_channels() -> None:
    stereo = np.stack([sine(300.0, 44100, 0.5)] * 2, axis=1)
    assert audio_header(audio_bytes(stereo, 44100)) == AudioHeader(44100, 22050, 2)


def test_audio_header_of_a_flac_of_unknown_length_is_none() -> None:
    assert audio_header(flac_of_unknown_length(sine(440.0, 16000, 1.0), 16000)) is None


def test_audio_header_of_bytes_that_are_not_audio_is_none() -> None:
    assert audio_header(b"this is plain text, not a recording" * 10) is None


# Audio: bad input


def test_empty_audio_answers_400_and_names_formats() -> None:
    with pytest.raises(BadRequest) as caught:
        decode_audio(b"", 16000)
    assert "empty" in caught.value.detail and names_all(caught.value.detail, AUDIO_FORMAT_NAMES)


def test_garbage_bytes_answer_415_and_name_audio_formats() -> None:
    with pytest.raises(UnsupportedMedia) as caught:
        decode_audio(b"this is plain text, not a recording" * 10, 16000)
    assert names_all(caught.value.detail, AUDIO_FORMAT_NAMES)


def test_truncated_wav_answers_415_saying_truncated() -> None:
    data = audio_bytes(sine(440.0, 16000, 1.0), 16000)
    with pytest.raises(UnsupportedMedia) as caught:
        decode_audio(data[: len(data) * 6 // 10], 16000)
    assert caught.value.detail == (
        "The audio is truncated: it ends before the length its header declares; send a "
        f"complete {ACCEPTED_AUDIO}."
    )


def test_wav_missing_only_its_last_sample_answers_415_truncated() -> None:
    data = audio_bytes(sine(440.0, 8000, 0.1), 8000)
    with pytest.raises(UnsupportedMedia, match="truncated"):
        decode_audio(data[:-2], 8000)


def test_wav_cut_right_after_its_data_chunk_header_answers_415_truncated() -> None:
    data = audio_bytes(sine(440.0, 8000, 0.1), 8000)
    with pytest.raises(UnsupportedMedia, match="truncated"):
        decode_audio(data[: data.find(b"data") + 8], 8000)


@pytest.mark.parametrize(
    ("fmt", "subtype", "endian"),
    [
        ("WAV", "PCM_16", "BIG"),  # RIFX
        ("RF64", "PCM_16", "FILE"),  # the data chunk's size is in the ds64 chunk
        ("AIFF", "PCM_16", "FILE"),
        ("AIFF", "FLOAT", "FILE"),  # AIFF-C
    ],
)
def test_wav_and_aiff_variants_missing_their_last_sample_answer_415(
    fmt: str, subtype: str, endian: str
) -> None:
    # libsndfile reads each of them cut short without an error, just fewer frames
    data = audio_bytes(sine(440.0, 8000, 0.1), 8000, fmt, subtype, endian)
    assert decode_audio(data, 8000)[0].shape == (1, 800)
    with pytest.raises(UnsupportedMedia, match="truncated"):
        decode_audio(data[:-2], 8000)


def test_wav_whose_data_chunk_declares_2_gib_it_does_not_hold_answers_415() -> None:
    data = bytearray(audio_bytes(sine(440.0, 8000, 0.1), 8000))
    size_at = data.find(b"data") + 4
    data[size_at : size_at + 4] = struct.pack("<I", 2**31)  # chunk sizes are unsigned
    with pytest.raises(UnsupportedMedia, match="truncated"):
        decode_audio(bytes(data), 8000)


def test_rf64_whose_ds64_chunk_declares_8_eib_it_does_not_hold_answers_415() -> None:
    data = bytearray(audio_bytes(sine(440.0, 8000, 0.1), 8000, "RF64"))
    data_size_at = data.find(b"ds64") + 16  # after the chunk header and the RIFF's own size
    data[data_size_at : data_size_at + 8] = struct.pack("<Q", 2**63)  # unsigned, like all sizes
    with pytest.raises(UnsupportedMedia, match="truncated"):
        decode_audio(bytes(data), 8000)


def test_truncated_wav_with_an_odd_length_chunk_before_its_data_answers_415() -> None:
    # RIFF pads a chunk of odd length with one byte; the data chunk's header follows the pad
    data = audio_bytes(sine(440.0, 8000, 0.1), 8000)
    fmt_end = data.find(b"data")
    note = b"note" + struct.pack("<I", 5) + b"hello" + b"\0"
    wav = data[:4] + struct.pack("<I", len(data) - 8 + len(note)) + data[8:fmt_end] + note
    wav += data[fmt_end:]
    assert decode_audio(wav, 8000)[0].shape == (1, 800)
    with pytest.raises(UnsupportedMedia, match="truncated"):
        decode_audio(wav[:-100], 8000)


def test_streamed_wav_with_unknown_length_is_accepted() -> None:
    data = bytearray(audio_bytes(sine(440.0, 16000, 1.0), 16000))
    data_chunk = data.find(b"data")
    data[4:8] = data[data_chunk + 4 : data_chunk + 8] = b"\xff\xff\xff\xff"
    wave, _ = decode_audio(bytes(data), 16000)
    assert wave.shape == (1, 16000)


def test_flac_of_unknown_length_answers_422_asking_for_a_complete_header() -> None:
    data = flac_of_unknown_length(sine(440.0, 16000, 1.0), 16000)
    with pytest.raises(Unprocessable) as caught:
        decode_audio(data, 16000)
    assert caught.value.detail == (
        "The audio does not declare its length (a FLAC written to a pipe or a WebM recorded "
        "live, say), which cannot be read safely; send a file whose header states its length, "
        f"such as a {ACCEPTED_AUDIO}."
    )


def test_truncated_flac_answers_415_and_names_formats() -> None:
    data = audio_bytes(sine(440.0, 16000, 1.0), 16000, "FLAC")
    with pytest.raises(UnsupportedMedia) as caught:
        decode_audio(data[: len(data) * 6 // 10], 16000)
    assert names_all(caught.value.detail, AUDIO_FORMAT_NAMES)


def test_mp3_ending_before_its_declared_length_answers_415() -> None:
    # libsndfile reads it without error, just fewer frames than the Xing header declares.
    data = audio_bytes(sine(440.0, 16000, 1.0), 16000, "MP3", "MPEG_LAYER_III")
    with pytest.raises(UnsupportedMedia, match="truncated"):
        decode_audio(data[: len(data) // 2], 16000)


def test_audio_longer_than_the_limit_answers_413_naming_the_limit() -> None:
    data = audio_bytes(sine(440.0, 8000, 2.0), 8000)
    with pytest.raises(PayloadTooLarge) as caught:
        decode_audio(data, 8000, max_seconds=1.5)
    assert "2.0 s" in caught.value.detail and "1.5 s" in caught.value.detail


def test_audio_of_exactly_the_default_600_s_is_accepted() -> None:
    wave, info = decode_audio(audio_bytes(np.zeros(60_000, np.float32), 100), 100)
    assert wave.shape == (1, 60_000) and info.duration_s == 600.0


def test_audio_over_the_default_600_s_answers_413() -> None:
    with pytest.raises(PayloadTooLarge) as caught:
        decode_audio(audio_bytes(np.zeros(60_001, np.float32), 100), 100)
    assert caught.value.detail == (
        "The audio is 600.0 s long; at most 600 s is accepted. Send a shorter clip."
    )


def test_any_sample_rate_is_accepted_when_no_minimum_is_set() -> None:
    wave, info = decode_audio(audio_bytes(np.full(3, 0.5, np.float32), 1, subtype="FLOAT"), 1)
    assert info.source_sample_rate == 1 and torch.equal(wave, torch.full((1, 3), 0.5))


def test_audio_below_the_minimum_rate_answers_422_naming_the_setting() -> None:
    data = audio_bytes(sine(440.0, 7999, 0.1), 7999)
    with pytest.raises(Unprocessable) as caught:
        decode_audio(data, 16000, min_sample_rate=8000)
    assert caught.value.detail == (
        "The audio's header declares 7999 Hz; at least 8000 Hz is accepted "
        "(TOKSERVE_MIN_AUDIO_SAMPLE_RATE). Send audio at its real rate."
    )


def test_audio_at_exactly_the_minimum_rate_is_accepted() -> None:
    wave, info = decode_audio(audio_bytes(sine(440.0, 8000, 0.1), 8000), 8000, min_sample_rate=8000)
    assert wave.shape == (1, 800) and info.source_sample_rate == 8000


def test_samples_up_to_the_memory_budget_are_accepted() -> None:
    # 0.5 s allows 0.5 s x 48 kHz x 2 channels = 48,000 samples: 6,000 frames of 8 channels
    octo = np.zeros((6_000, 8), np.float32)
    wave, info = decode_audio(audio_bytes(octo, 96_000), 96_000, max_seconds=0.5)
    assert wave.shape == (1, 6_000) and info.source_channels == 8


def test_samples_over_the_memory_budget_answer_413_with_the_counts() -> None:
    octo = np.zeros((6_001, 8), np.float32)
    with pytest.raises(PayloadTooLarge) as caught:
        decode_audio(audio_bytes(octo, 96_000), 96_000, max_seconds=0.5)
    assert caught.value.detail == (
        "The audio holds 48008 samples (8 channels at 96000 Hz); at most 48000 are accepted "
        "(0.5 s of 2-channel 48 kHz audio)."
    )


def test_audio_with_zero_samples_answers_422() -> None:
    with pytest.raises(Unprocessable) as caught:
        decode_audio(audio_bytes(np.zeros((0, 1), np.float32), 16000), 16000)
    assert caught.value.detail == (
        "The audio contains no samples; send at least one sample of audio."
    )


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_audio_with_non_finite_samples_answers_422(bad_value: float) -> None:
    samples = sine(440.0, 8000, 0.1)
    samples[100] = bad_value
    with pytest.raises(Unprocessable) as caught:
        decode_audio(audio_bytes(samples, 8000, subtype="FLOAT"), 8000)
    assert caught.value.detail == (
        "The audio contains NaN or infinite samples; send finite samples, nominally in [-1, 1]."
    )


def test_audio_too_short_to_resample_answers_422() -> None:
    with pytest.raises(Unprocessable, match="too short"):
        decode_audio(audio_bytes(np.full(1, 0.5, np.float32), 48000), 8000)


def test_mutated_audio_never_raises_anything_but_problems() -> None:
    rng = np.random.default_rng(3)
    originals = [audio_bytes(sine(440.0, 8000, 0.2), 8000, fmt) for fmt in ("WAV", "FLAC")]
    for original in originals:
        for _ in range(100):
            mutated = bytearray(original)
            for position in rng.integers(0, len(mutated), 4):
                mutated[position] = int(rng.integers(0, 256))
            with contextlib.suppress(BadRequest, PayloadTooLarge, UnsupportedMedia, Unprocessable):
                decode_audio(bytes(mutated), 8000)


# Audio through FFmpeg: MP4 and M4A, WebM and Matroska


def tone(freq_hz: float, sample_rate: int, seconds: float, channels: int = 1) -> np.ndarray:
    """A sine [C, T] float32, each channel at its own level."""
    wave = sine(freq_hz, sample_rate, seconds)
    return np.stack([wave * (1.0 - 0.3 * c) for c in range(channels)])


def m4a(seconds: float = 1.0, sample_rate: int = 24000, channels: int = 1) -> bytes:
    """AAC in M4A: the track's length in its moov box, written after the samples."""
    return ffmpeg_audio(tone(440.0, sample_rate, seconds, channels), sample_rate, "ipod", "aac")


def webm(seconds: float = 1.0, sample_rate: int = 48000, **options: str) -> bytes:
    """Opus in WebM: the length in its Segment Info, written before the samples."""
    source = tone(440.0, sample_rate, seconds)
    return ffmpeg_audio(source, sample_rate, "webm", "libopus", options=options)


@pytest.mark.parametrize(
    ("container", "codec", "sample_rate", "video"),
    [
        ("ipod", "aac", 24000, False),  # M4A
        ("ipod", "alac", 44100, False),  # Apple Lossless in M4A
        ("mp4", "aac", 48000, True),  # a phone's video: the audio track is read
        ("mov", "aac", 44100, True),
        ("webm", "libopus", 48000, False),
        ("matroska", "libopus", 48000, True),
        ("matroska", "flac", 16000, False),
    ],
)
def test_each_ffmpeg_container_decodes_its_audio_track_with_its_pitch_and_duration(
    container: str, codec: str, sample_rate: int, video: bool
) -> None:
    data = ffmpeg_audio(tone(440.0, sample_rate, 1.0), sample_rate, container, codec, video)
    wave, info = decode_audio(data, 16000)
    assert wave.shape[0] == 1 and wave.dtype == torch.float32
    assert info.source_sample_rate == sample_rate and info.resampled == (sample_rate != 16000)
    assert abs(info.duration_s - 1.0) < 0.05 and abs(wave.shape[1] - 16000) < 800
    assert abs(peak_hz(wave[0], 16000) - 440.0) < 3.0


@pytest.mark.parametrize("data", [m4a(1.0), webm(1.0)], ids=["m4a", "webm"])
def test_an_ffmpeg_track_decodes_to_exactly_the_length_its_container_declares(
    data: bytes,
) -> None:
    # AAC decodes 248 samples past the moov's length (encoder padding), Opus 342 short of the
    # WebM's millisecond duration: the first is cut, the second filled with silence
    header = audio_header(data)
    assert header is not None
    wave, info = decode_audio(data, header.sample_rate)
    assert wave.shape[1] == info.samples == header.frames
    assert info.duration_s == header.frames / header.sample_rate


def test_ffmpeg_decoding_matches_the_source_within_the_codec_loss() -> None:
    source = tone(440.0, 48000, 1.0)
    wave, _ = decode_audio(ffmpeg_audio(source, 48000, "matroska", "flac"), 48000)
    # FLAC is lossless: 16-bit steps apart from the float source
    assert np.abs(wave.numpy() - source).max() < 2.0 / 32768
    wave, _ = decode_audio(webm(1.0), 48000)
    error = wave.numpy()[0, 4800:43200] - source[0, 4800:43200]
    assert np.sqrt(np.mean(error**2)) < 0.05  # Opus, well below the tone's 0.35 RMS


def test_stereo_m4a_is_averaged_to_mono_and_says_so() -> None:
    wave, info = decode_audio(m4a(1.0, 24000, channels=2), 24000)
    assert (info.source_channels, info.downmixed, info.resampled) == (2, True, False)
    mono, _ = decode_audio(m4a(1.0, 24000, channels=1), 24000)
    # the channels are 1.0 and 0.7 of the tone: their mean is 0.85 of it
    level = float(wave[0].abs().max() / mono[0].abs().max())
    assert abs(level - 0.85) < 0.03


def test_ffmpeg_decoding_is_the_same_on_every_call_and_thread() -> None:
    data = m4a(1.0, 24000, channels=2)
    first, _ = decode_audio(data, 16000)
    with ThreadPoolExecutor(4) as pool:
        waves = list(pool.map(lambda _: decode_audio(data, 16000)[0], range(8)))
    assert all(torch.equal(wave, first) for wave in waves)


@pytest.mark.parametrize("box", [b"free", b"skip", b"wide"])
def test_an_iso_media_file_opening_with_another_box_than_ftyp_is_read_by_ffmpeg(
    box: bytes,
) -> None:
    # the ftyp box renamed in place: the samples' offsets stay right, as in old QuickTime files
    data = m4a(0.5)
    data = data[:4] + box + data[8:]
    header = audio_header(data)
    assert header is not None and header.sample_rate == 24000
    _, info = decode_audio(data, 24000)
    assert info.samples == header.frames


def test_audio_header_of_an_m4a_and_a_webm_states_the_rate_frames_and_channels() -> None:
    assert audio_header(m4a(1.0, 24000, channels=2)) == AudioHeader(24000, 24000, 2)
    # Matroska's duration: the last block's start and length, in milliseconds
    assert audio_header(webm(1.0)) == AudioHeader(48000, 48384, 1)


def test_audio_header_of_a_webm_without_a_duration_is_none() -> None:
    assert audio_header(webm(1.0, live="1")) is None


def test_audio_header_of_an_m4a_cut_before_its_moov_is_none() -> None:
    data = m4a(1.0)
    assert audio_header(data[: len(data) // 2]) is None


def matroska_declaring(data: bytes, milliseconds: float) -> bytes:
    """A Matroska file whose Segment Info states another duration (FFmpeg writes it as an
    8-byte float of milliseconds)."""
    at = data.index(b"\x44\x89\x88") + 3
    return data[:at] + struct.pack(">d", milliseconds) + data[at + 8 :]


def flac_mkv(seconds: float) -> bytes:
    """FLAC in Matroska at 16 kHz: lossless, in 72 ms packets of 1152 samples."""
    return ffmpeg_audio(tone(440.0, 16000, seconds), 16000, "matroska", "flac")


def test_a_track_ending_up_to_two_codec_frames_short_is_filled_with_silence() -> None:
    # 16,000 samples; FFmpeg states no frame size for FLAC, so two frames of 1024 are allowed
    wave, info = decode_audio(matroska_declaring(flac_mkv(1.0), (16000 + 2048) / 16), 16000)
    assert info.samples == 16000 + 2048
    assert torch.count_nonzero(wave[0, 16000:]) == 0 and wave[0, :16000].abs().max() > 0.3
    with pytest.raises(UnsupportedMedia, match="truncated"):
        decode_audio(matroska_declaring(flac_mkv(1.0), (16000 + 2049) / 16), 16000)


def test_an_opus_track_ending_up_to_50_ms_short_is_filled_with_silence() -> None:
    # 48,000 samples at 48 kHz: 50 ms (2,400 samples) is more than two frames of 1024
    _, info = decode_audio(matroska_declaring(webm(1.0), (48000 + 2400) / 48), 48000)
    assert info.samples == 48000 + 2400
    with pytest.raises(UnsupportedMedia, match="truncated"):
        decode_audio(matroska_declaring(webm(1.0), (48000 + 2401) / 48), 48000)


def test_decoding_stops_at_the_declared_length_before_what_follows_it() -> None:
    data = flac_mkv(2.0)
    with av.open(io.BytesIO(data)) as container:
        packets = [bytes(packet) for packet in container.demux(audio=0) if packet.size]
    fifth = data.index(packets[4][:32])
    broken = data[:fifth] + b"\x00\x00" + data[fifth + 2 :]  # no FLAC frame sync
    # four packets are 4,608 samples, 288 ms: the broken fifth is never decoded
    wave, _ = decode_audio(matroska_declaring(broken, 288.0), 16000)
    assert wave.shape == (1, 4608)
    with pytest.raises(UnsupportedMedia, match=r"could not be decoded \(Invalid data"):
        decode_audio(matroska_declaring(broken, 288.0 + 1 / 16), 16000)


def test_an_m4a_whose_track_cannot_be_told_apart_answers_415_naming_formats() -> None:
    # the track's handler box claims 16 MiB more than the file holds: FFmpeg gives its track
    # no codec
    data = m4a(0.5)
    handler = data.index(b"hdlr") - 4
    data = data[:handler] + b"\x01" + data[handler + 1 :]
    with pytest.raises(UnsupportedMedia) as caught:
        decode_audio(data, 16000)
    assert caught.value.detail == (
        "The file's audio track is in a codec that cannot be decoded, or declares no rate or "
        f"channels; send a complete {ACCEPTED_AUDIO}."
    )
    assert audio_header(data) is None


def test_webm_longer_than_the_limit_answers_413_before_decoding() -> None:
    data = webm(2.0)
    # cut after the header: the limit is checked before a sample is decoded
    with pytest.raises(PayloadTooLarge) as caught:
        decode_audio(data[:500], 16000, max_seconds=1.5)
    assert caught.value.detail == (
        "The audio is 2.0 s long; at most 1.5 s is accepted. Send a shorter clip."
    )


def test_m4a_longer_than_the_limit_answers_413() -> None:
    with pytest.raises(PayloadTooLarge, match=r"1\.0 s long; at most 0\.5 s"):
        decode_audio(m4a(1.0), 16000, max_seconds=0.5)


def test_m4a_of_more_samples_than_the_memory_budget_answers_413() -> None:
    # 96 kHz stereo: 1 s is 192,000 samples, over the 2 x 48 kHz budget of 1 s
    data = ffmpeg_audio(tone(440.0, 96000, 0.5, channels=2), 96000, "ipod", "aac")
    with pytest.raises(PayloadTooLarge, match=r"\(2 channels at 96000 Hz\); at most 48000"):
        decode_audio(data, 16000, max_seconds=0.5)


def test_m4a_below_the_minimum_rate_answers_422_naming_the_setting() -> None:
    with pytest.raises(Unprocessable, match=r"declares 8000 Hz.*TOKSERVE_MIN_AUDIO_SAMPLE_RATE"):
        decode_audio(m4a(0.5, 8000), 16000, min_sample_rate=16000)


def test_stereo_m4a_for_a_model_of_three_channels_answers_422() -> None:
    with pytest.raises(Unprocessable, match="2 channels and the model takes 3"):
        decode_audio(m4a(0.5, 24000, channels=2), 24000, channels=3)


def test_webm_without_a_duration_answers_422_asking_for_one() -> None:
    with pytest.raises(Unprocessable) as caught:
        decode_audio(webm(1.0, live="1"), 16000)
    assert caught.value.detail.startswith("The audio does not declare its length")


def test_video_without_an_audio_track_answers_422() -> None:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        picture = out.add_stream("mpeg4", rate=25)
        picture.width, picture.height, picture.pix_fmt = 64, 48, "yuv420p"
        for index in range(5):
            image = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
            image.pts = index
            out.mux(picture.encode(image))
        out.mux(picture.encode(None))
    with pytest.raises(Unprocessable) as caught:
        decode_audio(buffer.getvalue(), 16000)
    assert caught.value.detail == (
        "The file holds no audio track (a video without sound?); send a file with one, such as "
        f"a {ACCEPTED_AUDIO}."
    )
    assert audio_header(buffer.getvalue()) is None


def test_webm_cut_short_answers_415_truncated() -> None:
    data = webm(1.0)
    with pytest.raises(UnsupportedMedia) as caught:
        decode_audio(data[: len(data) * 6 // 10], 16000)
    assert caught.value.detail == (
        "The audio is truncated: it ends before the length its header declares; send a "
        f"complete {ACCEPTED_AUDIO}."
    )


def test_webm_missing_more_than_its_last_codec_frames_is_truncated() -> None:
    # 2 s: cut 0.2 s before its end, more than the 50 ms a track may end early
    data = webm(2.0)
    header = audio_header(data)
    assert header is not None
    cut = next(
        size
        for size in range(len(data), 0, -50)
        if audio_header(data[:size]) is not None and _decoded_frames(data[:size]) < 0.9 * 96000
    )
    with pytest.raises(UnsupportedMedia, match="truncated"):
        decode_audio(data[:cut], 48000)


def _decoded_frames(data: bytes) -> int:
    """Samples per channel FFmpeg decodes from a file, however long it says it is."""
    with av.open(io.BytesIO(data)) as container:
        return sum(frame.samples for frame in container.decode(audio=0))


def test_m4a_cut_before_its_moov_answers_415_naming_formats() -> None:
    data = m4a(1.0)
    with pytest.raises(UnsupportedMedia) as caught:
        decode_audio(data[: len(data) // 2], 16000)
    assert caught.value.detail.startswith("The audio could not be decoded (")
    assert names_all(caught.value.detail, AUDIO_FORMAT_NAMES)


def test_bytes_that_only_look_like_mp4_answer_415() -> None:
    with pytest.raises(UnsupportedMedia, match="could not be decoded"):
        decode_audio(b"\x00\x00\x00\x18ftypM4A " + bytes(200), 16000)
    with pytest.raises(UnsupportedMedia, match="could not be decoded"):
        decode_audio(b"\x1a\x45\xdf\xa3" + bytes(200), 16000)


@pytest.mark.parametrize("data", [m4a(0.3), webm(0.3)], ids=["m4a", "webm"])
def test_mutated_ffmpeg_audio_never_raises_anything_but_problems(data: bytes) -> None:
    rng = np.random.default_rng(5)
    for _ in range(100):
        mutated = bytearray(data)
        for position in rng.integers(0, len(mutated), 4):
            mutated[position] = int(rng.integers(0, 256))
        with contextlib.suppress(BadRequest, PayloadTooLarge, UnsupportedMedia, Unprocessable):
            decode_audio(bytes(mutated), 16000)
        audio_header(bytes(mutated))


# Audio: encoding


@pytest.mark.parametrize("fmt", ["wav", "FLAC"])
def test_lossless_audio_encodings_round_trip_to_16_bits(fmt: str) -> None:
    wave = torch.from_numpy(np.stack([sine(440.0, 16000, 0.5), sine(660.0, 16000, 0.5)]))
    decoded, info = decode_audio(encode_audio(wave, 16000, fmt), 16000, channels=2)
    assert info.source_channels == 2 and decoded.shape == wave.shape
    assert (decoded - wave).abs().max() <= 1.0 / 32767


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_wav_answers_are_byte_for_byte_what_libsndfile_writes(channels: int) -> None:
    rng = np.random.default_rng(channels)
    wave = rng.normal(0.0, 0.6, (channels, 4001)).astype(np.float32)
    # full scale, beyond it, and values a rounding step apart at and around zero
    wave[0, :9] = [1.0, -1.0, 2.0, -np.inf, 0.0, 0.5 / 32768, -0.5 / 32768, 1.5 / 32768, -1e-9]
    reference = io.BytesIO()
    sf.write(reference, np.clip(wave, -1.0, 1.0).T, 24000, format="WAV", subtype="PCM_16")
    assert encode_audio(torch.from_numpy(wave), 24000, "wav") == reference.getvalue()


def test_ogg_vorbis_encoding_round_trips_pitch_and_length() -> None:
    wave = torch.from_numpy(sine(1000.0, 24000, 1.0)).unsqueeze(0)
    data = encode_audio(wave, 24000, "ogg")
    assert data.startswith(b"OggS")
    decoded, _ = decode_audio(data, 24000)
    assert decoded.shape == (1, 24000)
    assert abs(peak_hz(decoded[0], 24000) - 1000.0) <= 1.0


def test_encode_audio_clamps_instead_of_wrapping() -> None:
    wave = torch.full((1, 100), 1.5)
    decoded, _ = decode_audio(encode_audio(wave, 8000), 8000)
    assert decoded.min() > 0.99


def test_ogg_encoding_clamps_to_full_scale() -> None:
    # Vorbis stores floats: without the clamp a 1.5 peak would come back as 1.5
    wave = torch.from_numpy(sine(440.0, 8000, 1.0, amplitude=1.5)).unsqueeze(0)
    decoded, _ = decode_audio(encode_audio(wave, 8000, "ogg"), 8000)
    assert 0.9 < decoded.max() < 1.25 and -1.25 < decoded.min() < -0.9


def test_unknown_audio_encoding_answers_400_naming_formats() -> None:
    with pytest.raises(BadRequest) as caught:
        encode_audio(torch.zeros(1, 10), 8000, "mp3")
    assert caught.value.detail == "Unknown audio format 'mp3'; choose one of wav, flac, ogg."


# Base64


def test_base64_decodes_standard_text() -> None:
    assert (
        parse_base64(base64.b64encode(b"\x00\xffpixels").decode(), "images[0]") == b"\x00\xffpixels"
    )


def test_base64_ignores_line_breaks() -> None:
    assert parse_base64("aGVs\nbG8g\r\nd29y bGQ=\n", "audio[0]") == b"hello world"


def test_base64_accepts_a_data_url() -> None:
    text = "data:image/png;base64," + base64.b64encode(b"png bytes").decode()
    assert parse_base64(text, "images[0]") == b"png bytes"


@pytest.mark.parametrize("text", ["not base64!", "aGVsbG8", "-_-_", "aGVsbG8=é"])
def test_invalid_base64_answers_400_saying_what_is_accepted(text: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_base64(text, "images[1]")
    assert caught.value.detail.startswith("images[1] is not valid base64 (")
    assert caught.value.detail.endswith(
        "); it must be standard base64 (A-Z, a-z, 0-9, '+' and '/', padded with '='), "
        "optionally as a data:<media type>;base64, URL."
    )


def test_data_url_without_base64_answers_400() -> None:
    with pytest.raises(BadRequest) as caught:
        parse_base64("data:text/plain,hello", "images[0]")
    assert caught.value.detail == (
        "images[0] is a data: URL without base64 content; send data:<media type>;base64,<data> "
        "or plain base64."
    )


def test_data_url_whose_content_holds_a_comma_answers_400_invalid_base64() -> None:
    with pytest.raises(BadRequest) as caught:
        parse_base64("data:image/png;base64,aGVs,bG8=", "images[0]")
    assert caught.value.detail.startswith("images[0] is not valid base64 (")


def test_audio_of_many_channels_at_a_huge_rate_is_refused_before_decoding() -> None:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros((76_800, 8), np.float32), 192_000, format="WAV")  # 0.4 s
    with pytest.raises(PayloadTooLarge, match="samples"):
        decode_audio(buffer.getvalue(), 24_000, 1, max_seconds=0.5)


@pytest.mark.parametrize(("height", "width"), [(1, 1), (17, 33)])
def test_png_encoding_is_an_rgb_png_pillow_reads_back_exactly(height: int, width: int) -> None:
    rgb = random_rgb(height, width)
    with Image.open(io.BytesIO(encode_image(rgb, "png"))) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        assert np.array_equal(np.asarray(image), rgb)


def test_decoder_pixels_become_8_bit_rgb_clamped_and_rounded() -> None:
    pixels = torch.tensor([-3.0, -1.0, 0.0, 0.3, 1.0, 7.0]).expand(1, 3, 1, 6)
    rgb = to_rgb8(pixels)  # (x + 1) * 127.5 after clamping to [-1, 1]
    assert rgb.dtype == torch.uint8 and rgb.shape == (1, 1, 6, 3)
    assert rgb[0, 0, :, 0].tolist() == [0, 0, 128, 166, 255, 255]
