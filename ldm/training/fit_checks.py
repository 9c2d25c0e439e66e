"""Checks ``main.py`` runs on the built model and data before training starts: things that would otherwise train
without a word and give a wrong model.

- :func:`check_data_size`: a latent diffusion model's data must have the size its latents are made for: image side /
  first-stage downsampling factor == ``model.params.image_size`` (``size: 64`` for ``image_size: 8`` latents of an
  f4 first stage gives 16 px latents: the UNet trains on them, and samples come out at another size than trained).
- :func:`check_mask_source`: an anatomical (or joint) model learns from masks; a training set that loads none
  (``segmentation_root`` unset, no ``masks/`` folder, ``load_segmentations: false``, examples without a mask key)
  would train the segmentation head on nothing. Some unlabelled examples are fine (``has_segmentation`` False).
- :func:`expect_model_labels`: datasets without ``n_labels`` learn the model's class count and label set, so a
  mask value outside it fails while the data is read, naming the file, the value and the label set (instead of
  inside the model, naming no file).

Each raises ``ValueError`` with one line; ``main.py`` reports it as ``main.py: error: ...`` (exit 2).
"""
from __future__ import annotations

import logging
from typing import Any, Iterator, Mapping, Optional

logger = logging.getLogger(__name__)


def _unwrap(dataset: Any) -> Any:
    """The dataset inside ``WrappedDataset`` / ``torch.utils.data.Subset`` layers."""
    for _ in range(8):
        inner = getattr(dataset, "data", None) if type(dataset).__name__ == "WrappedDataset" else \
            getattr(dataset, "dataset", None) if type(dataset).__name__ == "Subset" else None
        if inner is None:
            return dataset
        dataset = inner
    return dataset


def datasets_of(data: Any) -> Iterator[tuple[str, Any]]:
    """``(split, dataset)`` of a built ``DataModuleFromConfig`` (nothing for other data modules)."""
    for split, dataset in (getattr(data, "datasets", None) or {}).items():
        yield split, _unwrap(dataset)


def _first_example(dataset: Any) -> Optional[Mapping[str, Any]]:
    """Example 0 of a map-style dataset, or None when there is none or it cannot be read here (training reads it
    again and reports its error there)."""
    try:
        if len(dataset) == 0:
            return None
        example = dataset[0]
    except Exception:  # noqa: BLE001 - any dataset error is reported by training itself
        return None
    return example if isinstance(example, Mapping) else None


def _side(value: Any) -> Optional[tuple[int, int]]:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return (int(value), int(value))
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    return None


def first_stage_factor(model: Any) -> Optional[int]:
    """Image side / latent side of a latent diffusion model's first stage (``2 ** (len(ch_mult) - 1)``), None when
    the model has no such first stage."""
    first = getattr(model, "first_stage_model", None)
    levels = getattr(getattr(first, "encoder", None), "num_resolutions", None)
    return None if not isinstance(levels, int) else 2 ** (levels - 1)


def data_size(dataset: Any, key: str) -> Optional[tuple[int, int]]:
    """``(height, width)`` of the images a dataset gives: its ``size`` parameter, else example 0's ``key`` array."""
    size = _side(getattr(dataset, "size", None))
    if size is not None:
        return size
    example = _first_example(dataset)
    shape = getattr(example.get(key), "shape", None) if example is not None else None
    return (int(shape[0]), int(shape[1])) if shape is not None and len(shape) >= 2 else None


def check_data_size(model: Any, data: Any) -> None:
    """Raise ``ValueError`` when a split's image size / the first stage's downsampling factor is not the latent size
    the model is built for (``model.params.image_size``), naming both."""
    factor = first_stage_factor(model)
    latent = _side(getattr(model, "image_size", None))
    if factor is None or latent is None:
        return
    unet = _side(getattr(getattr(getattr(model, "model", None), "diffusion_model", None), "image_size", None))
    key = str(getattr(model, "first_stage_key", "image"))
    for split, dataset in datasets_of(data):
        if split == "predict":
            continue
        size = data_size(dataset, key)
        if size is None or (size[0] % factor == 0 and size[1] % factor == 0
                            and (size[0] // factor, size[1] // factor) == latent):
            continue
        shown = size[0] if size[0] == size[1] else list(size)
        got = [s / factor for s in size]
        got_text = f"{got[0]:g}" if got[0] == got[1] else f"{got[0]:g} x {got[1]:g}"
        want = latent[0] if latent[0] == latent[1] else list(latent)
        unet_note = f", unet_config image_size: {unet[0] if unet[0] == unet[1] else list(unet)}" if unet else ""
        raise ValueError(
            f"the {split} data ({type(dataset).__name__}) gives {shown} px images, which the first stage "
            f"(downsampling factor {factor}) turns into {got_text} px latents, but the model is built for {want} px "
            f"latents (model.params.image_size: {want}{unet_note}): it would train on latents of another size than "
            f"it samples. Set the data's size to {latent[0] * factor} or model.params.image_size (and the UNet's) to "
            f"{got_text}")


def _uses_masks(model: Any) -> bool:
    return bool(getattr(model, "use_anatomy", False)) or bool(getattr(model, "is_joint", False))


def model_classes(model: Any) -> Optional[int]:
    """The number of mask classes an anatomical or joint model learns, None for other models."""
    if not _uses_masks(model):
        return None
    n = getattr(model, "num_anatomical_classes", 0) or getattr(getattr(model, "joint_mask", None), "num_classes", 0)
    return int(n) if n else None


def check_mask_source(model: Any, data: Any) -> None:
    """Raise ``ValueError`` when an anatomical or joint model's training data loads no mask at all."""
    if not _uses_masks(model):
        return
    key = str(getattr(model, "anatomical_mask_key", "segmentation"))
    kind = "joint" if getattr(model, "is_joint", False) else "anatomical"
    for split, dataset in datasets_of(data):
        if split != "train":
            continue
        name = type(dataset).__name__
        why = None
        if getattr(dataset, "load_segmentations", None) is False:
            root = getattr(dataset, "segmentation_root", None)
            why = ("load_segmentations is false" if root is not None else
                   "it has no segmentation_root (for a named data set: no <root>/train/masks folder)")
        else:
            example = _first_example(dataset)
            if example is not None and key not in example:
                why = f"its examples have no {key!r} key"
        if why is not None:
            raise ValueError(
                f"the {kind} model ({type(model).__name__}) learns from masks, but the training data ({name}) "
                f"loads none: {why}, so its segmentation head would train on nothing. Give the masks "
                "(data.params.train.params.segmentation_root, or a masks/ folder beside images/; docs/data.md), or "
                "train a model without anatomical registers")


def expect_model_labels(model: Any, data: Any) -> None:
    """Tell every dataset that takes it (``expect_labels``, e.g. ``MedicalImagesBase``) the model's class count and
    label set, so a mask value outside them is an error naming the file when it is read."""
    n = model_classes(model)
    if n is None:
        return
    label_set = getattr(model, "label_set", None)
    name = getattr(label_set, "name", None)
    classes = tuple(getattr(label_set, "classes", ()) or ())
    for _, dataset in datasets_of(data):
        expect = getattr(dataset, "expect_labels", None)
        if callable(expect):
            expect(n, name, classes)


def check_data_for_model(model: Any, data: Any, training: bool) -> None:
    """All of the above, as ``main.py`` runs them after building model and data (the mask source when training)."""
    check_data_size(model, data)
    if training:
        check_mask_source(model, data)
    expect_model_labels(model, data)
