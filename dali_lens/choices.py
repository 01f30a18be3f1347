"""The valid values of every choice option: one tuple per option, defined here once.

The commands' argparse (``choices=``, through ``cli.py`` and ``trainers/config.py``) and the library's own
checks (``build_loader``, ``LoaderOptions``, ``Ensemble.probabilities``, ``build_model``) read these tuples,
so an option value is accepted or refused in the same way whichever door it comes in through. The modules
that own each idea re-export their tuple (``dali_lens.BACKENDS``, ``pipelines.options.DTYPES``,
``inference.FUSIONS``, ``models.STEMS``, ``trainers.TRAINERS``). A leaf module: it imports nothing.
"""

#: loaders (``--backend``): auto picks DALI on a GPU, else DALI CPU, else torchvision (``resolve_backend``); the
#: rest are the built-in entries of the backend registry (``pipelines.register_backend``; test_backends.py)
BACKENDS = ("auto", "dali", "dali-cpu", "torchvision")
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
#: trainers (``--trainer``)
TRAINERS = ("single", "multiscale", "ensemble")
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
