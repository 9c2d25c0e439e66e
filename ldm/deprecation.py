"""Deprecated names, warned about in one place: :func:`deprecate` warns once per name and process, naming what to
use instead and the version that removes it (diffusers' ``deprecate(name, removal, message)`` is the model)."""
from __future__ import annotations

import warnings

_warned: set[str] = set()


def deprecate(name: str, removal: str, instead: str, stacklevel: int = 3) -> bool:
    """Warn (``DeprecationWarning``) that ``name`` goes in version ``removal`` and ``instead`` replaces it, the first
    time per process; returns whether it warned now. ``stacklevel`` 3 points at the caller of the deprecated API."""
    if name in _warned:
        return False
    _warned.add(name)
    warnings.warn(f"{name} is deprecated and will be removed in version {removal}; {instead}", DeprecationWarning,
                  stacklevel=stacklevel)
    return True
