"""``.npy`` cutouts: float arrays shaped (bands, H, W) (a 2-D array is one band); also the member format of
float data in packed shards."""
from __future__ import annotations

import io
import os

import numpy as np

from ..dataset import DataError, dataset_cache
from .base import Kind

#: bytes of the file name that DALI's numpy reader reports per sample (its ``source_info``), padded
SOURCE_INFO_LEN = 4096


def load_cufile() -> str | None:
    """Where ``libcufile.so.0`` (cuFile / GPUDirect Storage, which DALI's GPU numpy reader opens and its wheel
    does not ship) was loaded from, or None. Looked for on the library path, then in the ``nvidia-cufile``
    wheel that CUDA builds of torch bring; found there, it is loaded globally, so that DALI's own ``dlopen`` of
    the same name finds it."""
    import ctypes
    import ctypes.util
    import glob
    import importlib.util

    names = ["libcufile.so.0", ctypes.util.find_library("cufile")]
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        names += sorted(glob.glob(os.path.join(root, "cufile", "lib", "libcufile.so*")))
    for name in filter(None, names):
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            return name
        except OSError:
            continue
    return None


_CUFILE: list = []
_CUFILE_VERDICT: dict = {}  # (st_dev of a data file, GPU) -> '' when cuFile reads that filesystem, else why not


def cufile_problem(path: str | None, device_id: int = 0, probe: bool = True) -> str:
    """'' when DALI's GPU numpy reader (cuFile) can read ``path``'s filesystem on GPU ``device_id``, else why not.

    A loadable ``libcufile.so.0`` is not enough: on the first GPU machine (an H200) it loaded and every read then
    failed with "CUFile import failed: ... file descriptor is not registered" (the filesystem, or cuFile's own
    configuration, refused it). So one data file is read through a one-operator GPU pipeline, once per
    filesystem and GPU. ``probe=False`` (inside a pipeline definition, where no other pipeline may be built)
    only uses an earlier verdict, else the library's presence."""
    if not _CUFILE:
        _CUFILE.append(load_cufile())
    if not _CUFILE[0]:
        return "no libcufile.so.0 for its GPU reader"
    if path is None:
        return ""
    key = (os.stat(path).st_dev, device_id)
    if key not in _CUFILE_VERDICT:
        if not probe:
            return ""
        _CUFILE_VERDICT[key] = probe_cufile(path, device_id)
    return _CUFILE_VERDICT[key]


def probe_cufile(path: str, device_id: int) -> str:
    """Read ``path`` once with DALI's GPU numpy reader: '' when that works, else DALI's reason."""
    from nvidia.dali import fn
    from nvidia.dali.pipeline import Pipeline

    from ...dali_messages import dali_error

    where = os.path.dirname(os.path.abspath(path))
    try:
        pipe = Pipeline(batch_size=1, num_threads=1, device_id=device_id, prefetch_queue_depth=1)
        with pipe:
            pipe.set_outputs(fn.readers.numpy(files=[path], device="gpu"))
        pipe.build()
        pipe.run()
        del pipe
        return ""
    except RuntimeError as exc:
        return f"cuFile cannot read {where}: {dali_error(exc)[1][:300]}"


def numpy_reader_device(opts, path: str | None = None, probe: bool = False) -> str:
    """Device of the numpy reader on the GPU backend: ``"gpu"`` (read straight to the GPU with cuFile) when
    :func:`cufile_problem` finds none for ``path`` (a file of the data set), else ``"cpu"`` (read on the CPU,
    then moved with ``.gpu()``). ``opts.numpy_reader`` = ``"gpu"``/``"cpu"`` forces one (``"auto"``, the
    default, decides; ``LoaderOptions`` checked the value)."""
    want = opts.numpy_reader
    if want in ("gpu", "cpu"):
        return want
    return "cpu" if cufile_problem(path, opts.device_id or 0, probe) else "gpu"


def _first(dataset) -> str | None:
    """The file whose cuFile verdict every step consults (probed by ``dali_prepare``), or None."""
    return dataset.samples[0].path if len(dataset) else None


def dali_reads_exactly(dataset) -> bool:
    """True when DALI's numpy reader gives every file of ``dataset`` the pixels of the decoding policy
    (``readers.npy_dtype_problem``: numpy's float32 cast): every file has the same dtype, little-endian (DALI
    rejects big-endian arrays) and numeric, C or Fortran order. The reader also asserts on a batch of mixed
    dtypes (float32 files among uint16 ones). Otherwise the DALI backends read the files with numpy
    (``read``, in a per-sample external source), as the torchvision backend does. Reads every file's header
    once per dataset object (cached)."""
    from concurrent.futures import ThreadPoolExecutor

    from ..readers import npy_dtype_problem, npy_header

    entry = dataset_cache(dataset, __name__)
    if "exact" not in entry:
        def dtype_of(path: str):
            try:
                dtype = npy_header(path)[1]
            except Exception:  # noqa: BLE001 - corrupt: read() names it
                return None
            return None if npy_dtype_problem(dtype) or dtype.byteorder == ">" or (
                dtype.byteorder == "=" and not np.little_endian) else dtype.newbyteorder("<")

        paths = [s.path for s in dataset.samples]
        with ThreadPoolExecutor(max(1, min(8, len(paths)))) as pool:
            found = set(pool.map(dtype_of, paths, chunksize=256))
        entry["exact"] = len(found) == 1 and None not in found
    return entry["exact"]


def dali_chw_to_hwc(x):
    """A (bands, H, W) node (no layout: DALI's numpy reader and decoder set none) as HWC."""
    from nvidia.dali import fn

    x = fn.reshape(x, layout="CHW")  # resize would read an unlabelled CHW array as HWC
    return fn.transpose(x, perm=[1, 2, 0], output_layout="HWC")


class NpyKind(Kind):
    name = "npy"
    exts = (".npy",)
    checkpointable = True
    auto_cpu_backend = "dali-cpu"
    member_exts = ("npy",)
    dali_member_exts = "npy"
    manifest_member = "npy"

    def read(self, sample, dataset) -> np.ndarray:
        from ..readers import read_npy

        return read_npy(sample.path)

    def decode(self, data: bytes, where: str) -> np.ndarray:
        """``.npy`` bytes (a packed member) -> float32 (bands, H, W)."""
        from ..readers import as_bands

        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - numpy raises several types for corrupt data
            raise DataError(f"{where}: cannot read .npy ({exc})") from None
        return as_bands(arr, where)

    decode_torch_bytes = decode

    def quick_problem(self, dataset, i: int, path: str, size: int) -> str | None:
        """The header only, then the file's length against what the header promises, and the shape."""
        from ..readers import npy_header

        from ..readers import npy_dtype_problem

        try:
            shape, dtype, _, offset = npy_header(path)
        except Exception as exc:
            return f"{path}: cannot read .npy (corrupt header: {exc})"
        bad = npy_dtype_problem(dtype)
        if bad:
            return f"{path}: {bad}"
        need = offset + int(np.prod(shape)) * dtype.itemsize
        if size < need:
            return f"{path}: truncated .npy ({size} bytes, the header promises {need})"
        want = (dataset.bands, *dataset.shape) if dataset.shape else None
        if len(shape) == 2 and dataset.bands == 1:
            shape = (1, *shape)
        if want and tuple(shape) != want:
            return f"{path}: array shape {tuple(shape)}, the dataset's samples are {want}"
        return None

    def encode(self, array: np.ndarray) -> bytes:
        """``array`` as a float32, C-ordered ``.npy`` file (format 1.0, which DALI's numpy decoder reads)."""
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.ascontiguousarray(array, dtype="<f4"), version=(1, 0),
                                  allow_pickle=False)
        return buf.getvalue()

    def packed_as(self) -> Kind:
        return self

    def dali_checkpointable(self, dataset) -> bool:
        return dali_reads_exactly(dataset)

    def dali_ordered(self, dataset, gpu: bool) -> bool:
        return dali_reads_exactly(dataset)  # fn.readers.numpy reads its files list in order

    def dali_source(self, dataset, opts, gpu: bool, order: np.ndarray, reader_args: dict):
        """DALI's numpy reader (on the GPU when cuFile reads the data: :func:`numpy_reader_device`); the index
        is the file name it reports. None (the files read by :meth:`read`, as torchvision reads them) where the
        reader would not give the policy's pixels (:func:`dali_reads_exactly`: mixed or big-endian dtypes)."""
        from nvidia.dali import fn, types

        if not dali_reads_exactly(dataset):
            return None
        files = [dataset.samples[i].path for i in order]
        on_gpu = gpu and numpy_reader_device(opts, _first(dataset)) == "gpu"
        x = fn.readers.numpy(files=files, device="gpu" if on_gpu else "cpu", **reader_args)
        if gpu and not on_gpu:
            x = x.gpu()
        # float32 for every later operator, as read_npy gives the torchvision path: numpy's default float64
        # (and other dtypes) would reach resize/normalize, which take no doubles
        x = fn.cast(x, dtype=types.FLOAT)
        index = fn.pad(fn.get_property(x, key="source_info"), axes=[0], shape=[SOURCE_INFO_LEN])
        return dali_chw_to_hwc(x), index

    def dali_decode(self, raw, dataset, gpu: bool):
        """Packed ``.npy`` members -> HWC float32 (DALI's numpy decoder runs on the CPU)."""
        from nvidia.dali import fn, types

        x = fn.decoders.numpy(raw, dtype=types.FLOAT)  # CPU only: (bands, H, W)
        if gpu:
            x = x.gpu()
        return dali_chw_to_hwc(x)

    def dali_prepare(self, dataset, opts) -> None:
        if dali_reads_exactly(dataset):
            numpy_reader_device(opts, _first(dataset), probe=True)

    def dali_reads(self, dataset, opts) -> str:
        if not dali_reads_exactly(dataset):
            return ("numpy reads the .npy files (mixed or big-endian dtypes, which DALI's numpy reader cannot read "
                    "exactly)")
        first = _first(dataset)
        if numpy_reader_device(opts, first) == "gpu":
            return "DALI reads .npy on the GPU (cuFile)"
        why = cufile_problem(first, opts.device_id or 0, probe=False) if opts.numpy_reader == "auto" \
            else "numpy_reader='cpu'"
        return f"DALI reads .npy on the CPU and copies them to the GPU ({why})"


NPY = NpyKind()
