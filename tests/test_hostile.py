"""Hostile and malformed input through HTTP: each gets a clear 4xx in the one error shape,
nothing is stored, and the server goes on serving (docs/reliability.md lists them all)."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ssad_common.models import Blob, BlobChunk, Dataset, Job
from tests.helpers import (
    ENCRYPTED,
    assert_error,
    client,
    npy_bytes,
    npy_member_zip,
    npz,
    other_format,
    patch_zip,
    png_bytes,
    raw_zip,
    row_counts,
    upload,
    zip_bytes,
)

GREY = np.random.default_rng(1).integers(0, 256, (6, 8, 8), dtype=np.uint8)
LIMIT = 400_000  # upload bytes; decoded bytes are capped at 4 MB below


def object_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
    return buf.getvalue()


def gigantic_header() -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "|u1", "fortran_order": False, "shape": (10**6, 4096, 4096)})
    return b"\x93NUMPY" + buf.getvalue()[6:]


def zip_bomb() -> bytes:
    """60 MB of zeros per entry, a few hundred KB compressed: refused by declared size."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for i in range(2):
            zf.writestr(f"{i}.png", b"\x00" * 60_000_000)
    return buf.getvalue()


def png_bomb() -> bytes:
    """A valid PNG of 20,000 x 20,000 pixels, tiny compressed."""
    b = io.BytesIO()
    Image.new("L", (20_000, 20_000)).save(b, format="PNG", optimize=True)
    return zip_bytes({"a.png": b.getvalue()})


def absolute_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zipfile.ZipInfo("/etc/a.png"), png_bytes(GREY[0]))
    return buf.getvalue()


HOSTILE_UPLOADS = [
    ("corrupt .npz", b"PK\x03\x04 garbage", "x.npz", 422, "not a valid .npz"),
    ("truncated .npz", npz(GREY)[:-40], "x.npz", 422, ".npz"),
    ("corrupt .npy", b"\x93NUMPY garbage", "x.npy", 422, ".npy"),
    ("truncated .npy", npy_bytes(GREY)[:-20], "x.npy", 422, ""),
    ("corrupt .zip", b"PK\x03\x04" + b"\x00" * 40 + b"junk", "x.zip", 422, "zip"),
    ("empty .zip", b"PK\x05\x06" + b"\x00" * 18, "x.zip", 422, "no PNG/JPEG"),
    ("truncated .zip", zip_bytes({"a.png": png_bytes(GREY[0])})[:-30], "x.zip", 422, "zip"),
    ("object dtype .npy (pickle)", object_npy(), "x.npy", 422, "object"),
    ("zip bomb", zip_bomb(), "x.zip", 422, "decompress"),
    ("PNG decompression bomb", png_bomb(), "x.zip", 422, "pixels"),
    ("zip entry with ../", zip_bytes({"../a.png": png_bytes(GREY[0])}), "x.zip", 422,
     "unsafe path"),
    ("zip entry with an absolute path", absolute_zip(), "x.zip", 422, "unsafe path"),
    ("header declaring gigantic dimensions", gigantic_header(), "x.npy", 422, "limit"),
    ("zero images", npz(np.zeros((0, 8, 8), np.uint8)), "x.npz", 422, "empty"),
    ("npz member longer than its header (zeros behind an 8x8 header)",
     npy_member_zip((1, 8, 8), bytes(32 * 1024**2)), "x.npz", 422, "header declares 64"),
    ("npy longer than its header", npy_bytes(GREY) + bytes(1000), "x.npy", 422,
     "longer than its header"),
    ("zip entry with a NUL name", raw_zip(b"\x00.png"), "x.zip", 422, "NUL"),
    ("zip entry with a NUL in its name", raw_zip(b"a\x00b.png"), "x.zip", 422, "NUL"),
    ("NaN floats", npz(np.full((2, 8, 8), np.nan, np.float32)), "x.npz", 422, "NaN"),
    ("infinite floats", npz(np.full((2, 8, 8), np.inf, np.float32)), "x.npz", 422, "infinity"),
    ("out-of-range floats", npz(np.full((2, 8, 8), 7.5, np.float32)), "x.npz", 422, "must lie in"),
    ("negative integers", npz(np.full((2, 8, 8), -3, np.int16)), "x.npz", 422,
     "must lie in"),
    ("encrypted zip entry", patch_zip(zip_bytes({"a.png": png_bytes(GREY[0])}),
                                      flag_bits=ENCRYPTED), "x.zip", 422, "encrypted"),
    ("zip entry with an unknown compression method",
     patch_zip(zip_bytes({"a.png": png_bytes(GREY[0])}), method=99), "x.zip", 422,
     "compression method"),
    ("encrypted .npz member", patch_zip(npz(GREY), flag_bits=ENCRYPTED), "x.npz", 422,
     "encrypted"),
    (".npz member with an unknown compression method", patch_zip(npz(GREY), method=99),
     "x.npz", 422, "compression method"),
    ("a GIF named .png", zip_bytes({"a.png": other_format("GIF")}), "x.zip", 422,
     "cannot decode"),
    ("a BMP named .png", other_format("BMP"), "a.png", 422, "cannot decode"),
    ("unknown file type", b"hello", "x.exe", 422, "unsupported file type"),
    ("body over the upload limit", b"\x00" * (LIMIT + 10), "big.npy", 413, "limit"),
]


@pytest.fixture
def api(db_url: str) -> Iterator[TestClient]:
    with client(db_url, max_upload_bytes=LIMIT, max_decoded_bytes=4_000_000,
                max_pixels_per_image=4096 * 4096) as c:
        yield c


def stored(db_url: str) -> dict[str, int]:
    return row_counts(db_url, Dataset, Blob, BlobChunk, Job)


def still_healthy(api: TestClient) -> None:
    assert api.get("/healthz").status_code == 200
    assert api.get("/readyz").status_code == 200
    assert upload(api, npz(GREY), "fine.npz").status_code == 201


@pytest.mark.parametrize("what, data, filename, status, contains",
                         HOSTILE_UPLOADS, ids=[h[0] for h in HOSTILE_UPLOADS])
def test_hostile_upload(api: TestClient, db_url: str, what: str, data: bytes, filename: str,
                        status: int, contains: str) -> None:
    r = upload(api, data, filename)
    assert_error(r, status, "InvalidDataset" if status == 422 else "PayloadTooLarge", contains)
    assert stored(db_url) == {"datasets": 0, "blobs": 0, "blob_chunks": 0, "jobs": 0}
    still_healthy(api)


def test_wrong_content_types(api: TestClient, db_url: str) -> None:
    assert_error(api.post("/v1/datasets", json={"file": "x"}), 422, "ValidationError", "file")
    assert_error(api.post("/v1/datasets", content=b"raw", headers={
        "Content-Type": "application/octet-stream"}), 422, "ValidationError")
    assert_error(api.post("/v1/jobs", content=b"n_trials=3", headers={
        "Content-Type": "text/plain"}), 422, "ValidationError")
    assert_error(api.post("/v1/jobs", files={"file": ("a", b"x")}), 422, "ValidationError")
    assert_error(api.post("/v1/jobs", content=b"{not json", headers={
        "Content-Type": "application/json"}), 422, "ValidationError", "JSON")
    assert stored(db_url) == {"datasets": 0, "blobs": 0, "blob_chunks": 0, "jobs": 0}
    still_healthy(api)


def test_sixteen_bit_and_palette_pngs_are_decoded(api: TestClient) -> None:
    deep = (GREY[:2].astype(np.uint16) * 257)
    b16 = [io.BytesIO(), io.BytesIO()]
    for arr, b in zip(deep, b16, strict=True):
        Image.fromarray(arr).save(b, format="PNG")
    pal = Image.fromarray(np.stack([GREY[0]] * 3, -1)).convert("P", palette=Image.ADAPTIVE)
    pb = io.BytesIO()
    pal.save(pb, format="PNG")
    r = upload(api, zip_bytes({"a.png": b16[0].getvalue(), "b.png": b16[1].getvalue()}),
               "deep.zip")
    assert r.status_code == 201, r.text
    assert (r.json()["channels"], r.json()["n_samples"]) == (1, 2)
    r = upload(api, zip_bytes({"p.png": pb.getvalue()}), "pal.zip")
    assert r.status_code == 201, r.text
    assert r.json()["channels"] == 1  # a palette of greys is grey


def test_one_image_is_a_test_set_but_not_a_train_set(api: TestClient, db_url: str) -> None:
    one = upload(api, npz(GREY[:1]), "one.npz")
    assert one.status_code == 201 and one.json()["n_samples"] == 1
    many = upload(api, npz(GREY), "many.npz").json()["id"]
    body = {"train_dataset_id": one.json()["id"], "test_dataset_id": many, "n_trials": 2}
    assert_error(api.post("/v1/jobs", json=body), 422, "IncompatibleDatasets", "at least 2")
    assert stored(db_url)["jobs"] == 0
    body = {"train_dataset_id": many, "test_dataset_id": one.json()["id"], "n_trials": 2}
    assert api.post("/v1/jobs", json=body).status_code == 202
