"""Phantom v2 drawing surface: the display grid of one slice with the anatomical coordinates of every pixel.

Display orientation as in v1 (``ldm.data.phantom_render``): anterior at the top, the patient's right on the
image's left, u = columns and v = rows in [-1, 1]. Every structure is drawn in the patient's *anatomical frame*
(body centre at the origin, posterior = +v) and placed in the field by the patient's pose, ``display = shift +
zoom * R(rotation) @ anatomical``, so the body outline and every organ rotate, move and zoom together.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ldm.data.phantom_v2_patient import PatientV2


class _Canvas:
    """Display grid with the anatomical coordinates of every pixel, plus the growing HU image and label map."""

    def __init__(self, n: int, p: PatientV2) -> None:
        self.c = ((np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0).astype(np.float32)
        self.ca, self.sa = math.cos(p.rotation), math.sin(p.rotation)
        self.zoom, self.shift = p.zoom, p.shift
        dx = self.c[None, :] - np.float32(p.shift[0])
        dy = self.c[:, None] - np.float32(p.shift[1])
        self.u = ((self.ca * dx + self.sa * dy) / p.zoom).astype(np.float32)
        self.v = ((-self.sa * dx + self.ca * dy) / p.zoom).astype(np.float32)
        self.hu = np.full((n, n), -1000.0, dtype=np.float32)
        self.labels = np.zeros((n, n), dtype=np.uint8)

    def window(self, cu: float, cv: float, reach: float) -> tuple[slice, slice]:
        """Rows and columns of the display box around anatomical point (cu, cv) with radius ``reach``."""
        x = self.shift[0] + self.zoom * (self.ca * cu - self.sa * cv)
        y = self.shift[1] + self.zoom * (self.sa * cu + self.ca * cv)
        r = reach * self.zoom
        r0, r1 = np.searchsorted(self.c, [y - r, y + r])
        c0, c1 = np.searchsorted(self.c, [x - r, x + r])
        return slice(int(r0), int(r1)), slice(int(c0), int(c1))

    def blob(self, cu: float, cv: float, au: float, av: float, angle: float = 0.0,
             harm: Optional[np.ndarray] = None, flip: bool = False) -> np.ndarray:
        """Boolean mask of a (deformed, rotated) ellipse in the anatomical frame; ``flip`` mirrors its shape."""
        out = np.zeros(self.u.shape, dtype=bool)
        if au <= 0 or av <= 0:
            return out
        reach = max(au, av) * (1.0 + (float(np.abs(harm[:, 0]).sum()) if harm is not None else 0.0))
        rows, cols = self.window(cu, cv, reach)
        if rows.stop <= rows.start or cols.stop <= cols.start:
            return out
        du = self.u[rows, cols] - np.float32(cu)
        dv = self.v[rows, cols] - np.float32(cv)
        if flip:
            du = -du
        ca, sa = np.float32(math.cos(angle)), np.float32(math.sin(angle))
        x = (ca * du + sa * dv) / np.float32(au)
        y = (-sa * du + ca * dv) / np.float32(av)
        r2 = x * x + y * y
        if harm is None:
            out[rows, cols] = r2 <= 1.0
            return out
        theta = np.arctan2(y, x)
        radius = np.ones_like(r2)
        for k, (amp, phase) in enumerate(harm, start=2):
            radius += np.float32(amp) * np.cos(k * theta + np.float32(phase))
        out[rows, cols] = r2 <= radius * radius
        return out

    def paint(self, region: np.ndarray, hu: float, label: Optional[int] = None) -> None:
        self.hu[region] = hu
        if label is not None:
            self.labels[region] = label
