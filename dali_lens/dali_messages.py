"""DALI's error messages, made readable: the operator that failed and DALI's own words, without its header and
trailer lines. Used by the DALI loader (``pipelines/dali_backend.py``) and by the kinds that try a DALI reader
before choosing it (``data/kinds/npy.py``); imports nothing from the package."""
from __future__ import annotations

import re

__all__ = ["dali_error"]

_DALI_NOISE = re.compile(r"^(Critical error in pipeline:?|Current pipeline object is no longer valid\.?)$")


def dali_error(exc: BaseException) -> tuple[str, str]:
    """(operator, message) from a DALI exception: the operator named in DALI's "Error in ... operator `...`" line
    ('' when none), and DALI's own message, the part after "encountered:" (the whole text when there is none)
    without DALI's header and trailer lines, on one line."""
    text = str(exc)
    found = re.search(r"Error in \w+ operator `([^`]+)`", text)
    body = text.split("encountered:", 1)[1] if "encountered:" in text else text
    lines = [ln.strip() for ln in body.splitlines() if ln.strip() and not _DALI_NOISE.match(ln.strip())]
    detail = " ".join(lines) or text.strip()
    return (found.group(1) if found else ""), detail[:2000]
