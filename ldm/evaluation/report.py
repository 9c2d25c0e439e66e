"""Comparison report for several sample sets (e.g. anatomical model vs baseline): table, Markdown, JSON, figure."""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ldm.data.labels import colourise, get_label_set

logger = logging.getLogger(__name__)

# Direction of each metric family, shown in the table so readers need not guess.
_LOWER_BETTER = ("fid_", "kid_", "histogram_w1", "area_w1")
_HIGHER_BETTER = ("rule_", "dice_", "presence_")


def _direction(metric: str) -> str:
    name = metric.split("/")[-1]
    if name.endswith("_std"):
        return ""
    if name.startswith("ms_ssim"):
        return "match real" if name == "ms_ssim" else ""
    if any(tag in name for tag in _LOWER_BETTER):
        return "lower"
    if any(tag in name for tag in _HIGHER_BETTER):
        return "higher" if "presence_" not in name else "match real"
    return ""


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)


def _rows(results: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    runs = list(results)
    metrics: list[str] = []
    for run in runs:
        for key in results[run]:
            if key not in metrics:
                metrics.append(key)
    return runs, metrics


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Plain-text table: one row per metric, one column per run (``-`` where a run lacks the metric)."""
    runs, metrics = _rows(results)
    header = ["metric", "better", *runs]
    body = [[m, _direction(m), *[_fmt(results[r].get(m)) for r in runs]] for m in metrics]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """The same table in Markdown."""
    runs, metrics = _rows(results)
    lines = ["| metric | better | " + " | ".join(runs) + " |", "|---|---|" + "---|" * len(runs)]
    for m in metrics:
        lines.append(f"| {m} | {_direction(m)} | " + " | ".join(_fmt(results[r].get(m)) for r in runs) + " |")
    return "\n".join(lines)


def jsonable(value: Any) -> Any:
    """A JSON-serialisable copy of ``value``: mappings, sequences and arrays as dicts and lists, numpy scalars as
    Python ones, and non-finite floats (NaN, inf) as ``None``, so the output is strict JSON."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


def image_grid(images: np.ndarray, ncols: int = 4, pad: int = 1, fill: float = 0.0) -> np.ndarray:
    """Tile ``[N, H, W]`` (or ``[N, H, W, 3]``) images into one array, ``pad`` pixels of ``fill`` between."""
    imgs = np.asarray(images)
    if imgs.ndim not in (3, 4) or imgs.shape[0] == 0:
        raise ValueError(f"expected [N, H, W] or [N, H, W, 3] images, got {imgs.shape}")
    n, h, w = imgs.shape[:3]
    ncols = max(1, min(ncols, n))
    nrows = int(math.ceil(n / ncols))
    grid = np.full((nrows * (h + pad) - pad, ncols * (w + pad) - pad, *imgs.shape[3:]), fill, dtype=imgs.dtype)
    for i in range(n):
        r, c = divmod(i, ncols)
        grid[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = imgs[i]
    return grid


@dataclass
class SetPanel:
    """One sample set (or the real data) as the comparison figure shows it.

    Args:
        images: ``[N, H, W]`` grey images in ``[-1, 1]``.
        masks: ``[N, H, W]`` integer masks of those images (``None``: images only).
        mask_source: what the masks are (``"true masks"``, ``"predicted masks"``, ``"segmenter masks"``).
        pass_rate: the rule pass rate of ``masks`` over the whole set (``None``: not measured).
    """

    images: np.ndarray
    masks: Optional[np.ndarray] = None
    mask_source: str = ""
    pass_rate: Optional[float] = None


def overlay_masks(images: np.ndarray, masks: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``[N, H, W]`` images in ``[-1, 1]`` with ``[N, h, w]`` masks blended in their class colours -> ``[N, H, W, 3]``
    in ``[0, 1]``; background (class 0) stays grey, masks of another size are resized (nearest)."""
    grey = np.clip((np.asarray(images, dtype=np.float64) + 1.0) / 2.0, 0.0, 1.0)[..., None].repeat(3, -1)
    ids = np.asarray(masks)
    if ids.shape[1:] != grey.shape[1:3]:
        rows = (np.arange(grey.shape[1]) * ids.shape[1]) // grey.shape[1]
        cols = (np.arange(grey.shape[2]) * ids.shape[2]) // grey.shape[2]
        ids = ids[:, rows][:, :, cols]
    colours = colourise(ids, palette).astype(np.float64) / 255.0
    fg = (ids != 0)[..., None]
    return np.where(fg, (1 - alpha) * grey + alpha * colours, grey)


def _shared_bins(values: Sequence[np.ndarray], nbins: int = 12) -> np.ndarray:
    present = np.concatenate([v[v > 0] for v in values]) if values else np.zeros(0)
    upper = float(present.max()) if present.size else 1e-3
    return np.linspace(0.0, upper * 1.02, nbins + 1)


def _figure_classes(panels: Mapping[str, SetPanel], area_fractions: Optional[Mapping[str, np.ndarray]],
                    class_names: Optional[Sequence[str]], palette: Optional[np.ndarray]
                    ) -> tuple[int, list[str], np.ndarray]:
    """The comparison figure's classes: their number (the most any input shows), names (``class<c>`` where none
    is given) and uint8 palette (the CT-Organ one by default, white for classes beyond the palette)."""
    n_cls = max((a.shape[1] for a in (area_fractions or {}).values()), default=0)
    n_cls = max(n_cls, *(int(p.masks.max()) + 1 for p in panels.values() if p.masks is not None and p.masks.size),
                len(class_names or []), 1)
    names = list(class_names) if class_names else [f"class{c}" for c in range(n_cls)]
    names += [f"class{c}" for c in range(len(names), n_cls)]
    pal = np.asarray(palette if palette is not None else get_label_set("ctorgan").palette(n_cls), dtype=np.uint8)
    if len(pal) < n_cls:
        pal = np.concatenate([pal, np.full((n_cls - len(pal), 3), 255, dtype=np.uint8)])
    return n_cls, names, pal


def _draw_strip(ax: Any, label: str, mosaic: np.ndarray, colour: bool) -> None:
    """One strip of the comparison figure: the tiled images (grey in [-1, 1], or RGB) with their label on the left."""
    if colour:
        ax.imshow(mosaic, interpolation="nearest")
    else:
        ax.imshow(mosaic, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    for spine in ax.spines.values():
        spine.set_visible(False)


def _draw_area_histogram(ax: Any, columns: Mapping[str, np.ndarray], title: str, first: bool) -> None:
    """One class's area distribution per set (``columns``: set name -> ``[N]`` area fractions) on shared bins, as
    the share of the images where the class is present; the absent share goes into the legend."""
    bins = _shared_bins(list(columns.values()))
    for set_name, values in columns.items():
        present = values[values > 0]
        absent = 1.0 - present.size / max(values.size, 1)
        weights = np.full(present.size, 1.0 / max(present.size, 1))
        ax.hist(present, bins=bins, weights=weights, histtype="step", linewidth=1.6,
                label=f"{set_name} (absent {100 * absent:.0f} %)")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("area (fraction of image)", fontsize=8)
    if first:
        ax.set_ylabel("share of images\nwith the class", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.28), frameon=False)


def comparison_figure(path: str, panels: Mapping[str, SetPanel],
                      area_fractions: Optional[Mapping[str, np.ndarray]] = None,
                      class_names: Optional[Sequence[str]] = None, palette: Optional[np.ndarray] = None,
                      area_source: str = "", ncols: int = 8) -> str:
    """PNG figure: per set a strip of images and, below it, the same images with their masks in colour (legend from
    the class names and palette), then one panel per foreground class with the distribution of its area.

    ``panels`` maps a set name to a :class:`SetPanel` (the first ``ncols`` images are shown); ``area_fractions`` maps
    a set name to ``[N, C]`` class-area fractions (``anatomy.class_area_fractions``). The distributions share their
    bins across sets and show the fraction of images per bin among the images where the class is present; the
    share where it is absent is in the legend. The title carries each set's rule pass rate.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not panels:
        raise ValueError("comparison_figure needs at least one set of images")
    n_cls, names, pal = _figure_classes(panels, area_fractions, class_names, palette)
    ncols = max(1, min(ncols, max(len(p.images) for p in panels.values())))

    strips: list[tuple[str, np.ndarray, bool]] = []  # (label, tiles [n, H, W(, 3)], is_colour)
    for name, panel in panels.items():
        imgs = np.asarray(panel.images)[:ncols]
        rate = "" if panel.pass_rate is None else f"\nrules pass {100 * panel.pass_rate:.0f} %"
        strips.append((f"{name}{rate}", imgs, False))
        if panel.masks is not None:
            strips.append((f"{name}\n{panel.mask_source}", overlay_masks(imgs, np.asarray(panel.masks)[:ncols], pal),
                           True))
    hist_classes = list(range(1, n_cls)) if area_fractions else []
    label_w = 1.7  # inches left of the strips for their labels
    width = max(ncols * 1.25, 2.5 * len(hist_classes)) + label_w
    tile_h = (width - label_w) / ncols + 0.1
    heights = [tile_h] * len(strips) + ([2.0] if hist_classes else [])
    head = 0.9  # inches above the strips: title and class legend
    total = sum(heights) + head + 0.2 * len(heights) + (0.2 + 0.16 * len(panels) if hist_classes else 0.1)
    fig = plt.figure(figsize=(width, total))
    grid = fig.add_gridspec(len(heights), 1, height_ratios=heights, hspace=0.12, top=1 - head / total,
                            bottom=(0.2 + 0.16 * len(panels) if hist_classes else 0.1) / total,
                            left=label_w / width, right=0.99)
    for r, (label, tiles, colour) in enumerate(strips):
        _draw_strip(fig.add_subplot(grid[r]), label, image_grid(tiles, ncols=ncols, pad=1, fill=1.0), colour)
    if hist_classes:
        sub = grid[len(strips)].subgridspec(1, len(hist_classes), wspace=0.3)
        for j, c in enumerate(hist_classes):
            columns = {n: a[:, c] for n, a in area_fractions.items() if a.shape[1] > c}
            _draw_area_histogram(fig.add_subplot(sub[j]), columns, names[c], first=j == 0)
    legend = [Patch(color=tuple(pal[c] / 255.0), label=names[c]) for c in range(1, n_cls)]
    if legend and any(p.masks is not None for p in panels.values()):
        fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=8, frameon=False,
                   bbox_to_anchor=(0.5, 1 - head / total))
    rates = [f"{n} {100 * p.pass_rate:.0f} %" + (f" ({p.mask_source})" if p.mask_source else "")
             for n, p in panels.items() if p.pass_rate is not None]
    title = "rule pass rate: " + ", ".join(rates) if rates else "samples beside real slices"
    if area_source and hist_classes:
        title += f"\nclass areas from {area_source}"
    fig.suptitle(title, fontsize=10, y=1 - 0.05 / total, va="top")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(out_dir: str, results: Mapping[str, Mapping[str, Any]], meta: Optional[Mapping[str, Any]] = None,
                 panels: Optional[Mapping[str, SetPanel]] = None,
                 area_fractions: Optional[Mapping[str, np.ndarray]] = None,
                 class_names: Optional[Sequence[str]] = None, palette: Optional[np.ndarray] = None,
                 area_source: str = "") -> dict[str, str]:
    """Write ``report.md``, ``report.json`` and (with ``panels``) ``comparison.png`` into ``out_dir``.

    Returns the written paths by kind (``markdown``, ``json``, ``figure``).
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = {"markdown": os.path.join(out_dir, "report.md"), "json": os.path.join(out_dir, "report.json")}
    with open(paths["json"], "w") as f:
        json.dump(jsonable({"results": results, "meta": meta or {}}), f, indent=2)
    lines = ["# Sample comparison", "", markdown_table(results), ""]
    if meta:
        settings = [f"- {k}: {json.dumps(jsonable(v)) if isinstance(v, (dict, list)) else _fmt(v)}"
                    for k, v in meta.items()]
        lines += ["## Settings", "", *settings, ""]
    if panels:
        paths["figure"] = comparison_figure(os.path.join(out_dir, "comparison.png"), panels, area_fractions,
                                            class_names, palette, area_source)
        lines += ["![comparison](comparison.png)", ""]
    with open(paths["markdown"], "w") as f:
        f.write("\n".join(lines))
    logger.info("Wrote report to %s", out_dir)
    return paths
