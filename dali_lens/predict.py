"""``python -m dali_lens.predict``: runs the command :mod:`dali_lens.commands.predict` (docs/DESIGN.md, "Commands").

Only run, never imported: an import of ``dali_lens.predict`` would bind this module over the library function
``dali_lens.predict`` (the package attribute of the same name), so it is refused with the names to use instead."""
if __name__ != "__main__":
    raise ImportError("dali_lens.predict is the 'python -m dali_lens.predict' entry point only: the library function is "
                      "dali_lens.predict (dali_lens.api.predict), the command dali_lens.commands.predict")

import sys

from dali_lens.commands.predict import main

sys.exit(main())
