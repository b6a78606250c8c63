"""Reading image sets from files into uint8 arrays of shape (N, C, H, W), C in {1, 3}.

Torch-free so that the API can validate uploads with the same code. Accepted inputs:

* ``.npy``: one array; ``.npz``: one array, or the key ``images`` or ``x``;
* a folder or a ``.zip`` of PNG/JPEG files (sorted by name; names are kept).

Arrays may be (N, H, W), (N, H, W, C) or (N, C, H, W), uint8 (or another integer type with
values in 0..255) or float in [0, 1]. Nothing is ever unpickled (``allow_pickle=False``), and
array headers and zip entry sizes are checked before anything large is allocated.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAY_KEYS = ("images", "x")


class ImageDataError(ValueError):
    """The input cannot be read as an image set; the message says what to fix."""


@dataclass(frozen=True)
class Limits:
    max_images: int = 1_000_000
    max_pixels_per_image: int = 1024 * 1024
    max_total_bytes: int = 4 * 1024**3  # decoded uint8 size, and zip uncompressed size

    def check_shape(self, n: int, c: int, h: int, w: int) -> None:
        if n < 1:
            raise ImageDataError("the image set is empty (0 images)")
        if n > self.max_images:
            raise ImageDataError(f"{n} images is more than the limit of {self.max_images}")
        if h < 1 or w < 1 or h * w > self.max_pixels_per_image:
            raise ImageDataError(
                f"image size {h}x{w} is outside 1..{self.max_pixels_per_image} pixels"
            )
        if n * c * h * w > self.max_total_bytes:
            raise ImageDataError(
                f"{n}x{c}x{h}x{w} images would take {n * c * h * w} bytes decoded, more than "
                f"the limit of {self.max_total_bytes}"
            )


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # uint8, (N, C, H, W)
    names: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ImageDataError("internal: ImageSet needs uint8 (N, C, H, W)")
        if len(self.names) != len(self.images):
            raise ImageDataError("internal: one name per image")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        n, c, h, w = self.images.shape
        return int(n), int(c), int(h), int(w)


# ------------------------------------------------------------------------- arrays


def _layout(shape: tuple[int, ...]) -> tuple[int, int, int, int, str]:
    """(n, c, h, w, layout) for an array shape, layout in {"NHW", "NHWC", "NCHW"}."""
    if len(shape) == 3:
        n, h, w = shape
        return n, 1, h, w, "NHW"
    if len(shape) == 4:
        n, a, b, c = shape
        if a in (1, 3) and c not in (1, 3):
            return n, a, b, c, "NCHW"
        if c in (1, 3):
            return n, c, a, b, "NHWC"
        raise ImageDataError(
            f"array of shape {shape}: 4-D arrays must be (N, H, W, C) or (N, C, H, W) with "
            "C = 1 (grey) or 3 (RGB)"
        )
    raise ImageDataError(
        f"array of shape {shape}: expected (N, H, W), (N, H, W, C) or (N, C, H, W)"
    )


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.hasobject or dtype.kind not in "uif" or dtype.kind == "c":
        raise ImageDataError(
            f"array dtype {dtype} is not supported: use uint8, or float in [0, 1]"
        )


def array_to_uint8(arr: np.ndarray, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """Validate and normalise an image array to uint8 (N, C, H, W)."""
    _check_dtype(arr.dtype)
    n, c, h, w, layout = _layout(tuple(int(s) for s in arr.shape))
    limits.check_shape(n, c, h, w)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ImageDataError("float images contain NaN or infinity")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ImageDataError(
                f"float images must lie in [0, 1]; found values in [{lo:.4g}, {hi:.4g}]"
            )
        arr = np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ImageDataError(
                f"integer images must lie in 0..255; found values in [{lo}, {hi}] "
                f"(dtype {arr.dtype})"
            )
        arr = arr.astype(np.uint8)
    if layout == "NHW":
        arr = arr[:, None]
    elif layout == "NHWC":
        arr = arr.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(arr)


def _read_npy_header(fp: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ImageDataError(f"unsupported .npy format version {version}")
    except ImageDataError:
        raise
    except Exception as exc:  # numpy raises ValueError/EOFError for corrupt headers
        raise ImageDataError(f"not a valid .npy array: {exc}") from None
    return tuple(int(s) for s in shape), np.dtype(dtype)


def _load_npy(fp: IO[bytes], limits: Limits) -> np.ndarray:
    shape, dtype = _read_npy_header(fp)
    _check_dtype(dtype)
    n, c, h, w, _ = _layout(shape)
    limits.check_shape(n, c, h, w)
    if n * c * h * w * dtype.itemsize > limits.max_total_bytes * 8:
        raise ImageDataError("array is too large")
    fp.seek(0)
    try:
        arr = np.load(fp, allow_pickle=False)
    except Exception as exc:
        raise ImageDataError(f"cannot read .npy array: {exc}") from None
    return array_to_uint8(arr, limits)


def _load_npz(data: bytes, limits: Limits) -> np.ndarray:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise ImageDataError(f"not a valid .npz file: {exc}") from None
    with zf:
        members = {PurePosixPath(i.filename).stem: i for i in zf.infolist()
                   if i.filename.endswith(".npy")}
        if not members:
            raise ImageDataError(".npz file holds no arrays")
        if len(members) == 1:
            key = next(iter(members))
        else:
            key = next((k for k in ARRAY_KEYS if k in members), "")
            if not key:
                raise ImageDataError(
                    f".npz holds several arrays {sorted(members)}; name the images "
                    f"'images' or 'x'"
                )
        info = members[key]
        if info.file_size > limits.max_total_bytes * 8:
            raise ImageDataError(f"array {key!r} is too large ({info.file_size} bytes)")
        try:
            with zf.open(info) as fp:
                return _load_npy(io.BytesIO(fp.read()), limits)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise ImageDataError(f"corrupt .npz member {key!r}: {exc}") from None


# ------------------------------------------------------------------------- image files


def _decode_image(data: bytes, name: str) -> np.ndarray:
    """One PNG/JPEG as an (H, W) or (H, W, 3) uint8 array."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr16 = np.asarray(img, dtype=np.int64)
                top = 65535 if arr16.max() > 255 else 255
                return np.rint(np.clip(arr16, 0, top) * (255.0 / top)).astype(np.uint8)
            if img.mode in ("L", "1", "LA"):
                return np.asarray(img.convert("L"), dtype=np.uint8)
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
            if img.mode == "P" and (rgb == rgb[..., :1]).all():
                return rgb[..., 0].copy()  # a palette of greys is a grey image
            return rgb
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDataError(f"cannot decode image {name!r}: {exc}") from None


def _stack_images(items: Iterable[tuple[str, bytes]], limits: Limits) -> ImageSet:
    names: list[str] = []
    decoded: list[np.ndarray] = []
    for name, data in sorted(items, key=lambda t: t[0]):
        arr = _decode_image(data, name)
        if decoded and arr.shape[:2] != decoded[0].shape[:2]:
            raise ImageDataError(
                f"images differ in size: {names[0]!r} is {decoded[0].shape[1]}x"
                f"{decoded[0].shape[0]}, {name!r} is {arr.shape[1]}x{arr.shape[0]}"
            )
        names.append(name)
        decoded.append(arr)
        if len(decoded) > limits.max_images:
            raise ImageDataError(f"more than {limits.max_images} images")
    if not decoded:
        raise ImageDataError("no PNG/JPEG images found")
    colour = any(a.ndim == 3 for a in decoded)
    planes = [
        (a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=2)) if colour else a[..., None]
        for a in decoded
    ]
    arr = np.stack(planes).transpose(0, 3, 1, 2)
    limits.check_shape(*arr.shape)
    return ImageSet(np.ascontiguousarray(arr), names)


def _safe_member_name(name: str) -> bool:
    p = PurePosixPath(name.replace("\\", "/"))
    return not p.is_absolute() and ".." not in p.parts and not name.startswith("/")


def _load_zip(data: bytes, limits: Limits) -> ImageSet:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise ImageDataError(f"not a valid zip file: {exc}") from None
    with zf:
        infos = [
            i for i in zf.infolist()
            if not i.is_dir() and i.filename.lower().endswith(IMAGE_SUFFIXES)
            and not PurePosixPath(i.filename).name.startswith(".")
            and "__MACOSX" not in i.filename
        ]
        for i in infos:
            if not _safe_member_name(i.filename):
                raise ImageDataError(f"zip entry {i.filename!r} has an unsafe path")
        total = sum(i.file_size for i in infos)
        if total > limits.max_total_bytes:
            raise ImageDataError(
                f"zip would decompress to {total} bytes, more than the limit of "
                f"{limits.max_total_bytes}"
            )
        try:
            items = [(i.filename, zf.read(i)) for i in infos]
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise ImageDataError(f"corrupt zip file: {exc}") from None
    return _stack_images(items, limits)


def _index_names(n: int) -> list[str]:
    return [str(i) for i in range(n)]


def load_bytes(data: bytes, filename: str, limits: Limits = DEFAULT_LIMITS) -> ImageSet:
    """Decode an upload (its bytes and its file name, which decides the format)."""
    suffix = Path(filename).suffix.lower()
    if suffix == ".npy":
        arr = _load_npy(io.BytesIO(data), limits)
    elif suffix == ".npz":
        arr = _load_npz(data, limits)
    elif suffix == ".zip":
        return _load_zip(data, limits)
    elif suffix in IMAGE_SUFFIXES:
        return _stack_images([(Path(filename).name, data)], limits)
    else:
        raise ImageDataError(
            f"unsupported file type {suffix or '(none)'!r}: use .npz, .npy, .zip of PNG/JPEG, "
            "or a folder of PNG/JPEG files"
        )
    return ImageSet(arr, _index_names(len(arr)))


def load_path(path: str | Path, limits: Limits = DEFAULT_LIMITS) -> ImageSet:
    """Read a file or a folder of PNG/JPEG files."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir()
                       if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        return _stack_images(((f.name, f.read_bytes()) for f in files), limits)
    if not p.exists():
        raise ImageDataError(f"{p}: no such file or folder")
    return load_bytes(p.read_bytes(), p.name, limits)
