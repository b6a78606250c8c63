"""Reading image sets: formats, layouts, and inputs that must be refused clearly."""

from __future__ import annotations

import contextlib
import io
import struct
import tracemalloc
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssad_common.images import (
    ImageDataError,
    ImageSet,
    Limits,
    NpyFile,
    array_to_uint8,
    load_bytes,
    load_path,
    npy_header,
    read_upload,
)
from tests.helpers import (
    ENCRYPTED,
    npy_bytes,
    npy_member_zip,
    other_format,
    patch_zip,
    png_bytes,
    raw_zip,
    zip_bytes,
)


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


RNG = np.random.default_rng(0)
GREY = RNG.integers(0, 256, (5, 12, 10), dtype=np.uint8)


@pytest.mark.parametrize("arr, shape", [
    (GREY, (5, 1, 12, 10)),
    (GREY[..., None], (5, 1, 12, 10)),
    (np.repeat(GREY[..., None], 3, axis=3), (5, 3, 12, 10)),
    (np.repeat(GREY[:, None], 3, axis=1), (5, 3, 12, 10)),
])
def test_layouts_normalise_to_nchw(arr: np.ndarray, shape: tuple[int, ...]) -> None:
    out = load_bytes(npy_bytes(arr), "x.npy")
    assert out.images.shape == shape and out.images.dtype == np.uint8
    assert out.names == [str(i) for i in range(5)]
    np.testing.assert_array_equal(out.images[:, 0], GREY)


def test_float_images_are_scaled_and_checked() -> None:
    out = array_to_uint8(GREY.astype(np.float32) / 255)
    np.testing.assert_array_equal(out[:, 0], GREY)
    with pytest.raises(ImageDataError, match=r"\[0, 1\]"):
        array_to_uint8(GREY.astype(np.float32))
    bad = GREY.astype(np.float32) / 255
    bad[0, 0, 0] = np.nan
    with pytest.raises(ImageDataError, match="NaN"):
        array_to_uint8(bad)
    with pytest.raises(ImageDataError, match=r"0\.\.255"):
        array_to_uint8(GREY.astype(np.int32) * 4)


def test_npz_keys() -> None:
    assert load_bytes(npz_bytes(anything=GREY), "a.npz").images.shape == (5, 1, 12, 10)
    two = npz_bytes(images=GREY, y_test=np.zeros(5))
    assert load_bytes(two, "a.npz").images.shape == (5, 1, 12, 10)
    assert load_bytes(npz_bytes(x=GREY, labels=np.zeros(5)), "a.npz").images.shape[0] == 5
    with pytest.raises(ImageDataError, match="several arrays"):
        load_bytes(npz_bytes(a=GREY, b=GREY), "a.npz")


def test_pickled_object_arrays_are_refused_without_unpickling() -> None:
    data = npy_bytes(np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(ImageDataError, match="dtype object"):
        load_bytes(data, "evil.npy")


@pytest.mark.parametrize("data, name, message", [
    (b"not an array", "x.npy",  # numpy's reason names Python bytes literals: ours does not
     r"^not a valid \.npy array: it does not start with the \.npy signature$"),
    (b"PK\x03\x04garbage", "x.npz", "not a valid .npz"),
    (b"hello", "x.zip", "not a valid zip"),
    (b"hello", "x.tiff", "unsupported file type"),
    (npy_bytes(np.zeros((0, 8, 8), np.uint8)), "x.npy", "empty"),
    (npy_bytes(np.zeros((2, 8, 8, 4), np.uint8)), "x.npy", "C = 1"),
    (npy_bytes(np.zeros((8, 8), np.uint8)), "x.npy", "expected"),
    (npy_bytes(np.zeros((2, 8, 8), np.complex64)), "x.npy", "not supported"),
    (zip_bytes({"a.txt": b"x"}), "x.zip", "no PNG/JPEG"),
    (zip_bytes({"a.png": b"not a png"}), "x.zip", "cannot decode"),
    (zip_bytes({"../a.png": png_bytes(GREY[0])}), "x.zip", "unsafe path"),
])
def test_bad_inputs_get_clear_errors(data: bytes, name: str, message: str) -> None:
    with pytest.raises(ImageDataError, match=message):
        load_bytes(data, name)


def test_truncated_npy_is_refused() -> None:
    data = npy_bytes(GREY)
    with pytest.raises(ImageDataError):
        load_bytes(data[:-20], "x.npy")


def test_gigantic_header_is_refused_before_allocating() -> None:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (10**7, 4096, 4096)})
    data = b"\x93NUMPY" + header.getvalue()[6:]
    with pytest.raises(ImageDataError, match="limit"):
        load_bytes(data, "big.npy")


def test_zip_bomb_is_refused_by_declared_size() -> None:
    data = zip_bytes({f"{i}.png": png_bytes(GREY[0]) for i in range(3)})
    with pytest.raises(ImageDataError, match="decompress"):
        load_bytes(data, "x.zip", Limits(max_total_bytes=100))


def test_zip_of_pngs_keeps_sorted_names_and_mixes_grey_into_rgb() -> None:
    rgb = RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    data = zip_bytes({"b.png": png_bytes(rgb), "a.png": png_bytes(GREY[0]),
                      "__MACOSX/._a.png": b"junk", "notes.txt": b"ignored"})
    out = load_bytes(data, "set.zip")
    assert out.names == ["a.png", "b.png"]
    assert out.images.shape == (2, 3, 12, 10)
    np.testing.assert_array_equal(out.images[0, 1], GREY[0])
    np.testing.assert_array_equal(out.images[1].transpose(1, 2, 0), rgb)


def test_zip_with_mixed_sizes_is_resized_to_the_most_common_size() -> None:
    small = GREY[0][:6, :5]
    data = zip_bytes({"a.png": png_bytes(small), "b.png": png_bytes(GREY[1]),
                      "c.png": png_bytes(GREY[2])})
    out = load_bytes(data, "x.zip")
    assert out.images.shape == (3, 1, 12, 10)
    assert out.resized_from == ((6, 5, 1),)
    np.testing.assert_array_equal(out.images[1:, 0], GREY[1:3])  # the common size: as is
    expected = np.asarray(Image.fromarray(small).resize((10, 12), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out.images[0, 0], expected)
    # A tie: the first image's size (by name) wins.
    tie = load_bytes(zip_bytes({"a.png": png_bytes(small), "b.png": png_bytes(GREY[1])}),
                     "x.zip")
    assert tie.images.shape == (2, 1, 6, 5) and tie.resized_from == ((12, 10, 1),)
    assert load_bytes(zip_bytes({"a.png": png_bytes(GREY[0])}), "x.zip").resized_from == ()


def peak_traced(fn: Callable[[], object]) -> int:
    """Peak bytes allocated (numpy and Python) while ``fn`` runs."""
    tracemalloc.start()
    try:
        with contextlib.suppress(ImageDataError):
            fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_npz_member_is_checked_from_its_header_before_decompressing() -> None:
    # 64 MB of zeros behind an 8x8 header (the bomb, smaller): refused, and the
    # zeros are never decompressed.
    bomb = npy_member_zip((1, 8, 8), bytes(64 * 1024**2))
    with pytest.raises(ImageDataError, match="header declares 64"):
        load_bytes(bomb, "x.npz")
    assert peak_traced(lambda: load_bytes(bomb, "x.npz")) < 8 * 1024**2
    # A header declaring more than the limits: refused before reading any data.
    with pytest.raises(ImageDataError, match="limit"):
        load_bytes(npy_member_zip((10**7, 64, 64), b""), "x.npz")
    with pytest.raises(ImageDataError, match="header declares 128"):
        load_bytes(npy_member_zip((2, 8, 8), bytes(64)), "x.npz")  # shorter
    ok = load_bytes(npy_member_zip((2, 8, 8), GREY[:2, :8, :8].tobytes()), "x.npz")
    np.testing.assert_array_equal(ok.images[:, 0], GREY[:2, :8, :8])


def test_arrays_are_converted_a_batch_at_a_time_without_a_second_copy() -> None:
    rng = np.random.default_rng(5)
    floats = rng.random((1024, 64, 64, 3), dtype=np.float32)  # 50 MB in, 12.6 MB out
    expected = np.rint(floats * 255).astype(np.uint8).transpose(0, 3, 1, 2)
    for data, name in ((npy_bytes(floats), "x.npy"), (npz_bytes(images=floats), "x.npz")):
        out = load_bytes(data, name)
        np.testing.assert_array_equal(out.images, expected)
        # Before: the member's bytes, a BytesIO copy, the loaded array, then the output.
        assert peak_traced(lambda d=data, n=name: load_bytes(d, n)) < 0.75 * floats.nbytes
    bad = floats.copy()
    bad[900, 1, 1, 1] = 2.0  # in a late batch
    with pytest.raises(ImageDataError, match="must lie in"):
        load_bytes(npy_bytes(bad), "x.npy")


def test_npy_length_must_match_its_header() -> None:
    data = npy_bytes(GREY)
    with pytest.raises(ImageDataError, match="longer than its header"):
        load_bytes(data + b"\x00" * 10, "x.npy")
    with pytest.raises(ImageDataError, match="truncated"):
        load_bytes(data[:-1], "x.npy")


def test_canonical_npy_is_streamed_not_loaded_and_stored_as_numpy_saves_it() -> None:
    for arr in (GREY, GREY[:, None], GREY[..., None]):
        out = read_upload(io.BytesIO(npy_bytes(arr)), "x.npy")
        assert isinstance(out, NpyFile) and out.shape == (5, 1, 12, 10)
        stored = npy_header(out.shape) + b"".join(out.read_data())
        assert stored == npy_bytes(np.ascontiguousarray(GREY[:, None]))
    rgb = np.repeat(GREY[..., None], 3, axis=3)  # (N, H, W, 3): loaded and transposed
    assert isinstance(read_upload(io.BytesIO(npy_bytes(rgb)), "x.npy"), ImageSet)
    fortran = np.asfortranarray(GREY)
    out2 = read_upload(io.BytesIO(npy_bytes(fortran)), "x.npy")
    assert isinstance(out2, ImageSet)
    np.testing.assert_array_equal(out2.images[:, 0], GREY)


def test_fortran_order_arrays_are_converted_a_piece_at_a_time() -> None:
    rng = np.random.default_rng(6)
    floats = np.asfortranarray(rng.random((40, 12, 10, 3)))  # (N, H, W, C), float64
    expected = np.rint(floats * 255).astype(np.uint8).transpose(0, 3, 1, 2)
    for data, name in ((npy_bytes(floats), "x.npy"), (npz_bytes(images=floats), "x.npz")):
        np.testing.assert_array_equal(load_bytes(data, name).images, expected)
    bad = floats.copy(order="F")
    bad[39, 11, 9, 2] = 1.5  # the last value in the stream
    with pytest.raises(ImageDataError, match="must lie in"):
        load_bytes(npy_bytes(bad), "x.npy")
    with pytest.raises(ImageDataError, match="truncated"):
        load_bytes(npy_bytes(floats)[:-8], "x.npy")
    # The measured bomb: 64 MB of float64 zeros (a 63 KB .npz) within an 8 MiB decoded
    # limit. Before: read whole, then float temporaries (192 MB peak); now the decoded
    # size twice plus a 4 MiB piece and its temporaries.
    zeros = np.zeros((1024, 64, 128), order="F")
    limits = Limits(max_total_bytes=8 * 1024**2)
    for data, name in ((npy_bytes(zeros), "x.npy"), (npz_bytes(images=zeros), "x.npz")):
        def load(d: bytes = data, n: str = name) -> ImageSet:
            return load_bytes(d, n, limits)
        assert load().images.shape == (1024, 1, 64, 128)
        peak = peak_traced(load)
        assert peak < 32 * 1024**2, peak  # 20 MiB measured, as for C order


def big_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def test_image_size_is_checked_from_the_header_before_decoding() -> None:
    png = big_png(6000)  # 36 M pixels, a few KB compressed
    limits = Limits(max_pixels_per_image=1024 * 1024)
    with pytest.raises(ImageDataError, match="6000x6000 = 36000000 pixels"):
        load_bytes(png, "x.png", limits)
    assert peak_traced(lambda: load_bytes(png, "x.png", limits)) < 4 * 1024**2
    six = zip_bytes({f"{i}.png": png for i in range(6)})
    with pytest.raises(ImageDataError, match="pixels"):
        load_bytes(six, "x.zip", limits)
    assert peak_traced(lambda: load_bytes(six, "x.zip", limits)) < 4 * 1024**2
    # Each image within the per-image limit, together over the decoded-bytes limit.
    limits = Limits(max_pixels_per_image=40_000_000, max_total_bytes=100_000_000)
    with pytest.raises(ImageDataError, match="bytes decoded"):
        load_bytes(six, "x.zip", limits)
    assert peak_traced(lambda: load_bytes(six, "x.zip", limits)) < 4 * 1024**2


def test_zip_image_headers_are_read_from_the_entry_stream() -> None:
    """The header pass decompresses the start of each entry, not all of it (it was
    decompressed whole twice: once for its header, once to decode it)."""
    noise = png_bytes(np.random.default_rng(7).integers(0, 256, (1024, 1024), np.uint8))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.png", noise)  # 1 MB
    data = buf.getvalue()
    limits = Limits(max_pixels_per_image=1000)
    with pytest.raises(ImageDataError, match="1024x1024"):
        load_bytes(data, "x.zip", limits)
    assert peak_traced(lambda: load_bytes(data, "x.zip", limits)) < 256 * 1024
    out = load_bytes(data, "x.zip")
    np.testing.assert_array_equal(out.images[0, 0], np.asarray(Image.open(io.BytesIO(noise))))


@pytest.mark.parametrize("name, utf8, message", [
    (b"\x00.png", False, "empty name or a NUL"),
    (b"a\x00b.png", False, "empty name or a NUL"),
    (b"\xff\xfe.png", True, "not a valid zip"),
])
def test_zip_entries_with_bad_names_are_refused(name: bytes, utf8: bool, message: str) -> None:
    with pytest.raises(ImageDataError, match=message):
        load_bytes(raw_zip(name, utf8), "x.zip")


@pytest.mark.parametrize("data, name, message", [
    (patch_zip(zip_bytes({"a.png": png_bytes(GREY[0])}), flag_bits=ENCRYPTED), "x.zip",
     "encrypted"),
    (patch_zip(zip_bytes({"a.png": png_bytes(GREY[0])}), method=99), "x.zip",
     "compression method"),
    (patch_zip(npz_bytes(images=GREY), flag_bits=ENCRYPTED), "x.npz", "encrypted"),
    (patch_zip(npz_bytes(images=GREY), method=99), "x.npz", "compression method"),
])
def test_encrypted_or_unknown_compression_members_are_refused(
        data: bytes, name: str, message: str) -> None:
    with pytest.raises(ImageDataError, match=message):  # was a RuntimeError /
        load_bytes(data, name)  # NotImplementedError from zipfile: a 500


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_only_png_and_jpeg_are_decoded_whatever_the_name(fmt: str) -> None:
    data = other_format(fmt)
    # The reason is in the user's words, not PIL's (which names a Python file object).
    with pytest.raises(ImageDataError, match=r"^cannot decode image 'a\.png': not a PNG or "
                       r"JPEG image, or a damaged one$"):
        load_bytes(zip_bytes({"a.png": data}), "x.zip")
    with pytest.raises(ImageDataError, match=r"^cannot decode image 'a\.jpg': not a PNG or "
                       r"JPEG image, or a damaged one$"):
        load_bytes(data, "a.jpg")
    jpeg = other_format("JPEG")  # a JPEG named .png is still one of the two formats
    assert load_bytes(zip_bytes({"a.png": jpeg}), "x.zip").images.shape == (1, 1, 12, 10)


@pytest.mark.parametrize("error", [struct.error("unpack"), IndexError("x"), TypeError("y")])
def test_any_decoder_error_is_a_clear_refusal(monkeypatch: pytest.MonkeyPatch,
                                              error: Exception) -> None:
    """What PIL raises on fuzzed files is not only OSError/ValueError."""
    def broken(*args: object, **kwargs: object) -> Image.Image:
        raise error
    monkeypatch.setattr(Image, "open", broken)
    with pytest.raises(ImageDataError, match=r"cannot decode image 'a\.png'"):
        load_bytes(zip_bytes({"a.png": png_bytes(GREY[0])}), "x.zip")


def test_sixteen_bit_and_palette_pngs_decode() -> None:
    deep = (GREY[0].astype(np.uint16) * 257)
    out = load_bytes(zip_bytes({"a.png": png_bytes(deep)}), "x.zip")
    np.testing.assert_array_equal(out.images[0, 0], GREY[0])
    pal = Image.fromarray(GREY[0]).convert("P")
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    out = load_bytes(zip_bytes({"p.png": buf.getvalue()}), "x.zip")
    assert out.images.shape[1] == 1  # a palette of greys stays grey
    np.testing.assert_array_equal(out.images[0, 0], np.asarray(pal.convert("L")))
    colour = Image.fromarray(np.stack([GREY[0], GREY[1], GREY[2]], axis=2)).convert("P")
    buf = io.BytesIO()
    colour.save(buf, format="PNG")
    assert load_bytes(zip_bytes({"c.png": buf.getvalue()}), "x.zip").images.shape[1] == 3


def test_folder_and_files(tmp_path: Path) -> None:
    for i in (2, 0, 1):
        (tmp_path / f"img{i}.png").write_bytes(png_bytes(GREY[i]))
    (tmp_path / "readme.md").write_text("not an image")
    out = load_path(tmp_path)
    assert out.names == ["img0.png", "img1.png", "img2.png"]
    np.testing.assert_array_equal(out.images[:, 0], GREY[:3])
    np.save(tmp_path / "a.npy", GREY)
    assert load_path(tmp_path / "a.npy").images.shape == (5, 1, 12, 10)
    with pytest.raises(ImageDataError, match="no such file"):
        load_path(tmp_path / "missing.npz")
