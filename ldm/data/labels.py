"""Class names and preview colours of the label sets, and ``colourise`` for mask previews."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

# CT-Organ (CT-ORG, Rister et al. 2020) as used here: brain (6 in the label volumes) is mapped away by default.
CTORGAN_CLASSES: tuple[str, ...] = ("background", "liver", "bladder", "lungs", "kidneys", "bone")
CTORGAN_COLOURS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),  # background
    (220, 120, 60),  # liver: brown-orange
    (240, 220, 60),  # bladder: yellow
    (80, 160, 240),  # lungs: blue
    (220, 50, 60),  # kidneys: red
    (235, 235, 235),  # bone: near white
)
# The raw CT-ORG label volumes also hold 6 = brain.
CTORG_RAW_BRAIN_ID = 6

# Duke breast MRI segmentation slices: breast, fibroglandular tissue (FGT), vessels.
BREASTMRI_CLASSES: tuple[str, ...] = ("background", "breast", "fibroglandular", "vessels")
BREASTMRI_COLOURS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (200, 170, 150),
    (240, 120, 200),
    (220, 50, 60),
)

DEFAULT_IGNORE_INDEX = 255
IGNORE_COLOUR = (128, 128, 128)
INVALID_COLOUR = (255, 0, 255)


def colourise(mask: Any, colours: Sequence[Sequence[int]] = CTORGAN_COLOURS,
              ignore_index: int = DEFAULT_IGNORE_INDEX) -> np.ndarray:
    """Map integer class ids (numpy array or torch tensor, any shape ``...``) to ``... x 3`` uint8 RGB.

    ``ignore_index`` pixels are grey, ids outside the palette magenta, so a wrong label is visible.
    A channel dimension of size 1 (``B,1,H,W`` or ``H,W,1``) is not removed: pass the squeezed mask.
    """
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    ids = np.asarray(mask)
    if ids.dtype.kind == "f":
        if not np.all(np.isfinite(ids)) or not np.all(ids == np.round(ids)):
            raise ValueError("colourise expects integer class ids; got non-integer float values "
                             "(take argmax over the class channel first)")
    ids = ids.astype(np.int64)
    palette = np.asarray(colours, dtype=np.uint8)
    out = np.empty(ids.shape + (3,), dtype=np.uint8)
    out[...] = np.asarray(INVALID_COLOUR, dtype=np.uint8)
    valid = (ids >= 0) & (ids < len(palette))
    out[valid] = palette[ids[valid]]
    out[ids == ignore_index] = np.asarray(IGNORE_COLOUR, dtype=np.uint8)
    return out
