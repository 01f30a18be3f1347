"""Simulate strong gravitational lenses and non-lenses and write them to OUT.

Lenses: a singular isothermal ellipsoid + external shear ray-traced onto a compact, blue elliptical
Sersic source (arcs, rings, doubles, Einstein crosses) on top of a red elliptical Sersic deflector.
Non-lenses: the same deflector population, plain (45 %) or with an unlensed blue companion 1-3
Einstein radii away (40 %, hard negatives, half of them arc-like) or a red companion (15 %). All
cutouts: faint field galaxies, Gaussian or Moffat PSF (FFT), sky, photon and read noise; values are
sky-subtracted counts. The same --seed gives identical files.

Standard layout:  OUT/{train,val,test}/{lens,nonlens}/<id>.<ext>, OUT/{train,val,test}.csv
                  (filepath,label + catalogue columns), OUT/dataset.json.
Challenge layout: OUT/classifications.csv (ID,is_lens,einstein_area,numb_pix_lensed_image,
                  flux_lensed_image_in_sigma) and OUT/Public/... one FITS per band (Metcalf et al. 2019:
                  space = EUC_VIS; ground = Band1..4 = R,I,G,U), 101x101 px, fluxes ~1e-11..1e-9,
                  ~10 % of the images with masked pixels = 100.
"""
from __future__ import annotations

import argparse
import sys
import textwrap

from .choices import COUNT, PIXELS, POSITIVE, PROBABILITY, PSFS, SEED, THREADS
from .cli import Parser, run_command
from .data import synthetic as syn
from .data.synthetic.parameters import PAIR, POSITIVE_PAIR, SPLITS

EPILOG = textwrap.dedent("""\
    examples:
      python -m dali_lens.generate data/lenses                         # 6000 64x64 g,r,i PNGs
      python -m dali_lens.generate data/hard --source-mag 23,25.5 --einstein-radius 0.5,1.2
      python -m dali_lens.generate data/ugriz --bands u,g,r,i,z --format fits --size 101
      python -m dali_lens.generate data/challenge --layout challenge --track ground --n 2000

    difficulty: fainter sources (--source-mag) make lenses harder to find, and so does worse seeing
    (--seeing); the Einstein radius range (--einstein-radius, arcsec; divide by --pixel-scale for pixels)
    sets how far the arcs lie from the deflector. With the defaults a small CNN reaches an AUC of ~0.9.
    """)
_ER, _SM = syn.DEFAULT_DIFFICULTY["einstein_radius"], syn.DEFAULT_DIFFICULTY["source_mag"]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m dali_lens.generate", description=__doc__, epilog=EPILOG)  # physics: data/synthetic
    p.add_argument("out", metavar="OUT", help="output directory (created; must be empty unless --overwrite)")
    g = p.add_argument_group("data set")
    g.add_argument("--n", type=COUNT, default=6000, help="number of cutouts (default: 6000)")
    g.add_argument("--size", type=PIXELS, default=None,
                   help="cutout size in pixels (default: 64; 101 for --layout challenge)")
    g.add_argument("--bands", default=None,
                   help="comma-separated band names, e.g. g,r,i or u,g,r,i,z (default: g,r,i). Known names get their "
                        "colours from a small SED table (u g r i z y vis); unknown names are interpolated by their "
                        "position in the list. png/jpeg need 1 or 3 bands")
    g.add_argument("--format", dest="fmt", choices=syn.FORMATS, default="png",
                   help="file format of the standard layout (default: png). png/jpeg: 8-bit, fixed asinh stretch, 1 "
                        "band = greyscale, 3 bands = RGB (channel c = band c); fits: one float32 ImageHDU per band "
                        "(EXTNAME = band); npy: float32 (bands, H, W)")
    g.add_argument("--layout", choices=syn.LAYOUTS, default="standard",
                   help="standard (train/val/test folders + CSV manifests) or challenge (Metcalf et al. 2019 "
                        "strong-lens finding challenge files) (default: standard)")
    g.add_argument("--track", choices=syn.TRACKS, default="ground",
                   help="challenge layout only: ground (4 bands R,I,G,U, 0.2\"/px) or space (Euclid VIS, "
                        "0.1\"/px) (default: ground)")
    g.add_argument("--seed", type=SEED, default=0, help="random seed; the same seed gives identical files (default: 0)")
    g.add_argument("--lens-fraction", type=PROBABILITY, default=0.5, help="fraction of lenses, exact up to rounding "
                                                                           "(default: 0.5)")
    g.add_argument("--splits", type=SPLITS, default=(0.7, 0.15, 0.15), metavar="TRAIN,VAL,TEST",
                   help="split fractions of the standard layout; split sizes are exact and stratified "
                        "(default: 0.7,0.15,0.15)")
    d = p.add_argument_group("difficulty and observing conditions")
    d.add_argument("--einstein-radius", type=POSITIVE_PAIR, default=_ER, metavar="MIN,MAX",
                   help=f"Einstein radius range in arcsec, uniform (default: {_ER[0]:g},{_ER[1]:g}); in pixels: divide "
                        "by the pixel scale. Small radii blend the arcs with the deflector under the seeing; large "
                        "radii come with brighter, bigger deflectors (L ~ theta_E^2)")
    d.add_argument("--source-mag", type=PAIR, default=_SM, metavar="MIN,MAX",
                   help="r-band magnitude range of the unlensed source, uniform; larger = fainter = harder "
                        f"(default: {_SM[0]:g},{_SM[1]:g}; a 25th-magnitude source is at the noise level)")
    d.add_argument("--seeing", type=POSITIVE_PAIR, default=None, metavar="MIN,MAX",
                   help="PSF FWHM range in arcsec, r band (default: 0.6,1.2 ground; 0.16,0.22 space)")
    d.add_argument("--pixel-scale", type=POSITIVE, default=None,
                   help="arcsec per pixel (default: 0.2 ground; 0.1 space)")
    d.add_argument("--psf", choices=PSFS, default="gaussian",
                   help="PSF profile (default: gaussian); Moffat has beta = 3.5")
    d.add_argument("--supersample", type=COUNT, default=2,
                   help="rays per pixel per axis when ray-tracing the source (default: 2)")
    r = p.add_argument_group("running")
    r.add_argument("--overwrite", action="store_true",
                   help="allow a non-empty OUT: replaces what a previous run of the generator wrote there, by its "
                        "record (dataset.json/generator.json); other files are left alone, and a folder without "
                        "that record is refused")
    r.add_argument("--workers", type=THREADS, default=None,
                   help="simulation threads (default: up to 4, the number of CPUs)")
    r.add_argument("--fsync", action="store_true",
                   help="fsync every file (durable across power loss; slower). Files are always written "
                        "atomically (temporary name + rename)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.layout == "challenge" and args.bands is not None:
        parser.error("--bands does not apply to --layout challenge (the bands are set by --track)")

    def run() -> None:
        options = {k: v for k, v in vars(args).items() if k not in ("out", "quiet")}
        summary = syn.generate_dataset(args.out, progress=not args.quiet and sys.stderr.isatty(), **options)
        print(syn.format_summary(summary))

    return run_command(run, (FileExistsError, ValueError, NotADirectoryError), f"interrupted: the files written so far "
                       f"in {args.out} are complete (each is written atomically) but the set is not (its manifests are "
                       "written last): rerun with --overwrite", output=args.out)


if __name__ == "__main__":
    sys.exit(main())
