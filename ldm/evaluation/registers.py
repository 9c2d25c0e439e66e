"""What the anatomical registers learned: register similarity and class-attention over a sampling trajectory.

Works on an ``AnatomicalLatentDiffusion`` (or any LDM whose UNet is an ``AnatomicalUNetModel`` with registers).
``inspect_registers`` writes ``register_similarity.png``, ``attention_maps.png``, ``attention_vs_timestep.png``
and ``registers.json``.
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import nullcontext
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ldm import sampling
from ldm.data.labels import label_set_of

logger = logging.getLogger(__name__)


def anatomical_unet(model: torch.nn.Module) -> torch.nn.Module:
    """The model's UNet, checked to carry registers."""
    unet = getattr(model, "unet", model)
    if not getattr(unet, "use_anatomical_registers", False) or not hasattr(unet, "register_bank"):
        raise ValueError(f"{type(model).__name__} has no anatomical registers (its UNet is {type(unet).__name__}); "
                         "inspect_registers needs a run trained with AnatomicalUNetModel and "
                         "use_anatomical_registers: true")
    return unet


def register_similarity(registers: torch.Tensor) -> dict[str, Any]:
    """Cosine similarity between registers ``[C, K, D]``.

    Returns the ``[C*K, C*K]`` matrix, the mean within-class similarity (pairs of different registers of one
    class), the mean across-class similarity, the per-class within means and the ``[C, C]`` similarity of class
    centroids.
    """
    if registers.ndim != 3:
        raise ValueError(f"registers must be [C, K, D], got {tuple(registers.shape)}")
    c, k, d = registers.shape
    flat = torch.nn.functional.normalize(registers.detach().float().reshape(c * k, d), dim=1)
    sim = flat @ flat.T
    cls = torch.arange(c).repeat_interleave(k)
    same = cls[:, None] == cls[None, :]
    off_diag = ~torch.eye(c * k, dtype=torch.bool)
    within = sim[same & off_diag]
    across = sim[~same]
    per_class = [float(sim[cls == i][:, cls == i][~torch.eye(k, dtype=torch.bool)].mean()) if k > 1 else float("nan")
                 for i in range(c)]
    centroids = torch.nn.functional.normalize(flat.reshape(c, k, d).mean(1), dim=1)
    return {"matrix": sim.numpy(), "within_class_mean": float(within.mean()) if within.numel() else float("nan"),
            "across_class_mean": float(across.mean()) if across.numel() else float("nan"),
            "within_class_per_class": per_class, "centroid_similarity": (centroids @ centroids.T).numpy()}


@torch.no_grad()
def attention_trajectory(model: torch.nn.Module, num_samples: int = 4, ddim_steps: int = 20, eta: float = 0.0,
                         seed: int = 0) -> dict[str, Any]:
    """Sample with DDIM and, before every step, read each register-attention level's class-attention mass.

    Returns ``timesteps`` [S], ``levels`` (block keys and their downsampling factors), ``maps`` [S, L, N, C, h, w]
    (each level resized to the latent size), ``mean_mass`` [S, L, C] (mean over samples and pixels),
    ``accuracy`` [S, L] (fraction of latent pixels whose arg-max class attention equals the final predicted mask),
    ``own_class_mass`` [S, C] (mean attention mass of class c on pixels the final mask labels c, levels averaged),
    ``token_similarity`` [S, 2] (within/across-class cosine of the register tokens the UNet used at each step,
    which move with t for a timestep-aware bank), plus the decoded ``images`` [N, 1|3, H, W] and final ``masks``
    at latent size [N, h, w].
    """
    unet = anatomical_unet(model)
    device = next(model.parameters()).device
    shape = sampling.latent_shape(model)
    indices = list(range(num_samples))
    x_T = sampling.initial_noise(shape, seed, indices, device=device)
    timesteps: list[int] = []
    per_step: list[torch.Tensor] = []
    token_sim: list[tuple[float, float]] = []
    n_cls, n_reg = unet.register_bank.registers.shape[:2]

    def record(i: int, t: int, x_t: torch.Tensor) -> None:
        ts = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        anatomy = unet.forward_with_anatomy(x_t, ts)
        masses = [anatomy.layer_class_attention[info.key] for info in unet.anatomical_attention_blocks]
        resized = [torch.nn.functional.interpolate(m.float(), size=shape[1:], mode="bilinear", align_corners=False)
                   for m in masses]
        per_step.append(torch.stack(resized).cpu())
        timesteps.append(t)
        tokens = register_similarity(anatomy.registers[0].reshape(n_cls, n_reg, -1).cpu())  # tokens as used at this t
        token_sim.append((tokens["within_class_mean"], tokens["across_class_mean"]))

    z = sampling.ddim_trajectory(model, x_T, ddim_steps, eta, sampling.SampleNoise(seed, indices), callback=record)
    final = (model.predict_anatomy(z) if hasattr(model, "predict_anatomy")
             else unet.forward_with_anatomy(z, torch.zeros(z.shape[0], dtype=torch.long, device=device)))
    masks = final.seg_logits.float().argmax(1).cpu()
    images = model.decode_first_stage(z).float().cpu()
    maps = torch.stack(per_step)  # [S, L, N, C, h, w]
    num_classes = maps.shape[3]
    accuracy = (maps.argmax(3) == masks[None, None]).float().mean(dim=(2, 3, 4))
    mean_maps = maps.mean(1)  # [S, N, C, h, w]
    own = torch.full((maps.shape[0], num_classes), float("nan"))
    for c in range(num_classes):
        sel = masks == c
        if sel.any():
            own[:, c] = mean_maps[:, :, c][:, sel].mean(1)
    levels = [{"key": info.key, "ds": info.ds} for info in unet.anatomical_attention_blocks]
    return {"timesteps": timesteps, "levels": levels,
            "maps": maps.numpy(), "mean_mass": maps.mean(dim=(2, 4, 5)).numpy(), "accuracy": accuracy.numpy(),
            "own_class_mass": own.numpy(), "token_similarity": np.asarray(token_sim),
            "images": images.numpy(), "masks": masks.numpy()}


def _mix(probs: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """``[C, h, w]`` class probabilities -> ``[h, w, 3]`` RGB in [0, 1] mixing the class colours."""
    pal = colours[np.arange(probs.shape[0]) % len(colours)] / 255.0
    return np.clip(np.einsum("chw,cd->hwd", probs, pal), 0, 1)


def _figures(out_dir: str, sim: dict[str, Any], traj: dict[str, Any], class_names: Sequence[str],
             colours: np.ndarray, k: int, max_columns: int = 6) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    # register similarity
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(sim["matrix"], cmap="coolwarm", vmin=-1, vmax=1)
    n_cls = sim["matrix"].shape[0] // k
    for b in range(1, n_cls):
        ax.axhline(b * k - 0.5, color="k", lw=0.8)
        ax.axvline(b * k - 0.5, color="k", lw=0.8)
    ticks = [c * k + (k - 1) / 2 for c in range(n_cls)]
    ax.set_xticks(ticks, class_names[:n_cls], rotation=45, ha="right")
    ax.set_yticks(ticks, class_names[:n_cls])
    ax.set_title(f"register cosine similarity\nwithin {sim['within_class_mean']:.2f}, "
                 f"across {sim['across_class_mean']:.2f}")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    paths["similarity"] = os.path.join(out_dir, "register_similarity.png")
    fig.savefig(paths["similarity"], dpi=100)
    plt.close(fig)

    # attention maps of sample 0: rows = levels + mean, columns = chosen steps + final image/mask
    maps = traj["maps"]
    steps = np.unique(np.linspace(0, maps.shape[0] - 1, min(max_columns, maps.shape[0])).round().astype(int))
    rows = [(f"{lv['key']} (ds {lv['ds']})", maps[:, li, 0]) for li, lv in enumerate(traj["levels"])]
    rows.append(("mean over levels", maps[:, :, 0].mean(1)))
    fig, axes = plt.subplots(len(rows), len(steps) + 1, figsize=(2.0 * (len(steps) + 1), 2.0 * len(rows)),
                             squeeze=False)
    for r, (name, series) in enumerate(rows):
        for j, s in enumerate(steps):
            axes[r, j].imshow(_mix(series[s], colours))
            if r == 0:
                axes[r, j].set_title(f"t={traj['timesteps'][s]}", fontsize=9)
        axes[r, 0].set_ylabel(name, fontsize=8)
        last = axes[r, -1]
        if r == 0:
            img = traj["images"][0]
            last.imshow(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), cmap="gray", vmin=-1, vmax=1)
            last.set_title("sample", fontsize=9)
        elif r == 1:
            last.imshow(colours.astype(np.uint8)[traj["masks"][0] % len(colours)])
            last.set_title("final mask", fontsize=9)
        else:
            last.set_axis_off()
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    paths["maps"] = os.path.join(out_dir, "attention_maps.png")
    fig.savefig(paths["maps"], dpi=100)
    plt.close(fig)

    # attention vs timestep
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4))
    t = np.asarray(traj["timesteps"])
    own = traj["own_class_mass"]
    for c in range(own.shape[1]):
        if np.isfinite(own[:, c]).any():
            ax1.plot(t, own[:, c], label=class_names[c] if c < len(class_names) else str(c),
                     color=colours[c % len(colours)] / 255.0 if c else (0.5, 0.5, 0.5))
    ax1.axhline(1.0 / own.shape[1], ls="--", color="k", lw=0.8, label="uniform")
    ax1.set_xlabel("timestep t")
    ax1.set_ylabel("attention mass on own class")
    ax1.invert_xaxis()
    ax1.legend(fontsize="small")
    for li, lv in enumerate(traj["levels"]):
        ax2.plot(t, traj["accuracy"][:, li], label=f"{lv['key']} (ds {lv['ds']})")
    ax2.set_xlabel("timestep t")
    ax2.set_ylabel("argmax attention == final mask")
    ax2.invert_xaxis()
    ax2.legend(fontsize="small")
    ax3.plot(t, traj["token_similarity"][:, 0], label="within class")
    ax3.plot(t, traj["token_similarity"][:, 1], label="across classes")
    ax3.set_xlabel("timestep t")
    ax3.set_ylabel("cosine similarity of register tokens")
    ax3.invert_xaxis()
    ax3.legend(fontsize="small")
    fig.tight_layout()
    paths["timestep"] = os.path.join(out_dir, "attention_vs_timestep.png")
    fig.savefig(paths["timestep"], dpi=100)
    plt.close(fig)
    return paths


def inspect_registers(model: torch.nn.Module, out_dir: str, num_samples: int = 4, ddim_steps: int = 20,
                      eta: float = 0.0, seed: int = 0, class_names: Optional[Sequence[str]] = None,
                      colours: Optional[Sequence[Sequence[int]]] = None, use_ema: bool = True) -> dict[str, Any]:
    """Write the register figures and ``registers.json``; returns the JSON summary (with ``files``)."""
    unet = anatomical_unet(model)
    os.makedirs(out_dir, exist_ok=True)
    scope = model.ema_scope("inspect_registers") if use_ema and getattr(model, "use_ema", False) else nullcontext()
    with scope, torch.no_grad():
        bank = unet.register_bank
        sim = register_similarity(bank.registers)
        traj = attention_trajectory(model, num_samples, ddim_steps, eta, seed)
    c, k = bank.registers.shape[:2]
    label_set = label_set_of(model, int(c))
    names = list(class_names) if class_names else list(label_set.classes)
    pal = np.asarray(colours if colours is not None else label_set.palette(int(c)), dtype=np.float64)
    files = _figures(out_dir, sim, traj, names, pal, k)
    final_acc = traj["accuracy"][-1]
    summary = {
        "num_classes": int(c), "registers_per_class": int(k), "register_dim": int(bank.registers.shape[2]),
        "timestep_aware": type(bank).__name__ != "AnatomicalRegisterBank", "class_names": names,
        "similarity": {"within_class_mean": sim["within_class_mean"], "across_class_mean": sim["across_class_mean"],
                       "within_class_per_class": sim["within_class_per_class"],
                       "centroid_similarity": sim["centroid_similarity"].tolist()},
        "trajectory": {"num_samples": num_samples, "ddim_steps": ddim_steps, "eta": eta, "seed": seed,
                       "ema": bool(use_ema and getattr(model, "use_ema", False)),
                       "timesteps": traj["timesteps"], "levels": traj["levels"],
                       "mean_mass_per_level": traj["mean_mass"].tolist(),
                       "accuracy_per_level": traj["accuracy"].tolist(),
                       "own_class_mass": [[None if v != v else float(v) for v in row]
                                          for row in traj["own_class_mass"]],
                       "final_accuracy_per_level": {lv["key"]: float(a) for lv, a in zip(traj["levels"], final_acc)},
                       "token_similarity_within": traj["token_similarity"][:, 0].tolist(),
                       "token_similarity_across": traj["token_similarity"][:, 1].tolist()},
        "files": {k2: os.path.basename(v) for k2, v in files.items()},
    }
    with open(os.path.join(out_dir, "registers.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logger.info("Wrote register inspection to %s", out_dir)
    return summary
