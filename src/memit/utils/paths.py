"""File names built from data: case ids, fact ids and method names come from files that other
people wrote, so each becomes one path component that cannot leave its folder."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from memit.errors import InputError

# Ids that are already safe names keep them (CounterFact's integers, zsRE's indices), so run
# folders stay readable; "~" never occurs in these, so an encoded name never equals a plain one.
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def path_component(value: object) -> str:
    """``value`` as one file-name component: itself when it is a short plain name, else a
    readable ASCII prefix and a hash of the whole (``../x`` -> ``x~1a2b...``), distinct per value."""
    text = str(value)
    if _PLAIN.fullmatch(text):
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    readable = _UNSAFE.sub("_", text).strip("_")[:40]
    return f"{readable}~{digest}"


def child_path(folder: str | Path, name: str) -> Path:
    """``folder / name``, refusing a name that would resolve outside ``folder``."""
    folder = Path(folder)
    path = folder / name
    if path.parent.resolve() != folder.resolve():
        raise InputError(f"file name {name!r} leaves its folder {folder}")
    return path


__all__ = ["child_path", "path_component"]
