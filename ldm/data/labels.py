"""The label sets: class names, ids, preview colours and mask rule checkers, in one registry.

A label set is looked up by name (``get_label_set("ctorgan")``), e.g. from an
``AnatomicalLatentDiffusion`` config's ``label_set`` parameter; nothing guesses it from a class count.
``colourise`` is the one mask colouriser (previews, saved mask PNGs, figures): class ids take the
palette's colours, the ignore index is grey and any other id outside the palette magenta.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ldm.util import get_obj_from_str

RGB = tuple[int, int, int]

# CT-Organ (CT-ORG, Rister et al. 2020) as used here: brain (6 in the label volumes) is mapped away by default.
CTORGAN_CLASSES: tuple[str, ...] = ("background", "liver", "bladder", "lungs", "kidneys", "bone")
CTORGAN_COLOURS: tuple[RGB, ...] = (
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
BREASTMRI_COLOURS: tuple[RGB, ...] = (
    (0, 0, 0),
    (200, 170, 150),
    (240, 120, 200),
    (220, 50, 60),
)

# Phantom v2 (``ldm.data.phantom_v2``, the anatomy benchmark v2): both kidneys share one label, the bones are split.
PHANTOM_V2_CLASSES: tuple[str, ...] = ("background", "liver", "spleen", "kidney", "bladder", "lungs", "aorta",
                                       "vertebra", "ribs", "pelvis")
PHANTOM_V2_COLOURS: tuple[RGB, ...] = (
    (0, 0, 0),  # background
    (220, 120, 60),  # liver: brown-orange
    (150, 60, 200),  # spleen: purple
    (220, 50, 60),  # kidney: red
    (240, 220, 60),  # bladder: yellow
    (80, 160, 240),  # lungs: blue
    (255, 80, 160),  # aorta: pink
    (235, 235, 235),  # vertebra: near white
    (170, 200, 150),  # ribs (with costal cartilage and sternum): pale green
    (200, 180, 120),  # pelvis (pelvic bone): sand
)

# Colours for class ids past a label set's own (a model with more classes than its label set names), cycled.
EXTRA_COLOURS: tuple[RGB, ...] = ((26, 217, 217), (217, 51, 217), (255, 140, 26), (140, 89, 38), (26, 191, 51))

DEFAULT_IGNORE_INDEX = 255
IGNORE_COLOUR: RGB = (128, 128, 128)
INVALID_COLOUR: RGB = (255, 0, 255)

# Mask rule checkers by name (dotted paths, imported on use): ``get_rule_checker`` and ``LabelSet.rule_checker``.
RULE_CHECKERS: dict[str, str] = {"phantom": "ldm.data.anatomy_check.check_phantom_anatomy",
                                 "phantom2": "ldm.data.anatomy_check_v2.check_anatomy_v2"}


@dataclass(frozen=True)
class LabelSet:
    """One data set's labels: class names (the id is the position), preview colours and rule checker.

    Args:
        name: registry name (``label_set`` in configs, ``--label_set`` on command lines).
        classes: class names, background first; class ``i`` has id ``i``.
        colours: one RGB (0..255) colour per class.
        rule_checker: name in ``RULE_CHECKERS`` (or a dotted path) of the mask rule checker that applies to
            these labels, or ``None`` when there is none.
        description: one line for listings and error messages.
    """

    name: str
    classes: tuple[str, ...]
    colours: tuple[RGB, ...]
    rule_checker: Optional[str] = None
    description: str = ""

    def __post_init__(self) -> None:
        if len(self.classes) != len(self.colours):
            raise ValueError(f"label set {self.name!r}: {len(self.classes)} classes but {len(self.colours)} colours")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def ids(self) -> dict[str, int]:
        """Class name -> id."""
        return {name: i for i, name in enumerate(self.classes)}

    def palette(self, num_classes: Optional[int] = None) -> np.ndarray:
        """``[max(num_classes, C), 3]`` uint8 colours: the set's own, then ``EXTRA_COLOURS`` cycled."""
        n = max(int(num_classes or 0), self.num_classes)
        extra = [EXTRA_COLOURS[i % len(EXTRA_COLOURS)] for i in range(n - self.num_classes)]
        return np.asarray(list(self.colours) + extra, dtype=np.uint8).reshape(n, 3)

    def load_rule_checker(self) -> Optional[Callable[[np.ndarray], Any]]:
        """The rule checker function for these labels, or ``None``."""
        return get_rule_checker(self.rule_checker)

    def check_num_classes(self, num_classes: int, what: str) -> None:
        """Raise ``ValueError`` unless ``num_classes`` (of ``what``) equals this set's class count."""
        if int(num_classes) != self.num_classes:
            raise ValueError(f"{what} has {num_classes} classes but label_set {self.name!r} has {self.num_classes} "
                             f"({', '.join(self.classes)}); choose the label set of the data "
                             f"({', '.join(LABEL_SETS)}) or fix the class count")


CTORGAN = LabelSet("ctorgan", CTORGAN_CLASSES, CTORGAN_COLOURS, rule_checker="phantom",
                   description="CT-Organ abdominal CT (and the phantom): background, liver, bladder, lungs, kidneys, "
                               "bone")
BREASTMRI = LabelSet("breastmri", BREASTMRI_CLASSES, BREASTMRI_COLOURS,
                     description="Duke breast MRI: background, breast, fibroglandular tissue, vessels")
PHANTOM2 = LabelSet("phantom2", PHANTOM_V2_CLASSES, PHANTOM_V2_COLOURS, rule_checker="phantom2",
                    description="phantom v2 abdominal CT: background, liver, spleen, kidney, bladder, lungs, aorta, "
                                "vertebra, ribs, pelvis")
LABEL_SETS: dict[str, LabelSet] = {s.name: s for s in (CTORGAN, BREASTMRI, PHANTOM2)}


def get_label_set(name: str) -> LabelSet:
    """The registered label set ``name`` (case and ``-``/``_`` ignored: ``CT-Organ`` finds ``ctorgan``)."""
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    if key not in LABEL_SETS:
        raise ValueError(f"unknown label set {name!r}; valid names: {', '.join(LABEL_SETS)} "
                         f"(set label_set in the config or --label_set on the command line)")
    return LABEL_SETS[key]


def generic_label_set(num_classes: int) -> LabelSet:
    """Unnamed classes ``class0..`` with CT-Organ's colours then the extras: for a model without a label set."""
    n = int(num_classes)
    if n < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    extra = [EXTRA_COLOURS[i % len(EXTRA_COLOURS)] for i in range(n - len(CTORGAN_COLOURS))]
    return LabelSet("generic", tuple(f"class{i}" for i in range(n)), (CTORGAN_COLOURS + tuple(extra))[:n])


def label_set_of(model: Any, num_classes: Optional[int] = None) -> LabelSet:
    """A model's ``label_set`` attribute, else a generic set of its (or the given) class count."""
    found = getattr(model, "label_set", None)
    if isinstance(found, LabelSet):
        return found
    n = num_classes or getattr(model, "num_anatomical_classes", None) or CTORGAN.num_classes
    return generic_label_set(int(n))


def get_rule_checker(name: Optional[str]) -> Optional[Callable[[np.ndarray], Any]]:
    """A mask rule checker: a ``RULE_CHECKERS`` name (``phantom``) or a dotted import path; ``None``/``none``:
    no checker."""
    if not name or name == "none":
        return None
    return get_obj_from_str(RULE_CHECKERS.get(name, name))


def colourise(mask: Any, colours: Sequence[Sequence[int]] | np.ndarray | LabelSet = CTORGAN_COLOURS,
              ignore_index: int = DEFAULT_IGNORE_INDEX) -> np.ndarray:
    """Map integer class ids (numpy array or torch tensor, any shape ``...``) to ``... x 3`` uint8 RGB.

    ``colours``: a palette or a :class:`LabelSet`. ``ignore_index`` pixels are grey, ids outside the palette
    magenta, so a wrong label is visible. A channel dimension of size 1 (``B,1,H,W`` or ``H,W,1``) is not
    removed: pass the squeezed mask.
    """
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    ids = np.asarray(mask)
    if ids.dtype.kind == "f":
        if not np.all(np.isfinite(ids)) or not np.all(ids == np.round(ids)):
            raise ValueError("colourise expects integer class ids; got non-integer float values "
                             "(take argmax over the class channel first)")
    ids = ids.astype(np.int64)
    palette = colours.palette() if isinstance(colours, LabelSet) else np.asarray(colours, dtype=np.uint8)
    out = np.empty(ids.shape + (3,), dtype=np.uint8)
    out[...] = np.asarray(INVALID_COLOUR, dtype=np.uint8)
    valid = (ids >= 0) & (ids < len(palette))
    out[valid] = palette[ids[valid]]
    out[ids == ignore_index] = np.asarray(IGNORE_COLOUR, dtype=np.uint8)
    return out
