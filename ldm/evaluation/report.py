"""Comparison report for several sample sets (e.g. anatomical model vs baseline): table, Markdown, JSON, figure."""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

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


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
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


def comparison_figure(path: str, grids: Mapping[str, np.ndarray],
                      area_fractions: Optional[Mapping[str, np.ndarray]] = None,
                      class_names: Optional[Sequence[str]] = None, ncols: int = 4) -> str:
    """PNG figure: sample grids side by side (top row) and per-class area histograms (bottom row).

    ``grids`` maps a set name to ``[N, H, W]`` images in ``[-1, 1]``; ``area_fractions`` maps a set name to
    ``[N, C]`` class-area fractions (``anatomy.class_area_fractions``); class 0 (background) is not plotted.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_top = max(1, len(grids))
    n_cls = 0
    if area_fractions:
        n_cls = max(a.shape[1] for a in area_fractions.values()) - 1
    ncols_fig = max(n_top, n_cls, 1)
    nrows_fig = 2 if n_cls > 0 else 1
    fig, axes = plt.subplots(nrows_fig, ncols_fig, figsize=(3.2 * ncols_fig, 3.2 * nrows_fig), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, (name, images) in enumerate(grids.items()):
        ax = axes[0, i]
        ax.imshow(image_grid(np.asarray(images), ncols=ncols, fill=1.0), cmap="gray", vmin=-1, vmax=1)
        ax.set_title(name)
    if n_cls > 0 and area_fractions:
        names = list(class_names) if class_names else [f"class{c}" for c in range(n_cls + 1)]
        for c in range(1, n_cls + 1):
            ax = axes[1, c - 1]
            ax.axis("on")
            upper = max(float(a[:, c].max()) for a in area_fractions.values() if a.shape[1] > c) or 1e-3
            bins = np.linspace(0.0, upper * 1.05, 21)
            for name, fr in area_fractions.items():
                if fr.shape[1] > c:
                    ax.hist(fr[:, c], bins=bins, histtype="step", density=True, label=name, linewidth=1.5)
            ax.set_title(f"area of {names[c] if c < len(names) else c}")
            ax.set_xlabel("fraction of image")
            if c == 1:
                ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(out_dir: str, results: Mapping[str, Mapping[str, Any]], meta: Optional[Mapping[str, Any]] = None,
                 grids: Optional[Mapping[str, np.ndarray]] = None,
                 area_fractions: Optional[Mapping[str, np.ndarray]] = None,
                 class_names: Optional[Sequence[str]] = None) -> dict[str, str]:
    """Write ``report.md``, ``report.json`` and (with ``grids``) ``comparison.png`` into ``out_dir``.

    Returns the written paths by kind (``markdown``, ``json``, ``figure``).
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = {"markdown": os.path.join(out_dir, "report.md"), "json": os.path.join(out_dir, "report.json")}
    with open(paths["json"], "w") as f:
        json.dump(_jsonable({"results": results, "meta": meta or {}}), f, indent=2)
    lines = ["# Sample comparison", "", markdown_table(results), ""]
    if meta:
        settings = [f"- {k}: {json.dumps(_jsonable(v)) if isinstance(v, (dict, list)) else _fmt(v)}"
                    for k, v in meta.items()]
        lines += ["## Settings", "", *settings, ""]
    if grids:
        paths["figure"] = comparison_figure(os.path.join(out_dir, "comparison.png"), grids, area_fractions,
                                            class_names)
        lines += ["![comparison](comparison.png)", ""]
    with open(paths["markdown"], "w") as f:
        f.write("\n".join(lines))
    logger.info("Wrote report to %s", out_dir)
    return paths
