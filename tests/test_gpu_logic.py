"""The GPU path's defects found by reading DALI 2.4's source, checked on the CPU (issue 15): DALI's own error
kept, the GPU FITS reader given only the files it decodes exactly, the numpy reader's cuFile path, fancy JPEG
upsampling on nvJPEG, DALI's memory pools released when a pipeline is dropped."""
from __future__ import annotations

import os
import weakref

import numpy as np
import pytest
import torch

from conftest import DALI_BACKENDS, write_dataset
from dali_lens.data import DataError, discover
from dali_lens.data.kinds.fits import fits_hdu_numbers
from dali_lens.data.kinds import npy as npy_kind
from dali_lens.data.kinds.npy import load_cufile, numpy_reader_device
from dali_lens.pipelines import LoaderOptions, build_loader, dali_backend

pytestmark = pytest.mark.skipif(not dali_backend.available(), reason="needs NVIDIA DALI")
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="checks how DALI fails without CUDA")


def npy_with_nan(root: str) -> str:
    """4 + 4 small .npy samples, the first with NaN pixels (fine when masked)."""
    write_dataset(root, "npy", n_per_class=4, size=16, splits=("test",))
    first = os.path.join(root, "test", "lens", "lens000.npy")
    x = np.load(first)
    x[:, :3, :3] = np.nan
    np.save(first, x)
    return first


def fits_reader_error() -> RuntimeError:
    """The real error of DALI's FITS reader run where there is no CUDA driver (its CPU variant needs one too)."""
    from astropy.io import fits
    from nvidia.dali import fn, pipeline_def

    import tempfile

    path = os.path.join(tempfile.mkdtemp(), "a.fits")
    fits.HDUList([fits.PrimaryHDU(np.ones((4, 4), np.float32))]).writeto(path)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        return fn.experimental.readers.fits(files=[path], hdu_indices=[1], device="cpu")

    p = pipe()
    with pytest.raises(RuntimeError) as info:
        p.build()
        p.run()
    return info.value


# ---- defect 1: DALI's real error, chained; a scan only for reader/decoder failures, with the loader's options

@CPU_ONLY
def test_dali_error_keeps_dalis_message_and_does_not_blame_the_data(tmp_path):
    exc = fits_reader_error()
    assert str(exc).startswith("Critical error in pipeline:")
    op, detail = dali_backend.dali_error(exc)
    assert op == "nvidia.dali.fn.experimental.readers.fits"
    assert "CUDA driver version is insufficient" in detail and "Critical error" not in detail
    # a driver failure in a reader is not the data's fault: no scan, so the NaN file is not blamed
    npy_with_nan(str(tmp_path / "d"))
    loader = dali_backend.DaliLoader(discover(str(tmp_path / "d"))["test"], LoaderOptions(scales=(16,), batch_size=4))
    out = loader._explain(exc)
    assert type(out) is RuntimeError and "CUDA driver version is insufficient" in str(out), str(out)
    assert "experimental.readers.fits" in str(out)


@CPU_ONLY
def test_gpu_pipeline_without_cuda_keeps_dalis_sentence(tmp_path):
    """Building the GPU pipeline where CUDA is missing: DALI's own sentence, no data scan (which, without the
    loader's options, blamed the NaN file)."""
    npy_with_nan(str(tmp_path / "d"))
    ds = discover(str(tmp_path / "d"))["test"]
    opts = LoaderOptions(scales=(16,), batch_size=4, device_id=0)
    with pytest.raises(RuntimeError) as info:
        dali_backend._build(ds, opts, True, np.arange(len(ds)), False)
    out = dali_backend.DaliLoader(ds, opts)._explain(info.value)
    assert type(out) is RuntimeError and "CUDA is not available" in str(out), str(out)


def test_reader_failure_scans_with_the_loaders_mask_value(tmp_path):
    """A truncated .npy makes DALI's numpy reader fail: the scan names it, and not the NaN file that
    ``mask_value`` masks (the old scan ignored ``mask_value`` and blamed both)."""
    nan_file = npy_with_nan(str(tmp_path / "d"))
    bad = os.path.join(str(tmp_path / "d"), "test", "nonlens", "nonlens001.npy")
    with open(bad, "r+b") as fh:
        fh.truncate(os.path.getsize(bad) // 2)
    ds = discover(str(tmp_path / "d"))["test"]
    loader = build_loader(ds, backend="dali-cpu", scales=(16,), batch_size=4, mask_value=0.0,
                          validate=False)
    with pytest.raises(DataError) as info:
        list(loader)
    msg = str(info.value)
    assert "nonlens001.npy" in msg and os.path.basename(nan_file) not in msg, msg
    assert info.value.__cause__ is not None


# ---- defect 2: DALI's GPU FITS reader only for files it decodes exactly, and only when every file is alike

def write_fits(root: str, make_hdu, n: int = 3, odd=None) -> str:
    """root/test/<class>/*.fits.fz: a primary HDU and two bands made by ``make_hdu(plane)``; with ``odd``, the
    last file of the second class is made by ``odd`` instead."""
    from astropy.io import fits

    rng = np.random.default_rng(0)
    for cls in ("lens", "nonlens"):
        os.makedirs(os.path.join(root, "test", cls), exist_ok=True)
        for i in range(n):
            maker = odd if odd is not None and cls == "nonlens" and i == n - 1 else make_hdu
            planes = (rng.random((2, 16, 16)) * 1000).astype(np.int32)
            fits.HDUList([fits.PrimaryHDU()] + [maker(p) for p in planes]).writeto(
                os.path.join(root, "test", cls, f"{cls}{i}.fits.fz"))
    return root


def comp(kind="RICE_1", dtype=np.int32, **kw):
    from astropy.io import fits

    return lambda p: fits.CompImageHDU(p.astype(dtype), compression_type=kind, **kw)


@pytest.mark.parametrize("case,dali", [
    ("plain", True), ("rice-int-rows", True),
    ("rice-float-quantised", False), ("gzip-int", False), ("rice-int-square-tiles", False),
    ("rice-uint16-bzero", False), ("one-gzip-file-among-rice", False), ("one-plain-file-among-rice", False)])
def test_gpu_fits_reader_only_for_exact_uniform_files(tmp_path, case, dali):
    from astropy.io import fits

    makers = {"plain": (lambda p: fits.ImageHDU(p), None), "rice-int-rows": (comp(), None),
              "rice-float-quantised": (comp(dtype=np.float32), None), "gzip-int": (comp("GZIP_1"), None),
              "rice-int-square-tiles": (comp(tile_shape=(8, 8)), None),
              "rice-uint16-bzero": (comp(dtype=np.uint16), None),
              "one-gzip-file-among-rice": (comp(), comp("GZIP_1")),
              "one-plain-file-among-rice": (comp(), lambda p: fits.ImageHDU(p))}
    make, odd = makers[case]
    ds = discover(write_fits(str(tmp_path / case), make, odd=odd), hdus=(1, 2))["test"]
    assert ds.kind == "fits" and len(ds) == 6
    assert fits_hdu_numbers(ds) == ([2, 3] if dali else None)


def test_gpu_fits_rule_per_band_files(tmp_path):
    """One file per band (the challenge layout): every band file of every sample is checked."""
    from astropy.io import fits

    from dali_lens.data.synthetic import generate_dataset

    root = str(tmp_path / "challenge")
    generate_dataset(root, n=4, layout="challenge", track="ground", seed=1)
    assert fits_hdu_numbers(discover(root, val_fraction=0)["train"]) == [1]
    last = discover(root, val_fraction=0)["train"].samples[-1].band_paths[-1]
    data = fits.getdata(last)
    os.remove(last)
    # the last band file of the last sample Rice-compressed, its image in HDU 2: it does not match the first file
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(np.round(data).astype(np.int32), compression_type="RICE_1")]
                 ).writeto(last)
    assert fits_hdu_numbers(discover(root, val_fraction=0)["train"]) is None


# ---- defect 3: the GPU numpy reader needs cuFile (libcufile.so.0, not in DALI's wheel)

def graph_ops(pipe):
    """The operators of a defined (not built) pipeline, inputs first."""
    pipe._build_graph()
    return pipe._ops


def arg(op, name: str):
    """An argument's value as the OpSpec prints it ('' when not set)."""
    for line in str(op.spec).splitlines():
        if line.strip().startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return ""


@pytest.mark.parametrize("forced", ["auto", "gpu", "cpu"])
def test_gpu_numpy_reader_reads_on_the_cpu_without_cufile(make_dataset, forced):
    ds = discover(make_dataset("npy", n_per_class=2, size=16))["test"]
    opts = LoaderOptions(scales=(16,), batch_size=2, device_id=0, numpy_reader=forced)
    found = load_cufile()
    want = forced if forced != "auto" else ("gpu" if found else "cpu")
    assert numpy_reader_device(opts) == want
    pipe = dali_backend.define_pipeline(ds, opts, True, np.arange(len(ds)))
    reader = next(op for op in graph_ops(pipe) if op._op.schema.Name() == "readers__Numpy")
    assert reader._op.device == want
    assert pipe._graph_outputs[0].device == "gpu"  # the images always end on the GPU
    loader = dali_backend.DaliLoader(ds, LoaderOptions(scales=(16,), batch_size=2, numpy_reader=forced))
    loader.gpu = True  # what a GPU loader would log (one cannot be made without CUDA)
    assert ("cuFile" in loader.reads) == (want == "gpu") and ("on the CPU" in loader.reads) == (want == "cpu")
    with pytest.raises(ValueError, match="numpy_reader"):
        numpy_reader_device(LoaderOptions(numpy_reader="gds"))


def test_cufile_probe_reads_one_file_and_says_why_it_cannot(make_dataset):
    """The probe really runs DALI's GPU numpy reader on a data file; where that fails (here: no GPU at all) it
    returns DALI's reason, naming the folder. On a GPU machine where cuFile works it returns ''."""
    ds = discover(make_dataset("npy", n_per_class=1, size=8))["test"]
    why = npy_kind.probe_cufile(ds.samples[0].path, 0)
    if torch.cuda.is_available() and not why:
        return  # cuFile reads this filesystem
    assert why.startswith(f"cuFile cannot read {os.path.dirname(ds.samples[0].path)}: ") and len(why) > 40, why


def test_auto_numpy_reader_falls_back_when_cufile_cannot_read_the_data(make_dataset, monkeypatch):
    """What the first GPU session found: libcufile.so.0 loads, yet reading the data fails. 'auto' must then read
    on the CPU and copy (and log why), not fail on the first batch. The probe's verdict for the data's
    filesystem is planted here (the probe itself needs a GPU: test above)."""
    ds = discover(make_dataset("npy", n_per_class=2, size=16))["test"]
    first = ds.samples[0].path
    monkeypatch.setattr(npy_kind, "_CUFILE", ["/usr/lib/libcufile.so.0"])
    key = (os.stat(first).st_dev, 0)
    monkeypatch.setitem(npy_kind._CUFILE_VERDICT, key, "cuFile cannot read /data: file descriptor is not registered")
    opts = LoaderOptions(scales=(16,), batch_size=2, device_id=0)
    assert numpy_reader_device(opts, first) == "cpu"
    pipe = dali_backend.define_pipeline(ds, opts, True, np.arange(len(ds)))
    reader = next(op for op in graph_ops(pipe) if op._op.schema.Name() == "readers__Numpy")
    assert reader._op.device == "cpu"
    loader = dali_backend.DaliLoader(ds, LoaderOptions(scales=(16,), batch_size=2))
    loader.gpu = True
    assert "on the CPU" in loader.reads and "file descriptor is not registered" in loader.reads, loader.reads
    monkeypatch.setitem(npy_kind._CUFILE_VERDICT, key, "")  # where cuFile works: the GPU reader
    assert numpy_reader_device(opts, first) == "gpu"
    assert "cuFile" in loader.reads


# ---- defect 4: nvJPEG upsamples chroma like the CPU decoders

@pytest.mark.parametrize("gpu", [False, True])
def test_jpeg_decoders_use_fancy_upsampling(make_dataset, gpu):
    ds = discover(make_dataset("jpeg", n_per_class=2, size=16))["test"]
    opts = LoaderOptions(scales=(16,), batch_size=2, device_id=0 if gpu else None)
    ops = graph_ops(dali_backend.define_pipeline(ds, opts, gpu, np.arange(len(ds))))
    decoder = next(op for op in ops if op._op.schema.Name() == "decoders__Image")
    assert decoder._op.device == ("mixed" if gpu else "cpu")
    assert arg(decoder, "jpeg_fancy_upsampling") == "True"


# ---- defect 5: a dropped pipeline's memory goes back to the system

def test_dropped_pipeline_releases_dalis_memory(make_dataset, monkeypatch):
    from nvidia.dali import backend

    ds = discover(make_dataset("png", n_per_class=3, size=16))["test"]
    loader = build_loader(ds, backend="dali-cpu", scales=(16,), batch_size=2)
    list(loader)
    pipe = weakref.ref(loader._it._pipes[0])
    calls = []
    real = backend.ReleaseUnusedMemory
    monkeypatch.setattr(backend, "ReleaseUnusedMemory", lambda: calls.append(pipe() is None) or real())
    loader.load_state_dict(loader.state_dict())  # a restored state: the pipeline is rebuilt
    assert calls == [True]  # released once, after the pipeline itself was gone
    assert len(list(loader)) == 3


# ---- the device checks (benchmarks/gpu_check.py runs the 'dali' cases first on a GPU; 'dali-cpu' here)

@pytest.mark.parametrize("backend", DALI_BACKENDS)
@pytest.mark.parametrize("case", ["float-quantised", "rice-int"])
def test_fits_fz_through_dali_matches_astropy(tmp_path, backend, case):
    """Tile-compressed FITS through ``--backend dali``: Rice integers by DALI's GPU reader, quantised floats by
    astropy (the rule of ``fits_hdu_numbers``), both equal to what astropy reads (the torchvision backend)."""
    from conftest import collect

    make = comp(dtype=np.float32) if case == "float-quantised" else comp()
    ds = discover(write_fits(str(tmp_path / case), make), hdus=(1, 2))["test"]
    kw = dict(scales=(16, 24), batch_size=4, mean=(500.0,) * 2, std=(300.0,) * 2)
    loader = build_loader(ds, backend=backend, **kw)
    assert loader._listed == (backend == "dali" and case == "rice-int")
    a_idx, _, a = collect(loader)
    b_idx, _, b = collect(build_loader(ds, backend="torchvision", **kw))
    assert a_idx.tolist() == b_idx.tolist() == list(range(len(ds)))
    assert torch.equal(a[16], b[16]) or (a[16] - b[16]).abs().max() < 1e-5, float((a[16] - b[16]).abs().max())
    assert (a[24] - b[24]).abs().max() < 0.02


@pytest.mark.parametrize("backend", DALI_BACKENDS)
@pytest.mark.parametrize("reader", ["gpu", "cpu"])
def test_npy_through_the_gpu_reader_with_and_without_cufile(make_dataset, backend, reader):
    """.npy on the DALI backend read straight to the GPU (cuFile) and on the CPU then copied: the same tensors
    as torchvision's. (On the CPU backend both are DALI's CPU reader.)"""
    from conftest import collect

    ds = discover(make_dataset("npy", n_per_class=4, size=16))["test"]
    if backend == "dali" and reader == "gpu":
        why = npy_kind.cufile_problem(ds.samples[0].path)
        if why:  # the first H200 machine: libcufile.so.0 loaded, every read "file descriptor is not registered"
            pytest.skip(f"DALI's GPU numpy reader cannot run here: {why}")
    kw = dict(scales=(16, 24), batch_size=3, mean=(100.0,) * 3, std=(300.0,) * 3)
    loader = build_loader(ds, backend=backend, numpy_reader=reader, **kw)
    if backend == "dali":
        assert ("cuFile" in loader.reads) == (reader == "gpu"), loader.reads
    a_idx, _, a = collect(loader)
    b_idx, _, b = collect(build_loader(ds, backend="torchvision", **kw))
    assert a_idx.tolist() == b_idx.tolist()
    assert (a[16] - b[16]).abs().max() < 1e-5 and (a[24] - b[24]).abs().max() < 0.02
