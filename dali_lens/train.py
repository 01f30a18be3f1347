"""``python -m dali_lens.train``: runs the command :mod:`dali_lens.commands.train` (docs/DESIGN.md, "Commands")."""
if __name__ == "__main__":
    import sys

    from dali_lens.commands.train import main

    sys.exit(main())
