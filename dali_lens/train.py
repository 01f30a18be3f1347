"""``python -m dali_lens.train``: runs the command :mod:`dali_lens.commands.train` (docs/DESIGN.md, "Commands").

Only run, never imported: an import of ``dali_lens.train`` would bind this module over the library function
``dali_lens.train`` (the package attribute of the same name), so it is refused with the names to use instead."""
if __name__ != "__main__":
    raise ImportError("dali_lens.train is the 'python -m dali_lens.train' entry point only: the library function is "
                      "dali_lens.train (dali_lens.api.train), the command dali_lens.commands.train")

import sys

from dali_lens.commands.train import main

sys.exit(main())
