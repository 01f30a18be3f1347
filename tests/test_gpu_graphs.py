"""GPU pipelines checked on a machine without a GPU (issue 15).

DALI defines a GPU pipeline without CUDA; only ``build()`` needs it. Every GPU variant that
``dali_backend.define_pipeline`` can produce is defined here and linted against DALI's own schema registry:

- every operator has an implementation for its device (``OpSchema.GetSupportedBackends``);
- no GPU output feeds an input that must be on the CPU (``OpSchema.GetInputDevice``: the inputs of CPU and
  'mixed' operators but for metadata-only ones like ``_Shape``, and inputs that the schema pins to the CPU);
- argument inputs (per-sample arguments given as data nodes) are on the CPU;
- ``OpSchema.CheckArgs`` accepts every operator's arguments.

The lint is shown to catch a planted wrong device. The Python logic of the GPU-only path (DALI's per-band
FITS readers in lock-step, the sample positions per epoch and per rank) runs here with CPU stand-ins.
"""
from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from conftest import write_dataset
from dali_lens.data import discover
from dali_lens.data.kinds.fits import LISTED_READER, ListedIndex, fits_hdu_numbers
from dali_lens.pipelines import LoaderOptions, dali_backend
from dali_lens.pipelines.options import epoch_order

pytestmark = pytest.mark.skipif(not dali_backend.available(), reason="needs NVIDIA DALI")
SIZE = 16
SCALES = (8, SIZE, 24)  # a downscale, the identity and an upscale


def graph_ops(pipe) -> list:
    """The operators of a defined pipeline, inputs first (DALI's own collection also runs CheckArgs and stops
    at the first failure; the lint reports every problem)."""
    ops, seen = [], set()

    def visit(op):
        if id(op) in seen:
            return
        seen.add(id(op))
        for edge in op.inputs:
            for node in edge if isinstance(edge, list) else [edge]:
                visit(node.source)
        ops.append(op)

    for node in list(pipe._graph_out) + list(pipe._sinks):
        visit(node.source)
    return ops


def lint(pipe) -> list[str]:
    """Problems DALI would report at build() (or not at all) in a defined pipeline, from DALI's schemas."""
    problems = []
    for op in graph_ops(pipe):
        schema, device, spec = op._op.schema, op._op.device, op.spec
        name = f"{schema.Name()}({device})"
        if device not in schema.GetSupportedBackends():
            problems.append(f"{name}: DALI has no {device} implementation (only {schema.GetSupportedBackends()})")
        for i in range(spec.NumRegularInput()):
            actual = spec.InputDevice(i)
            # where the schema needs input i, given where it is; a CPU operator may take GPU data only where the
            # schema says so (metadata-only operators such as _Shape and GetProperty)
            need = schema.GetInputDevice(i, actual, "gpu" if device == "gpu" else "cpu") or actual
            if actual == "gpu" and need == "cpu":
                problems.append(f"{name}: input {i} ({spec.InputName(i)}) is on the GPU, the operator needs it on "
                                "the CPU")
        for i in range(spec.NumRegularInput(), spec.NumInput()):
            if spec.InputDevice(i) != "cpu":
                problems.append(f"{name}: argument input {spec.InputName(i)} is on the GPU")
        try:
            schema.CheckArgs(spec)
        except Exception as exc:  # noqa: BLE001 - DALI raises several types
            problems.append(f"{name}: {exc}")
    return problems


# ---- the data sets: every source kind _decoded can read

@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from astropy.io import fits

    from dali_lens.data.synthetic import generate_dataset
    from dali_lens.pack import pack

    root = tmp_path_factory.mktemp("graphs")
    out = {}
    for fmt, bands in (("png", 1), ("png", 3), ("jpeg", 3), ("npy", 3), ("fits", 2)):
        out[f"{fmt}{bands}"] = write_dataset(str(root / f"{fmt}{bands}"), fmt, n_per_class=3, size=SIZE,
                                             bands=bands, splits=("test",))
    for fmt in ("png", "npy"):
        pack(out[f"{fmt}3" if fmt == "npy" else "png3"], str(root / f"{fmt}-packed"), shard_size="16K", fsync=False,
             log=lambda *a: None)
        out[f"shards-{fmt}"] = str(root / f"{fmt}-packed")
    challenge = str(root / "challenge")
    generate_dataset(challenge, n=4, layout="challenge", track="space", seed=1)
    out["challenge"] = challenge
    assert fits  # astropy writes the FITS sets
    return out


def dataset(sources, kind):
    if kind == "fits-dali":  # --hdus as indices: DALI's GPU FITS reader
        return discover(sources["fits2"], hdus=(1, 2))["test"]
    if kind == "fits-astropy":  # EXTNAMEs: astropy in an external source, then .gpu()
        return discover(sources["fits2"], hdus=("B0", "B1"))["test"]
    if kind == "fits-bands":
        return discover(sources["challenge"], val_fraction=0)["train"]
    return discover(sources[{"npy": "npy3"}.get(kind, kind)])["test"]


IMAGE_KINDS = ["png1", "png3", "jpeg3", "shards-png"]
FLOAT_KINDS = ["npy-gpu-reader", "npy-cpu-reader", "fits-dali", "fits-astropy", "fits-bands", "shards-npy"]


def variants(kind):
    dtypes = ("uint8", "float16", "float32") if kind in IMAGE_KINDS else ("float16", "float32")
    masks = [(None, False)] if kind in IMAGE_KINDS else [(None, False), (0.0, False), (0.0, True)]
    return list(itertools.product(dtypes, (True, False), ("crop", "resize"), masks))


@pytest.mark.parametrize("kind", IMAGE_KINDS + FLOAT_KINDS)
def test_every_gpu_graph_passes_dalis_schemas(sources, kind):
    ds = dataset(sources, kind.replace("-gpu-reader", "").replace("-cpu-reader", ""))
    reader = {"npy-gpu-reader": "gpu", "npy-cpu-reader": "cpu"}.get(kind, "auto")
    if kind == "fits-dali" or kind == "fits-bands":
        assert fits_hdu_numbers(ds) is not None, "the set must take the DALI FITS reader path"
    if kind == "fits-astropy":
        assert fits_hdu_numbers(ds) is None
    checked = 0
    for dtype, train, mode, (mask_value, mask_channel) in variants(kind):
        opts = LoaderOptions(scales=SCALES, batch_size=4, train=train, augment=train, max_shift=2 if train else 0,
                             dtype=dtype, resize_mode=mode, mask_value=mask_value, mask_channel=mask_channel,
                             device_id=0, scaling="asinh" if ds.pixel_kind != "image" else "none",
                             numpy_reader=reader)
        pipe = dali_backend.define_pipeline(ds, opts, True, np.arange(len(ds)))
        problems = lint(pipe)
        assert not problems, (kind, dtype, train, mode, mask_value, mask_channel, problems)
        # the images leave the pipeline on the GPU, the index and shape where their operators put them
        assert all(node.device == "gpu" for node in pipe._graph_out[:len(SCALES)])
        checked += 1
    assert checked == len(variants(kind))


# ---- the lint catches a wrong device

def test_lint_catches_an_operator_moved_to_a_device_dali_lacks(sources, monkeypatch):
    """Planted: packed .npy members decoded by ``fn.decoders.numpy`` on the GPU, where DALI has no implementation
    (CPU only). DALI accepts the definition and would fail only in build(), on a GPU; the lint fails here."""
    from nvidia.dali import fn

    ds = dataset(sources, "shards-npy")
    opts = LoaderOptions(scales=(SIZE,), batch_size=4, device_id=0)
    assert lint(dali_backend.define_pipeline(ds, opts, True, np.arange(len(ds)))) == []
    real = fn.decoders.numpy
    monkeypatch.setattr(fn.decoders, "numpy", lambda raw, **kw: real(raw.gpu(), **kw, device="gpu"))
    problems = lint(dali_backend.define_pipeline(ds, opts, True, np.arange(len(ds))))
    assert problems == ["decoders__Numpy(gpu): DALI has no gpu implementation (only ['cpu'])"], problems


def test_inputs_on_the_wrong_device_fail_when_defined():
    """The device of inputs DALI 2.4 checks itself when the graph is defined (OpSpec.AddInput; argument inputs
    in Python), so the lint's own input rules are a second line: GPU data into a CPU operator, a GPU shape into
    Reshape, a GPU per-sample argument."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=2, num_threads=1, device_id=0)
    def pipe(case: str):
        x = fn.external_source(source=lambda: [np.zeros((4, 4, 3), np.uint8)] * 2, batch=True, layout="HWC")
        if case == "cpu-op":
            return fn.decoders.numpy(x.gpu(), dtype=types.FLOAT, device="cpu")
        if case == "argument":
            return fn.flip(x.gpu(), horizontal=fn.random.coin_flip(probability=0.5, device="gpu"))
        y = fn.flip(x.gpu(), horizontal=1)
        return fn.reshape(y, y.shape(device="gpu"))

    for case, message in (("cpu-op", "incompatible device"), ("shape", "incompatible device"),
                          ("argument", "must be on CPU")):
        with pytest.raises((RuntimeError, ValueError), match=message):
            pipe(case)


# ---- the GPU-only Python logic on CPU stand-ins

def test_listed_sample_positions_per_epoch_and_rank(sources):
    """What DALI's FITS readers are handed (``DaliLoader.listed_order``): training, every epoch a new order,
    the ranks disjoint, floor(n / ranks) each; evaluation, each sample once over the ranks, in order."""
    ds = dataset(sources, "fits-astropy")
    n = len(ds)
    for train in (True, False):
        epochs = []
        for epoch in range(3):
            ranks = []
            for rank in range(2):
                loader = dali_backend.DaliLoader(ds, LoaderOptions(scales=(SIZE,), batch_size=2, train=train,
                                                                   shard_id=rank, num_shards=2, seed=3))
                loader.epoch = epoch
                ranks.append(loader.listed_order().tolist())
                assert ranks[-1] == loader.order[epoch_order(n, epoch, loader.opts)].tolist()
            if train:
                assert not set(ranks[0]) & set(ranks[1]) and all(len(r) == n // 2 for r in ranks)
            else:
                assert ranks[0] + ranks[1] == list(range(n))
            epochs.append(ranks)
        assert (epochs[0] != epochs[1]) == train


def test_per_band_readers_stay_in_lock_step(sources):
    """The per-band GPU FITS readers of the challenge layout, replaced by CPU file readers with the same file lists
    and the same reader arguments (``LISTED_READER``): every batch's band files belong to the sample that
    ``ListedIndex`` reports, also in the padded last batch, for the order of each epoch."""
    from nvidia.dali import fn, pipeline_def, types

    ds = dataset(sources, "fits-bands")
    pipe = dali_backend.define_pipeline(ds, LoaderOptions(scales=(SIZE,), batch_size=3, device_id=0), True,
                                        np.arange(len(ds)))
    pipe._build_graph()
    readers = [op for op in pipe._ops if op._op.schema.Name() == "experimental__readers__Fits"]
    assert len(readers) == ds.bands
    settings = [str(op.spec).split("Arguments:")[1] for op in readers]
    strip = lambda text: [ln for ln in text.splitlines() if ln.strip().split(":")[0] not in (  # noqa: E731
        "files", "name", "_origin_stack_line", "_origin_stack_lineno", "preserve_name")]
    assert all(strip(s) == strip(settings[0]) for s in settings)  # the same arguments but the files

    content = {p: open(p, "rb").read() for s in ds.samples for p in s.band_paths}
    for epoch in range(2):
        loader = dali_backend.DaliLoader(ds, LoaderOptions(scales=(SIZE,), batch_size=3, train=True, seed=5))
        loader.epoch = epoch
        order = loader.listed_order()

        @pipeline_def(batch_size=3, num_threads=1, device_id=None)
        def stand_in():
            planes = [fn.readers.file(files=[ds.samples[i].band_paths[b] for i in order],
                                      name="reader" if b == 0 else f"reader{b}", **LISTED_READER)[0]
                      for b in range(ds.bands)]
            return (*planes, fn.external_source(source=ListedIndex(order), batch=False,
                                                dtype=types.INT64))

        p = stand_in()
        p.build()
        seen = []
        for _ in range(-(-len(order) // 3)):
            *planes, index = p.run()
            for k in range(len(index)):
                i = int(np.asarray(index[k])[0])
                seen.append(i)
                for b in range(ds.bands):
                    assert np.asarray(planes[b][k]).tobytes() == content[ds.samples[i].band_paths[b]]
        assert seen[:len(order)] == order.tolist() and set(seen[len(order):]) <= {int(order[-1])}
        del p
