"""PNG/JPEG cutouts: 8-bit pixels, one band per channel (1 greyscale, 3 RGB; PNG also 2 or 4)."""
from __future__ import annotations

import io
import os
import struct
import threading
import zlib

import numpy as np

from ..dataset import DataError
from ..readers import PNG_SIG, check_array, decode_image, image_policy_problem, read_image
from .base import Kind

#: bands of each Pillow mode
PIL_BANDS = {"1": 1, "L": 1, "I": 1, "I;16": 1, "F": 1, "P": 3, "RGB": 3, "YCbCr": 3, "LA": 2, "RGBA": 4, "CMYK": 4}
PNG_END = b"IEND\xaeB`\x82"
JPEG_SOI = b"\xff\xd8"
#: member extensions of packed images, and the same for DALI's webdataset reader
MEMBER_EXTS = ("png", "jpg", "jpeg")
DALI_MEMBER_EXTS = "png;jpg;jpeg"
#: PNG colour type by band count (greyscale, grey + alpha, RGB, RGBA)
PNG_COLOR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_bytes(img_u8: np.ndarray, level: int = 1) -> bytes:
    """An 8-bit PNG of a uint8 (bands, H, W) array: 1 band greyscale, 2 grey + alpha, 3 RGB, 4 RGBA.

    Written directly (filter type 0, zlib ``level``): ~2x faster than PIL for small cutouts, and the zlib
    call releases the GIL so that writer threads run in parallel. Any PNG reader decodes it.
    """
    img_u8 = np.asarray(img_u8)
    if img_u8.dtype != np.uint8 or img_u8.ndim != 3 or img_u8.shape[0] not in PNG_COLOR_TYPE:
        raise ValueError(f"png_bytes: expected uint8 (1 to 4, H, W), got {img_u8.dtype} {img_u8.shape}")
    nb, h, w = img_u8.shape
    raw = np.zeros((h, w * nb + 1), dtype=np.uint8)           # first byte of each row: filter type 0
    raw[:, 1:] = img_u8.transpose(1, 2, 0).reshape(h, w * nb)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, PNG_COLOR_TYPE[nb], 0, 0, 0)
    return b"".join((b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", ihdr),
                     _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), level)), _png_chunk(b"IEND", b"")))


def jpeg_bytes(img_u8: np.ndarray, quality: int = 95) -> bytes:
    """A JPEG (Pillow, 4:4:4, ``quality``) of a uint8 (1, H, W) (greyscale) or (3, H, W) (RGB) array."""
    from PIL import Image

    arr = img_u8[0] if img_u8.shape[0] == 1 else img_u8.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def read_bytes(path: str) -> bytes:
    """A file's bytes; DataError naming it when it is missing or unreadable."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


def decode_image_bytes(data: bytes, where: str) -> np.ndarray:
    """PNG/JPEG bytes -> (C, H, W) uint8 as the torchvision backend decodes them. PNG through Pillow:
    torchvision's libpng decoder segfaults on a corrupt data stream ("bad adaptive filter value", issue 18)
    where Pillow raises; JPEG through torchvision."""
    import torch
    import torchvision.io as tvio

    if not data:
        raise DataError(f"{where}: empty file (0 bytes)")
    bad = image_policy_problem(data)
    if bad:
        raise DataError(f"{where}: {bad}")
    if data[:8] == PNG_SIG:
        return decode_image(data, where)
    try:
        return tvio.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                 mode=tvio.ImageReadMode.UNCHANGED).numpy()
    except (RuntimeError, ValueError) as exc:
        raise DataError(f"{where}: cannot decode image ({str(exc).splitlines()[0]})") from None


def dali_decode_images(raw, dataset, gpu: bool):
    """PNG/JPEG bytes -> HWC uint8 with the dataset's band count. The output type follows the band count: GRAY
    for one band, RGB for three (ANY_DATA on a greyscale JPEG crashes DALI's CPU decoder with a heap corruption,
    issue 18), ANY_DATA only for other counts (PNG with 2 or 4 channels). A file with another band count is
    refused by ``data.validate`` before it gets here. Buffers sized for small cutouts, not the ImageNet-sized
    defaults (8-16 MiB per thread). EXIF orientation is ignored, as Pillow and torchvision ignore it (DALI rotated
    such JPEGs by default). Grey + alpha PNG (2 bands), which DALI's decoder cannot decode, is refused by name.
    """
    from nvidia.dali import fn, types

    if dataset.bands == 2:
        raise DataError(f"{dataset.samples[0].path if dataset.samples else dataset.root}: grey + alpha PNG "
                        "(2 bands): DALI's image decoder cannot decode it; use --backend torchvision")
    h, w = dataset.shape or (0, 0)
    # jpeg_fancy_upsampling: nvJPEG upsamples chroma like libjpeg-turbo (the CPU decoders, PIL), not its cheaper default
    hint = dict(bytes_per_sample_hint=h * w * dataset.bands, jpeg_fancy_upsampling=True, adjust_orientation=False)
    output_type = {1: types.GRAY, 3: types.RGB}.get(dataset.bands, types.ANY_DATA)
    if gpu:  # 'mixed': JPEG on nvJPEG / the hardware decoder, PNG on the CPU then copied to the GPU
        return fn.decoders.image(raw, device="mixed", output_type=output_type, host_memory_padding=256 * 1024,
                                 device_memory_padding=1024 * 1024, **hint)
    return fn.decoders.image(raw, device="cpu", output_type=output_type, **hint)


# ============================================================================================ strict check

def png_chunk_problem(data: bytes) -> str | None:
    """The first structural problem of a PNG byte string: a chunk running past the end, a CRC mismatch, no
    IHDR first or no IEND last. Pillow does not check the CRCs of image data; libpng (DALI) does."""
    if not data.startswith(PNG_SIG):
        return "not a PNG file"
    pos, n, first = len(PNG_SIG), len(data), True
    while pos + 12 <= n:
        length = int.from_bytes(data[pos:pos + 4], "big")
        ctype = data[pos + 4:pos + 8]
        end = pos + 12 + length
        if end > n:
            return f"truncated PNG ({ctype.decode('latin-1')} chunk runs past the end of the file)"
        crc = int.from_bytes(data[end - 4:end], "big")
        if zlib.crc32(data[pos + 4:end - 4]) != crc:
            return f"corrupt PNG ({ctype.decode('latin-1')} chunk at byte {pos}: CRC mismatch)"
        if first and ctype != b"IHDR":
            return "corrupt PNG (no IHDR chunk first)"
        first = False
        if ctype == b"IEND":
            return None
        pos = end
    return "truncated PNG (no end-of-image chunk)"


_STDERR_LOCK = threading.Lock()


class _LibjpegWarnings:
    """Collects what native code writes to file descriptor 2 while active (libjpeg prints its warnings about
    corrupt data there and carries on). One user at a time; text that is not a libjpeg warning is passed on."""

    def __enter__(self):
        import sys

        _STDERR_LOCK.acquire()
        try:
            sys.stderr.flush()
        except (AttributeError, OSError, ValueError):
            pass
        self._r, w = os.pipe()
        os.set_blocking(self._r, False)
        self._saved = os.dup(2)
        os.dup2(w, 2)
        os.close(w)
        self.text = ""
        return self

    def __exit__(self, *exc):
        try:
            os.dup2(self._saved, 2)
            chunks = []
            while True:
                try:
                    chunk = os.read(self._r, 65536)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            text = b"".join(chunks).decode("utf-8", "replace")
            keep = [line for line in text.splitlines() if not _is_libjpeg_warning(line)]
            self.text = "; ".join(line.strip() for line in text.splitlines() if _is_libjpeg_warning(line))
            if keep:
                os.write(self._saved, ("\n".join(keep) + "\n").encode())
        finally:
            os.close(self._r)
            os.close(self._saved)
            _STDERR_LOCK.release()
        return False


def _is_libjpeg_warning(line: str) -> bool:
    return any(k in line for k in ("Corrupt JPEG data", "Premature end of JPEG", "Invalid JPEG", "Bogus ",
                                   "Warning: unknown JFIF", "Inconsistent progression", "Huffman"))


def image_problem(data: bytes, where: str, bands: int | None = None, shape=None) -> str | None:
    """A strict check of one encoded PNG/JPEG, decoded once: the decoding policy from the header
    (``readers.image_policy_problem``: size limit, bit depth, colour model), PNG chunk CRCs then a Pillow
    decode; JPEG through torchvision's libjpeg decoder with its corrupt-data warnings caught. Then the band
    count and size when given. None when the image is sound."""
    if not data:
        return f"{where}: empty file (0 bytes)"
    bad = image_policy_problem(data)
    if bad:
        return f"{where}: {bad}"
    if data[:2] == b"\xff\xd8":
        if b"\xff\xd9" not in data[-32:]:
            return f"{where}: truncated JPEG (no end-of-image marker)"
        bad, size = _jpeg_decode(data)
        if bad:
            return f"{where}: corrupt JPEG data ({bad})"
    else:
        if data.startswith(PNG_SIG):
            bad = png_chunk_problem(data)
            if bad:
                return f"{where}: {bad}"
        try:
            size = decode_image(data, where).shape
        except DataError as exc:
            return str(exc)
    if bands is not None and size[0] != bands:
        return f"{where}: has {size[0]} band(s), the dataset has {bands}"
    if shape is not None and tuple(size[1:]) != tuple(shape):
        return f"{where}: is {size[1]}x{size[2]} px, the dataset's images are {shape[0]}x{shape[1]} (mixed sizes)"
    return None


def _jpeg_decode(data: bytes) -> tuple[str, tuple[int, int, int] | None]:
    """(what is wrong with ``data`` as libjpeg decodes it: its error, or the warnings it prints about corrupt data
    and then decodes through, empty when sound; (bands, H, W) as ``readers.decode_image`` gives them)."""
    import torch
    import torchvision.io as tvio

    with _LibjpegWarnings() as cap:
        try:
            shape = tuple(tvio.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8)).shape)
        except (RuntimeError, ValueError) as exc:
            return str(exc).splitlines()[0].split(", ")[-1], None
    return cap.text, (3 if shape[0] == 4 else shape[0], *shape[1:])  # CMYK is read as RGB


# ============================================================================================ the kind

class ImageKind(Kind):
    name = "image"
    exts = (".png", ".jpg", ".jpeg")
    eight_bit = True
    strict_check = True
    checkpointable = True
    auto_cpu_backend = "dali-cpu"
    member_exts = MEMBER_EXTS
    dali_member_exts = DALI_MEMBER_EXTS
    manifest_member = "png|jpg"

    def read(self, sample, dataset) -> np.ndarray:
        return read_image(sample.path)

    def decode(self, data: bytes, where: str) -> np.ndarray:
        """Encoded bytes (a file, a packed member) -> (bands, H, W) uint8, through Pillow."""
        if not data:
            raise DataError(f"{where}: empty member (0 bytes)")
        return decode_image(data, where)

    decode_torch_bytes = staticmethod(decode_image_bytes)

    def quick_problem(self, dataset, i: int, path: str, size: int) -> str | None:
        """Readable header, size, band count, and the end-of-stream marker."""
        from PIL import Image, UnidentifiedImageError

        try:
            bad = image_policy_problem(read_bytes(path))
        except DataError as exc:
            return str(exc)
        if bad:
            return f"{path}: {bad}"
        try:
            with Image.open(path) as im:
                fmt, mode, (w, h) = im.format, im.mode, im.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            return f"{path}: cannot decode image ({exc})"
        with open(path, "rb") as fh:
            fh.seek(max(0, size - 64))
            tail = fh.read()
        if fmt == "PNG" and not tail.endswith(PNG_END):
            return f"{path}: truncated PNG (no end-of-image chunk)"
        if fmt == "JPEG" and b"\xff\xd9" not in tail[-32:]:
            return f"{path}: truncated JPEG (no end-of-image marker)"
        bands = PIL_BANDS.get(mode)
        if bands != dataset.bands:
            return f"{path}: has {bands or mode} band(s), the dataset has {dataset.bands}"
        if dataset.shape is not None and (h, w) != tuple(dataset.shape):
            return (f"{path}: is {h}x{w} px, the dataset's images are {dataset.shape[0]}x{dataset.shape[1]} "
                    "(mixed sizes)")
        return None

    def sample_problem(self, dataset, i: int, allow_nonfinite: bool = False):
        """The strict check of the file's bytes (``validate.image_problem``) and their digest."""
        from ..validate import content_digest

        s = dataset.samples[i]
        try:
            data = read_bytes(s.path)
        except DataError as exc:
            return str(exc), None
        return image_problem(data, s.path, dataset.bands, dataset.shape), content_digest([data])

    def encode(self, array: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
        """uint8 (bands, H, W) as PNG (:func:`png_bytes`) or, with ``fmt='jpeg'``, JPEG (:func:`jpeg_bytes`)."""
        return jpeg_bytes(array, quality) if fmt == "jpeg" else png_bytes(np.asarray(array, dtype=np.uint8))

    def packed_as(self) -> Kind:
        return self

    def pack_member(self, dataset, i: int, allow_nonfinite: bool) -> tuple[str, bytes]:
        """The original bytes, after the strict check (PNG CRCs, a full decode, libjpeg's corrupt-data
        warnings, bands, size), so that no decoder is later handed a corrupt file."""
        path = dataset.samples[i].path
        data = read_bytes(path)
        problem = image_problem(data, path, dataset.bands, dataset.shape)
        if problem:
            raise DataError(problem)
        if data[:8] == PNG_SIG:
            return "png", data
        if data[:2] == JPEG_SOI:
            return "jpg", data
        raise DataError(f"{path}: not a PNG or JPEG file (other image formats cannot be packed)")

    def decode_torch(self, dataset, i: int, allow_nonfinite: bool = False) -> np.ndarray:
        sample = dataset.samples[i]
        try:
            with open(sample.path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise DataError(f"{sample.path}: cannot read ({exc})") from None
        arr = decode_image_bytes(data, sample.path)
        check_array(arr, sample, dataset)
        return arr

    def dali_source(self, dataset, opts, gpu: bool, order: np.ndarray, reader_args: dict):
        """``fn.readers.file`` with each file's dataset position as its label, then the image decoder."""
        from nvidia.dali import fn

        files = [dataset.samples[i].path for i in order]
        raw, index = fn.readers.file(files=files, labels=[int(i) for i in order], **reader_args)
        return dali_decode_images(raw, dataset, gpu), index

    def dali_ordered(self, dataset, gpu: bool) -> bool:
        return True  # fn.readers.file reads its files list in order

    dali_decode = staticmethod(dali_decode_images)


IMAGE = ImageKind()
