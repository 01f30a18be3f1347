"""The valid values of every choice option: one tuple per option, defined here once.

The commands' argparse (``choices=``, through ``cli.py`` and ``trainers/config.py``) and the library's own
checks (``build_loader``, ``LoaderOptions``, ``scoring.check_fusion``, ``build_model``) read these tuples,
so an option value is accepted or refused in the same way whichever door it comes in through. The modules
that own each idea re-export their tuple (``dali_lens.BACKENDS``, ``pipelines.options.DTYPES``,
``inference.FUSIONS``, ``models.STEMS``). The trainers (``--trainer``) are a registry instead, whose table
``trainers.TRAINERS`` is the option's choices. The documented range of every numeric option is declared here
too (``Range`` and friends, below). A leaf module: it imports nothing from dali_lens.
"""
import argparse
import math

#: loaders (``--backend``): auto picks DALI on a GPU, else DALI CPU, else torchvision (``resolve_backend``); the
#: rest are the built-in entries of the backend registry (``pipelines.register_backend``; test_backends.py)
BACKENDS = ("auto", "dali", "dali-cpu", "torchvision")
#: where DALI's GPU backend reads ``.npy`` (``LoaderOptions.numpy_reader``): auto (cuFile when it works), gpu, cpu
NUMPY_READERS = ("auto", "gpu", "cpu")
#: loader output dtypes (``--dtype`` adds ``auto``)
DTYPES = ("float32", "float16", "uint8")
#: flux scaling of float data before normalisation (``--scaling``)
SCALINGS = ("auto", "none", "asinh", "clip")
#: how cutouts reach each scale (``--resize-mode``)
RESIZE_MODES = ("resize", "crop")
#: per-band normalisation (``--norm``)
NORMS = ("stats", "none")
#: how member scores are combined (``--fusion``)
FUSIONS = ("mean_prob", "mean_logit", "temperature")
#: ResNet stems (``--stem``): auto (small for img_size <= 96), imagenet (7x7 stride 2 + max-pool), small (3x3, stride 1)
STEMS = ("auto", "imagenet", "small")
#: multiscale scale schedule (``--schedule``)
SCALE_SCHEDULES = ("all", "progressive")
#: multiscale consistency loss between scales (``--consistency``)
CONSISTENCIES = ("none", "kl", "mse")
#: point-spread functions of the synthetic generator (``generate --psf``)
PSFS = ("gaussian", "moffat")
#: learning-rate schedules (``--lr-schedule``)
LR_SCHEDULES = ("cosine", "onecycle")
#: mixed precision on GPU (``--amp``)
AMP_MODES = ("auto", "bf16", "fp16", "off")


# ============================================================================ documented ranges of the options
# Every option that takes a number (or a list of them) declares its range with one of the classes below, used
# as the argparse ``type=`` of its flag (``cli.Parser`` shows ``describe`` in --help and reports a value
# outside as one ``error: --option ...`` line, exit 2, before any work) and by the library's own check of the
# same value (``TrainConfig.__post_init__``, ``cli.check_options`` for ``dali_lens.predict``): one range, two
# doors. ``invalid_examples`` are values just outside the range: tests/test_option_ranges.py feeds them to
# every option of every command, so an option without a declared range fails that test.

class OptionRangeError(ValueError):
    """An option value outside its documented range (a ValueError, so the library's callers catch it as one)."""


class Range:
    """Numbers of one ``kind`` (``int`` or ``float``) between ``lo`` and ``hi`` (None: unbounded; ``lo_open`` /
    ``hi_open`` exclude the bound). Floats must be finite."""

    def __init__(self, kind: type, lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False):
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open = kind, lo, hi, lo_open, hi_open
        self.__name__ = self.describe  # argparse names a type by its __name__

    @property
    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            return f"{what} in {'(' if self.lo_open else '['}{lo:g}, {hi:g}{')' if self.hi_open else ']'}"
        if lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {lo:g}"
        if hi is not None:
            return f"{what} {'<' if self.hi_open else '<='} {hi:g}"
        return what

    def contains(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if self.kind is int and (isinstance(v, float) and not v.is_integer()):
            return False
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return not (self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)))

    def __call__(self, text):
        """argparse ``type=``: the value of ``text``, or ArgumentTypeError saying the range."""
        try:
            v = self.kind(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.describe}, got {text!r}") from None
        if not self.contains(v):
            raise argparse.ArgumentTypeError(f"must be {self.describe}, got {text}")
        return v

    def check(self, flag: str, value) -> None:
        """The library's check of an already-parsed ``value`` (None means "the default" and passes)."""
        if value is not None and not self.contains(value):
            raise OptionRangeError(f"{flag} must be {self.describe}, got {value!r}")

    def invalid_examples(self) -> list[str]:
        step = 1 if self.kind is int else 0.5
        out = ["x"]
        if self.lo is not None:
            out.append(f"{self.lo if self.lo_open else self.lo - step:g}")
        if self.hi is not None:
            out.append(f"{self.hi if self.hi_open else self.hi + step:g}")
        if self.kind is float:
            out.append("nan")
        return out


class _ParsedOption:
    """An option type defined by its ``parse(value)`` (ValueError saying why not) and ``describe``: argparse's
    ``type=`` (``__call__``) and the library's check (``check``) of the same value, for IntList, HduList and
    Parsed."""

    def __call__(self, text):
        try:
            return self.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"must be {self.describe}, got {text!r} ({exc})") from None

    def check(self, flag: str, value) -> None:
        if value is not None:
            try:
                self.parse(value)
            except ValueError as exc:
                raise OptionRangeError(f"{flag} must be {self.describe}, got {value!r} ({exc})") from None


class IntList(_ParsedOption):
    """Comma-separated integers >= ``lo`` (``count`` of them if given, pairwise different if ``distinct``),
    read as a tuple of ints (``parse``): the command line's text and the library's values (a tuple, or the same
    text) become the same tuple."""

    def __init__(self, lo: int, *, count: int | None = None, distinct: bool = False, what: str = "integers"):
        self.lo, self.count, self.distinct, self.what = lo, count, distinct, what
        self.__name__ = self.describe

    @property
    def describe(self) -> str:
        n = f"{self.count} " if self.count else ""
        return (f"{n}comma-separated {self.what} >= {self.lo}" + (", all different" if self.distinct else ""))

    def parse(self, value) -> tuple[int, ...]:
        """``value`` (``"64,112"`` or a sequence of integers) as a tuple of ints; ValueError saying why not."""
        items = value if isinstance(value, (list, tuple)) else str(value).split(",")
        try:
            vals = tuple(_integer(s) for s in items)
        except ValueError:
            raise ValueError("not a list of integers") from None
        if not vals or (self.count and len(vals) != self.count):
            raise ValueError("wrong number of values")
        if min(vals) < self.lo:
            raise ValueError(f"{min(vals)} is below {self.lo}")
        if self.distinct and len(set(vals)) != len(vals):
            raise ValueError("a value is repeated")
        return vals

    def invalid_examples(self) -> list[str]:
        out = ["x", str(self.lo - 1) if not self.count else ",".join([str(self.lo - 1)] * self.count)]
        if self.distinct:
            out.append(f"{self.lo + 56},{self.lo + 56}")
        if self.count:
            out.append(",".join([str(self.lo)] * (self.count + 1)))
        return out


def _integer(v) -> int:
    """An int from ``v`` (an int, or its text); ValueError for anything else (a bool, 1.5, "(64")."""
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ValueError(f"not an integer: {v!r}")
    return int(v.strip()) if isinstance(v, str) else v


class HduList(_ParsedOption):
    """``--hdus``: comma-separated HDU indices (integers >= 0) or EXTNAMEs, one per band, read as a tuple of ints
    and names (``parse``; ``data.dataset.parse_hdus``)."""

    describe = "comma-separated HDU indices >= 0 or EXTNAMEs"
    __name__ = describe

    def parse(self, value) -> tuple[int | str, ...]:
        """``value`` (``"1,G"`` or a sequence of indices/names) as ``(1, "G")``; ValueError saying why not."""
        out = []
        for item in (value if isinstance(value, (list, tuple)) else str(value).split(",")):
            if isinstance(item, bool) or not isinstance(item, (int, str)):
                raise ValueError(f"{item!r} is neither an index nor a name")
            s = str(item).strip()
            if not s:
                raise ValueError("an empty entry")
            if s.lstrip("+-").isdigit():
                if int(s) < 0:
                    raise ValueError(f"{s} is negative")
                out.append(int(s))
            else:
                out.append(s)
        return tuple(out)

    def invalid_examples(self) -> list[str]:
        return ["-1", "0,-2", "1,,2"]


class Parsed(_ParsedOption):
    """An option read by its own ``parse(text)`` (raising ValueError on a bad value), with its range in words
    and values outside it (``invalid``) for the tests."""

    def __init__(self, parse, describe: str, invalid: tuple[str, ...]):
        self.parse, self.describe, self.invalid = parse, describe, invalid
        self.__name__ = describe

    def invalid_examples(self) -> list[str]:
        return list(self.invalid)


COUNT = Range(int, 1)                     #: a positive count (epochs, batch size, N cutouts)
NON_NEGATIVE = Range(int, 0)              #: 0 = off / none
THREADS = Range(int, 1)                   #: CPU threads, reader/simulation threads
LOADER_WORKERS = Range(int, 0)            #: loader workers: 0 = in the loading process (torchvision), 1 thread (DALI)
SEED = Range(int, 0, 2 ** 32 - 1)         #: numpy's and torch's seeds
PROBABILITY = Range(float, 0.0, 1.0)      #: a score threshold, a fraction in [0, 1]
FRACTION_OPEN = Range(float, 0.0, 1.0, lo_open=True, hi_open=True)  #: a prior, alpha: in (0, 1)
HOLD_OUT = Range(float, 0.0, 1.0, hi_open=True)  #: --val-fraction: [0, 1), 0 = no hold-out
POSITIVE = Range(float, 0.0, lo_open=True)  #: a learning rate, a scale
NON_NEGATIVE_NUMBER = Range(float, 0.0)   #: a weight
ANY_NUMBER = Range(float)                 #: any finite number (a mask value)
PIXELS = Range(int, 8)                    #: an input size (the models need >= 8 px)
SCALES = IntList(8, distinct=True, what="sizes")  #: multiscale input sizes
AT_N = IntList(1, distinct=True, what="counts")  #: --at-n: the N of purity@N and completeness@N
HDUS = HduList()


def _shard(value) -> tuple[int, int]:
    """``--shard I/N`` (text, or an ``(I, N)`` pair) as ``(I, N)`` with 0 <= I < N; ValueError saying why not."""
    try:
        i, n = ((value if isinstance(value, (list, tuple)) else str(value).split("/")) if value is not None else ())
        i, n = _integer(i), _integer(n)
    except ValueError:
        raise ValueError("not two integers I/N") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError("needs N >= 1 and 0 <= I < N")
    return i, n


#: ``predict --shard I/N``: the I-th (0-based) of N parts of the inputs (a Slurm array task's part)
SHARD = Parsed(_shard, "I/N with 0 <= I < N", ("x", "3", "3/3", "-1/4", "1/0", "1/2/3", "a/b"))
LAYER_DECAY = Range(float, 0.0, 1.0, lo_open=True)  #: --layer-decay: (0, 1], each layer's LR factor vs the one above
