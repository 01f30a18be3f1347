"""``python -m dali_lens.predict``: runs the command :mod:`dali_lens.commands.predict` (docs/DESIGN.md, "Commands")."""
if __name__ == "__main__":
    import sys

    from dali_lens.commands.predict import main

    sys.exit(main())
