"""Reading image sets from files into uint8 arrays of shape (N, C, H, W), C in {1, 3}.

Torch-free so that the API can validate uploads with the same code. Accepted inputs:

* ``.npy``: one array; ``.npz``: one array, or the key ``images`` or ``x``;
* a folder or a ``.zip`` of PNG/JPEG files (sorted by name; names are kept); images of
  different sizes are resized to the most common size (see :func:`_stack_images`);
* one ``.png``/``.jpg``/``.jpeg`` file: a set of one image (to score a single new image).

Arrays may be (N, H, W), (N, H, W, C) or (N, C, H, W), uint8 (or another integer type with
values in 0..255) or float in [0, 1]. Nothing is ever unpickled (``allow_pickle=False``), and
array headers, image headers and zip entry sizes are checked before anything large is
allocated or decoded; an array is read up to the size its header declares and no further.
"""

from __future__ import annotations

import io
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_FORMATS = ("PNG", "JPEG")  # whatever else PIL could open is refused
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
    # (height, width, count) of the images that were resized to the set's size
    resized_from: tuple[tuple[int, int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ImageDataError("internal: ImageSet needs uint8 (N, C, H, W)")
        if len(self.names) != len(self.images):
            raise ImageDataError("internal: one name per image")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        n, c, h, w = self.images.shape
        return int(n), int(c), int(h), int(w)

    def load(self) -> ImageSet:
        return self


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


def _values_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Check an array's values (any shape) and convert them to uint8."""
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ImageDataError("float images contain NaN or infinity")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ImageDataError(
                f"float images must lie in [0, 1]; found values in [{lo:.4g}, {hi:.4g}]"
            )
        return np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    if arr.dtype != np.uint8:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ImageDataError(
                f"integer images must lie in 0..255; found values in [{lo}, {hi}] "
                f"(dtype {arr.dtype})"
            )
        return arr.astype(np.uint8)
    return arr


def array_to_uint8(arr: np.ndarray, limits: Limits = DEFAULT_LIMITS) -> np.ndarray:
    """Validate and normalise an image array to uint8 (N, C, H, W)."""
    _check_dtype(arr.dtype)
    n, c, h, w, layout = _layout(tuple(int(s) for s in arr.shape))
    limits.check_shape(n, c, h, w)
    arr = _values_to_uint8(arr)
    if layout == "NHW":
        arr = arr[:, None]
    elif layout == "NHWC":
        arr = arr.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(arr)


def npy_header(shape: tuple[int, ...]) -> bytes:
    """The header ``np.save`` writes for a C-order uint8 array of ``shape``: the stored
    (canonical) form's first bytes."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.dtype(np.uint8).str, "fortran_order": False,
              "shape": tuple(int(s) for s in shape)})
    return buf.getvalue()


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    n: int
    c: int
    h: int
    w: int
    layout: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def canonical(self) -> bool:
        """The data bytes are already the stored uint8 (N, C, H, W) C-order bytes."""
        return (self.dtype == np.uint8 and not self.fortran
                and (self.layout != "NHWC" or self.c == 1))


def _read_npy_header(fp: IO[bytes], limits: Limits) -> NpyHeader:
    """Read and check a .npy header from a stream (nothing after it is read)."""
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ImageDataError(f"unsupported .npy format version {version}")
    except ImageDataError:
        raise
    except Exception as exc:  # numpy raises ValueError/EOFError for corrupt headers
        why = ("it does not start with the .npy signature" if "magic string" in str(exc)
               else str(exc))  # numpy's says so in Python bytes literals
        raise ImageDataError(f"not a valid .npy array: {why}") from None
    shape = tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    _check_dtype(dtype)
    n, c, h, w, layout = _layout(shape)
    limits.check_shape(n, c, h, w)
    header = NpyHeader(shape, dtype, bool(fortran), n, c, h, w, layout)
    if header.nbytes > limits.max_total_bytes * 8:
        raise ImageDataError(f"array of {header.nbytes} bytes is too large")
    return header


READ_BYTES = 8 * 1024 * 1024
BATCH_BYTES = 4 * 1024 * 1024  # input converted at a time (float temporaries are a few x)


def _fill(fp: IO[bytes], view: memoryview, done: int, total: int, what: str) -> None:
    """Read exactly ``len(view)`` bytes into ``view`` (``done`` of the ``total`` data
    bytes were read before it: for the message)."""
    pos = 0
    while pos < len(view):
        got = fp.readinto(view[pos:pos + READ_BYTES])  # type: ignore[attr-defined]
        if not got:
            raise ImageDataError(f"{what} is truncated: its data ends after {done + pos} of "
                                 f"the {total} bytes its header declares")
        pos += got


def _check_ends(fp: IO[bytes], total: int, what: str) -> None:
    if fp.read(1):
        raise ImageDataError(f"{what} is longer than its header declares ({total} bytes of "
                             "data): it is corrupt or not one array")


def _read_fortran(fp: IO[bytes], header: NpyHeader, what: str, limits: Limits) -> np.ndarray:
    """A column-major (``fortran_order``) array, whose images are interleaved in the
    stream: its values are read and converted to uint8 a piece at a time into one uint8
    array in the stream's order, which is then put in (N, C, H, W) order. At most the
    decoded size twice, plus a piece and its temporaries: never the whole input."""
    raw = np.empty(header.shape[::-1], np.uint8)  # C order over the reversed shape
    flat = raw.reshape(-1)
    step = max(1, BATCH_BYTES // header.dtype.itemsize)
    buf = np.empty(min(step, flat.size), header.dtype)
    total = header.nbytes
    for start in range(0, flat.size, step):
        piece = buf[:min(step, flat.size - start)]
        _fill(fp, piece.view(np.uint8).data, start * header.dtype.itemsize, total, what)
        flat[start:start + len(piece)] = _values_to_uint8(piece)
    _check_ends(fp, total, what)
    return array_to_uint8(raw.T, limits)  # uint8 already: only the layout is copied


def _read_images(fp: IO[bytes], header: NpyHeader, what: str, limits: Limits) -> np.ndarray:
    """The array's images as uint8 (N, C, H, W), read (exactly ``header.nbytes``, then
    the stream must end) and converted a batch of images at a time into the one output
    array: no copy of the whole input is ever held beside it."""
    if header.fortran:  # column-major: images are not contiguous in the stream
        return _read_fortran(fp, header, what, limits)
    out = np.empty((header.n, header.c, header.h, header.w), np.uint8)
    per_image = header.nbytes // header.n
    batch = max(1, BATCH_BYTES // max(1, per_image))
    total = header.nbytes
    for start in range(0, header.n, batch):
        k = min(batch, header.n - start)
        buf = np.empty((k, *header.shape[1:]), dtype=header.dtype)
        _fill(fp, buf.reshape(-1).view(np.uint8).data, start * per_image, total, what)
        out[start:start + k] = array_to_uint8(buf, limits)
    _check_ends(fp, total, what)
    return out


@dataclass(frozen=True)
class NpyFile:
    """A .npy upload whose data is already the stored uint8 (N, C, H, W) bytes: it is
    checked (header, exact length) but never loaded; its bytes are streamed from ``fp``."""

    fp: IO[bytes]
    offset: int
    shape: tuple[int, int, int, int]
    names: list[str]

    @property
    def nbytes(self) -> int:
        n, c, h, w = self.shape
        return n * c * h * w

    def read_data(self) -> Iterator[bytes]:
        self.fp.seek(self.offset)
        left = self.nbytes
        while left:
            piece = self.fp.read(min(READ_BYTES, left))
            if not piece:
                raise ImageDataError("the upload changed while it was read")
            left -= len(piece)
            yield piece

    def load(self) -> ImageSet:
        self.fp.seek(self.offset)
        arr = np.empty(self.shape, np.uint8)
        view = arr.reshape(-1).data
        pos = 0
        while pos < self.nbytes:
            got = self.fp.readinto(view[pos:])  # type: ignore[attr-defined]
            if not got:
                raise ImageDataError("the upload changed while it was read")
            pos += got
        return ImageSet(arr, self.names)


def _file_size(fp: IO[bytes]) -> int:
    here = fp.tell()
    fp.seek(0, io.SEEK_END)
    size = fp.tell()
    fp.seek(here)
    return size


def _read_npy(fp: IO[bytes], limits: Limits) -> NpyFile | ImageSet:
    """A seekable .npy: checked from its header and its length before anything large is
    allocated; the stored layout already is streamed, anything else loaded and converted."""
    size = _file_size(fp)
    fp.seek(0)
    header = _read_npy_header(fp, limits)
    data_at = fp.tell()
    if size - data_at != header.nbytes:
        what = "truncated" if size - data_at < header.nbytes else "longer than its header declares"
        raise ImageDataError(f".npy array is {what}: {size - data_at} bytes of data, its "
                             f"header declares {header.nbytes}")
    names = _index_names(header.n)
    if header.canonical:
        return NpyFile(fp, data_at, (header.n, header.c, header.h, header.w), names)
    return ImageSet(_read_images(fp, header, ".npy array", limits), names)


def _open_zip(fp: IO[bytes], what: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(fp)
    except MemoryError:
        raise
    except Exception as exc:  # BadZipFile, UnicodeDecodeError, EOFError, struct.error, ...
        raise ImageDataError(f"not a valid {what}: {exc}") from None


def _load_npz(fp: IO[bytes], limits: Limits) -> np.ndarray:
    with _open_zip(fp, ".npz file") as zf:
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
        what = f".npz member {key!r}"
        try:
            with zf.open(info) as member:
                # The header first, from the stream: nothing beyond it is decompressed
                # unless it passes the limits and the member's declared size agrees.
                header = _read_npy_header(member, limits)
                data_at = member.tell()
                if info.file_size - data_at != header.nbytes:
                    raise ImageDataError(
                        f"{what} holds {info.file_size - data_at} bytes of data, its header "
                        f"declares {header.nbytes}: it is corrupt or not one array")
                return _read_images(member, header, what, limits)
        except (ImageDataError, MemoryError):
            raise
        except Exception as exc:  # zipfile, zlib, bz2, lzma: any of their errors, e.g.
            # RuntimeError (encrypted) or NotImplementedError (compression method)
            raise ImageDataError(f"cannot read {what}: {exc}") from None


# ------------------------------------------------------------------------- image files

GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N")


def _palette_is_grey(img: Image.Image) -> bool:
    """Whether a palette image's palette holds only greys (read without decoding)."""
    try:
        pal = img.palette
        if pal is None:
            return False
        data = bytes(pal.palette)
        step = len(pal.mode)
        if pal.mode not in ("RGB", "RGBA") or not data:
            return False
        return all(data[i] == data[i + 1] == data[i + 2] for i in range(0, len(data), step))
    except Exception:
        return False


@dataclass(frozen=True)
class _Header:
    name: str
    height: int
    width: int
    colour: bool


def _image_header(fp: IO[bytes], name: str, limits: Limits) -> _Header:
    """The image's size and colour from its header alone (nothing decoded; from a zip,
    only the start of the entry is decompressed)."""
    try:
        with Image.open(fp, formats=IMAGE_FORMATS) as img:
            w, h = img.size
            mode = img.mode
            colour = mode not in GREY_MODES and not (mode == "P" and _palette_is_grey(img))
    except MemoryError:
        raise
    except Exception as exc:  # PIL raises many kinds (struct.error, IndexError, ...)
        raise _undecodable(name, exc) from None
    if h < 1 or w < 1 or h * w > limits.max_pixels_per_image:
        raise ImageDataError(f"image {name!r} is {w}x{h} = {w * h} pixels, outside the limit "
                             f"of 1..{limits.max_pixels_per_image} pixels per image")
    return _Header(name, h, w, colour)


def _decode_image(data: bytes, name: str, colour: bool, size: tuple[int, int]) -> np.ndarray:
    """One PNG/JPEG as an (H, W) uint8 array, or (H, W, 3) if ``colour``, resized to
    ``size`` = (H, W) if it differs."""
    h, w = size
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                arr16 = np.asarray(img, dtype=np.int64)
                top = 65535 if arr16.max() > 255 else 255
                out = Image.fromarray(
                    np.rint(np.clip(arr16, 0, top) * (255.0 / top)).astype(np.uint8))
            elif img.mode in ("L", "1", "LA"):
                out = img.convert("L")
            else:
                out = img.convert("RGB")
            if colour and out.mode != "RGB":
                out = out.convert("RGB")
            elif not colour and out.mode != "L":
                out = out.convert("L")  # a palette of greys is a grey image
            if out.size != (w, h):
                out = out.resize((w, h), Image.Resampling.BILINEAR)
            return np.asarray(out, dtype=np.uint8)
    except MemoryError:
        raise
    except Exception as exc:  # PIL raises many kinds (struct.error, IndexError, ...)
        raise _undecodable(name, exc) from None


def _undecodable(name: str, exc: Exception) -> ImageDataError:
    """PIL's reason in the user's words: a file it cannot identify is not one of the
    formats taken, or one damaged in its header (PIL's message names its Python file
    object, nothing the user knows)."""
    if isinstance(exc, UnidentifiedImageError):
        why = f"not a {' or '.join(IMAGE_FORMATS)} image, or a damaged one"
    else:
        why = str(exc) or type(exc).__name__
    return ImageDataError(f"cannot decode image {name!r}: {why}")


ImageSource = Callable[[], IO[bytes]]  # opens one image file for reading


def _open_source(open_: ImageSource, name: str) -> IO[bytes]:
    try:
        return open_()
    except (ImageDataError, MemoryError):
        raise
    except Exception as exc:  # zipfile: RuntimeError (encrypted), NotImplementedError, ...
        raise ImageDataError(f"cannot read {name!r}: {exc}") from None


def _read_source(open_: ImageSource, name: str) -> bytes:
    with _open_source(open_, name) as fp:
        try:
            return fp.read()
        except MemoryError:
            raise
        except Exception as exc:  # a bad CRC, a corrupt deflate stream, ...
            raise ImageDataError(f"cannot read {name!r}: {exc}") from None


def _stack_images(items: Iterable[tuple[str, ImageSource]], limits: Limits) -> ImageSet:
    """Decode image files (name, a function opening it) into one uint8 (N, C, H, W) set,
    sorted by name.

    Every size is read from the file's header and checked against the limits (pixels per
    image, and the running total of decoded bytes) before any image is decoded. Images of
    different sizes are resized (bilinear) to the most common size (on a tie, the size of
    the first such image by name); ``ImageSet.resized_from`` says which sizes were resized.
    Any grey image in a set with colour ones becomes RGB.
    """
    entries = sorted(items, key=lambda t: t[0])
    if len(entries) > limits.max_images:
        raise ImageDataError(f"{len(entries)} images is more than the limit of "
                             f"{limits.max_images}")
    if not entries:
        raise ImageDataError("no PNG/JPEG images found")
    headers: list[_Header] = []
    decoded_total = 0
    for name, open_ in entries:
        with _open_source(open_, name) as fp:
            head = _image_header(fp, name, limits)
        decoded_total += head.height * head.width * (3 if head.colour else 1)
        if decoded_total > limits.max_total_bytes:
            raise ImageDataError(
                f"the images would take more than {limits.max_total_bytes} bytes decoded "
                f"(the limit), reached at {name!r}")
        headers.append(head)
    sizes = Counter((hd.height, hd.width) for hd in headers)
    top = max(sizes.values())
    h, w = next((hd.height, hd.width) for hd in headers if sizes[hd.height, hd.width] == top)
    colour = any(hd.colour for hd in headers)
    c = 3 if colour else 1
    limits.check_shape(len(entries), c, h, w)
    out = np.empty((len(entries), c, h, w), np.uint8)
    for i, (name, open_) in enumerate(entries):
        arr = _decode_image(_read_source(open_, name), name, colour, (h, w))
        out[i] = arr.transpose(2, 0, 1) if colour else arr[None]
    resized = tuple(sorted((hh, ww, k) for (hh, ww), k in sizes.items() if (hh, ww) != (h, w)))
    return ImageSet(out, [name for name, _ in entries], resized)


def _safe_member_name(name: str) -> bool:
    p = PurePosixPath(name.replace("\\", "/"))
    return not p.is_absolute() and ".." not in p.parts and not name.startswith("/")


def _load_zip(fp: IO[bytes], limits: Limits) -> ImageSet:
    with _open_zip(fp, "zip file") as zf:
        for i in zf.infolist():
            # zipfile cuts a name at its first NUL; an entry named "" or "\x00..." would
            # otherwise fail deep inside zipfile, and a NUL cannot be stored as a name.
            if not i.filename or "\x00" in i.orig_filename:
                raise ImageDataError(
                    f"zip entry {i.orig_filename!r} has an empty name or a NUL byte in it")
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

        def opener(info: zipfile.ZipInfo) -> ImageSource:
            return lambda: zf.open(info)

        return _stack_images([(i.filename, opener(i)) for i in infos], limits)


def _index_names(n: int) -> list[str]:
    return [str(i) for i in range(n)]


def read_upload(fp: IO[bytes], filename: str, limits: Limits = DEFAULT_LIMITS
                ) -> ImageSet | NpyFile:
    """Decode an upload from a seekable file (its file name decides the format), with
    every size checked from headers before anything large is allocated or decoded. A
    ``.npy`` already in the stored layout comes back as an :class:`NpyFile` (checked, not
    loaded); anything else as an :class:`ImageSet`."""
    suffix = Path(filename).suffix.lower()
    fp.seek(0)
    if suffix == ".npy":
        return _read_npy(fp, limits)
    if suffix == ".npz":
        arr = _load_npz(fp, limits)
        return ImageSet(arr, _index_names(len(arr)))
    if suffix == ".zip":
        return _load_zip(fp, limits)
    if suffix in IMAGE_SUFFIXES:
        data = fp.read()
        return _stack_images([(Path(filename).name, lambda: io.BytesIO(data))], limits)
    raise ImageDataError(
        f"unsupported file type {suffix or '(none)'!r}: use .npz, .npy, .zip of PNG/JPEG, "
        "a folder of PNG/JPEG files, or one PNG/JPEG file"
    )


def load_file(fp: IO[bytes], filename: str, limits: Limits = DEFAULT_LIMITS) -> ImageSet:
    """As :func:`read_upload`, always loaded into memory."""
    out = read_upload(fp, filename, limits)
    return out.load() if isinstance(out, NpyFile) else out


def load_bytes(data: bytes, filename: str, limits: Limits = DEFAULT_LIMITS) -> ImageSet:
    """Decode an upload (its bytes and its file name, which decides the format)."""
    return load_file(io.BytesIO(data), filename, limits)


def _file_opener(path: Path) -> ImageSource:
    return lambda: path.open("rb")


def load_path(path: str | Path, limits: Limits = DEFAULT_LIMITS) -> ImageSet:
    """Read a file or a folder of PNG/JPEG files."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir()
                       if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        return _stack_images([(f.name, _file_opener(f)) for f in files], limits)
    if not p.exists():
        raise ImageDataError(f"{p}: no such file or folder")
    with p.open("rb") as fp:
        return load_file(fp, p.name, limits)
