"""The commands whose names are also public functions (``dali_lens.train``, ``dali_lens.predict``).

``dali_lens/train.py`` and ``dali_lens/predict.py`` are shims that only run these under ``python -m``, so that
importing a command never replaces the function of the same name on the package (docs/DESIGN.md, "Commands").
"""
