"""What the anatomical registers learned: register similarity and class-attention over a sampling trajectory,
and whether the registers do anything (diagnostics on noised phantom latents).

Works on an ``AnatomicalLatentDiffusion`` (or any LDM whose UNet is an ``AnatomicalUNetModel`` with registers).
``inspect_registers`` writes ``register_similarity.png``, ``attention_maps.png``, ``attention_vs_timestep.png``,
``register_diagnostics.png`` and ``registers.json``. The diagnostics (:func:`register_diagnostics`) are, per
noise level: each register layer's ``||output - input|| / ||input||`` (how much it changes the features), the
eps-prediction error with the register layers' outputs zeroed (:func:`zero_register_outputs`) against the
intact model, the entropy of each layer's per-class attention, and the cosine similarity of the register
states between slices from different body heights (equal for constant tokens; sample-dependent registers
must differ).
"""
from __future__ import annotations

import json
import logging
import math
import os
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch

from ldm import sampling
from ldm.data.labels import label_set_of
from ldm.modules.anatomical_losses import soft_class_targets

logger = logging.getLogger(__name__)


def anatomical_unet(model: torch.nn.Module) -> torch.nn.Module:
    """The model's UNet, checked to carry registers."""
    unet = getattr(model, "unet", model)
    if not getattr(unet, "use_anatomical_registers", False) or not hasattr(unet, "register_bank"):
        raise ValueError(f"{type(model).__name__} has no anatomical registers (its UNet is {type(unet).__name__}); "
                         "inspect_registers needs a run trained with AnatomicalUNetModel and "
                         "use_anatomical_registers: true")
    return unet


def _layer_features(args: tuple, kwargs: dict) -> torch.Tensor:
    """The feature map a register attention layer was called with (its first argument)."""
    features = args[0] if args else next(iter(kwargs.values()))
    assert isinstance(features, torch.Tensor) and features.ndim == 4, "register layer input is not a feature map"
    return features


def _with_features(output: Any, features: torch.Tensor) -> Any:
    """``output`` (a feature map, or a tuple whose first entry is one) with the feature map replaced."""
    if isinstance(output, (tuple, list)):
        return (features.to(output[0].dtype), *output[1:])
    return features.to(output.dtype)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@contextmanager
def zero_register_outputs(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, every register attention layer (``unet.anatomical_attention``) passes its input features
    through unchanged, as if its output projection were zero: the model without what the registers add. Forward
    hooks; nothing in the model is edited, and they are removed on exit."""
    layers = anatomical_unet(model).anatomical_attention.values()

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        return _with_features(output, _layer_features(args, kwargs))

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def record_register_output_ratios(model: torch.nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Yields ``{layer key: [ratio [B] per call]}``, filled while the block runs: ``||output - input|| / ||input||``
    of each register attention layer's feature map, per sample."""
    unet = anatomical_unet(model)
    ratios: dict[str, list[torch.Tensor]] = {key: [] for key in unet.anatomical_attention}

    def make_hook(key: str):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = _layer_features(args, kwargs).detach().float().flatten(1)
            delta = _first(output).detach().float().flatten(1) - x
            ratios[key].append((delta.norm(dim=1) / x.norm(dim=1).clamp_min(1e-12)).cpu())
        return hook

    handles = [layer.register_forward_hook(make_hook(key), with_kwargs=True)
               for key, layer in unet.anatomical_attention.items()]
    try:
        yield ratios
    finally:
        for handle in handles:
            handle.remove()


def attention_entropy(class_attention: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel entropy of per-class attention [B, C, h, w] (summing to 1 over C), divided by log C: 0 when
    every pixel attends to one class, 1 when uniform. Returns [B]."""
    p = class_attention.detach().float().clamp_min(1e-12)
    return -(p * p.log()).sum(1).mean(dim=(1, 2)) / math.log(class_attention.shape[1])


def state_similarity(states: torch.Tensor, heights: Optional[Sequence[float]] = None,
                     far: float = 0.5) -> dict[str, Any]:
    """Cosine similarity of per-sample register states [N, ...] (flattened per sample).

    Returns the ``[N, N]`` matrix, the mean over pairs of different samples, the relative spread
    ``mean_i ||r_i - mean r|| / ||mean r||`` and, with body ``heights``, the mean over pairs at least ``far``
    apart (``far_pairs_mean``) and closer (``near_pairs_mean``).
    """
    if states.ndim < 2 or states.shape[0] < 2:
        raise ValueError(f"register states must be [N >= 2, ...], got {tuple(states.shape)}")
    flat = states.detach().float().flatten(1).cpu()
    unit = torch.nn.functional.normalize(flat, dim=1)
    sim = unit @ unit.T
    off = ~torch.eye(len(flat), dtype=torch.bool)
    centre = flat.mean(0)
    out: dict[str, Any] = {"matrix": sim.numpy(), "mean_pairwise": float(sim[off].mean()),
                           "relative_spread": float((flat - centre).norm(dim=1).mean() / centre.norm().clamp_min(1e-12))}
    if heights is not None:
        z = torch.as_tensor(list(heights), dtype=torch.float32)
        if len(z) != len(flat):
            raise ValueError(f"{len(z)} heights for {len(flat)} register states")
        gap = (z[:, None] - z[None, :]).abs()
        far_pairs, near_pairs = off & (gap >= far), off & (gap < far)
        out["far_pairs_mean"] = float(sim[far_pairs].mean()) if far_pairs.any() else float("nan")
        out["near_pairs_mean"] = float(sim[near_pairs].mean()) if near_pairs.any() else float("nan")
    return out


def phantom_latents(model: torch.nn.Module, num: int, seed: int = 0) -> tuple[torch.Tensor, list[float]]:
    """``num`` phantom validation slices at stratified body heights, encoded by the model's first stage:
    ``(z [num, c, h, w], heights)`` with heights 0 (pelvis) .. 1 (chest)."""
    from torch.utils.data import default_collate

    from ldm.data.phantom import PhantomDataset

    device = next(model.parameters()).device
    size = int(model.decode_first_stage(torch.zeros(1, *sampling.latent_shape(model), device=device)).shape[-1])
    data = PhantomDataset(size=size, num_samples=num, seed=seed, split="validation")
    batch = default_collate([data[i] for i in range(num)])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        z = model.get_input(batch, model.first_stage_key)[0]
    return z, [float(h) for h in data.z]


@torch.no_grad()
def register_diagnostics(model: torch.nn.Module, z0: torch.Tensor, heights: Optional[Sequence[float]] = None,
                         timesteps: Optional[Sequence[int]] = None, seed: int = 0) -> dict[str, Any]:
    """Register diagnostics on clean latents ``z0`` [N, ...] noised to each of ``timesteps`` (default 2 %, 25 %,
    50 %, 75 % and 98 % of the schedule) with noise seeded by ``seed``.

    Returns ``timesteps`` and, per timestep: ``output_ratio`` (layer -> mean ||register output|| / ||features||),
    ``attention_entropy`` (layer -> mean normalised class-attention entropy), ``eps_mse`` and ``eps_mse_zeroed``
    (prediction error against the true target, intact and with :func:`zero_register_outputs`),
    ``eps_mse_change`` (zeroed - intact: > 0 when the registers help), ``register_similarity`` (see
    :func:`state_similarity`, without the matrix) and, at the middle timestep, its ``matrix``.
    """
    unet = anatomical_unet(model)
    num_steps = int(model.num_timesteps)
    if timesteps is None:
        timesteps = sorted({int(round(f * (num_steps - 1))) for f in (0.02, 0.25, 0.5, 0.75, 0.98)})
    bad = [t for t in timesteps if not 0 <= int(t) < num_steps]
    if bad:
        raise ValueError(f"timesteps {bad} outside 0..{num_steps - 1}")
    gen = torch.Generator().manual_seed(seed)
    keys = list(unet.anatomical_attention)
    out: dict[str, Any] = {"timesteps": [int(t) for t in timesteps], "num_latents": int(z0.shape[0]),
                           "output_ratio": {k: [] for k in keys}, "attention_entropy": {k: [] for k in keys},
                           "eps_mse": [], "eps_mse_zeroed": [], "eps_mse_change": [], "register_similarity": []}
    middle = out["timesteps"][len(out["timesteps"]) // 2]
    for t_int in out["timesteps"]:
        noise = torch.randn(z0.shape, generator=gen).to(z0)
        t = torch.full((z0.shape[0],), t_int, device=z0.device, dtype=torch.long)
        x_t = model.q_sample(z0, t, noise)
        target = noise if model.parameterization == "eps" else z0
        with record_register_output_ratios(model) as ratios:
            anatomy = model.apply_model_with_anatomy(x_t, t)
        with zero_register_outputs(model):
            zeroed = model.apply_model(x_t, t)
        mse = float(((anatomy.prediction.float() - target) ** 2).mean())
        mse_zeroed = float(((zeroed.float() - target) ** 2).mean())
        out["eps_mse"].append(mse)
        out["eps_mse_zeroed"].append(mse_zeroed)
        out["eps_mse_change"].append(mse_zeroed - mse)
        for key in keys:
            out["output_ratio"][key].append(float(torch.cat(ratios[key]).mean()) if ratios[key] else float("nan"))
            att = anatomy.layer_class_attention.get(key)
            out["attention_entropy"][key].append(float(attention_entropy(att).mean()) if att is not None
                                                 else float("nan"))
        if anatomy.registers is None or anatomy.registers.shape[0] < 2:
            continue
        sim = state_similarity(anatomy.registers, heights)
        if t_int == middle:
            out["register_similarity_matrix"] = sim["matrix"].tolist()
            out["register_similarity_timestep"] = t_int
        out["register_similarity"].append({k: v for k, v in sim.items() if k != "matrix"})
    return out


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
    ``accuracy`` [S, L] (fraction of latent pixels whose arg-max class attention equals the final predicted mask
    voted onto the latent grid), ``own_class_mass`` [S, C] (mean attention mass of class c on the latent pixels the
    final mask labels c, each weighted by the class's share of it, levels averaged),
    ``token_similarity`` [S, 2] (within/across-class cosine of the register tokens the UNet used at each step,
    which move with t for a timestep-aware bank), plus the decoded ``images`` [N, 1|3, H, W], the final ``masks``
    at the mask head's resolution and ``latent_masks`` [N, h, w] (majority vote onto the latent grid, which
    ``accuracy`` uses).
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
    masks = final.seg_logits.float().argmax(1).cpu()  # at the mask head's resolution (latent grid or image size)
    images = model.decode_first_stage(z).float().cpu()
    maps = torch.stack(per_step)  # [S, L, N, C, h, w]
    num_classes = maps.shape[3]
    # the maps live on the latent grid: each class's share of every latent cell in the final mask (the one-hot
    # mask when the mask head predicts there); its arg-max is the majority vote that "accuracy" compares with, and
    # the own-class mass weights each cell by the share, so a structure smaller than a cell still counts
    shares, _ = soft_class_targets(masks, shape[1:], num_classes, ignore_index=-1)  # [N, C, h, w]
    latent_masks = shares.argmax(1)
    accuracy = (maps.argmax(3) == latent_masks[None, None]).float().mean(dim=(2, 3, 4))
    mean_maps = maps.mean(1)  # [S, N, C, h, w]
    weight = shares.sum(dim=(0, 2, 3))  # [C]
    mass = (mean_maps * shares[None]).sum(dim=(1, 3, 4)) / weight.clamp_min(1e-12)
    own = torch.where(weight[None] > 0, mass, torch.full_like(mass, float("nan")))
    levels = [{"key": info.key, "ds": info.ds} for info in unet.anatomical_attention_blocks]
    return {"timesteps": timesteps, "levels": levels,
            "maps": maps.numpy(), "mean_mass": maps.mean(dim=(2, 4, 5)).numpy(), "accuracy": accuracy.numpy(),
            "own_class_mass": own.numpy(), "token_similarity": np.asarray(token_sim),
            "images": images.numpy(), "masks": masks.numpy(), "latent_masks": latent_masks.numpy()}


def _mix(probs: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """``[C, h, w]`` class probabilities -> ``[h, w, 3]`` RGB in [0, 1] mixing the class colours."""
    pal = colours[np.arange(probs.shape[0]) % len(colours)] / 255.0
    return np.clip(np.einsum("chw,cd->hwd", probs, pal), 0, 1)


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _similarity_figure(out_dir: str, sim: dict[str, Any], class_names: Sequence[str], k: int) -> str:
    """``register_similarity.png``: the register cosine-similarity matrix, class blocks of ``k`` registers."""
    plt = _pyplot()
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
    path = os.path.join(out_dir, "register_similarity.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _attention_maps_figure(out_dir: str, traj: dict[str, Any], colours: np.ndarray, max_columns: int) -> str:
    """``attention_maps.png``: sample 0's class attention, rows = levels + their mean, columns = up to
    ``max_columns`` steps, then the final image and mask."""
    plt = _pyplot()
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
    path = os.path.join(out_dir, "attention_maps.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _timestep_figure(out_dir: str, traj: dict[str, Any], class_names: Sequence[str], colours: np.ndarray) -> str:
    """``attention_vs_timestep.png``: attention mass on the own class, argmax accuracy per level and register-token
    similarity along the trajectory."""
    plt = _pyplot()
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4))
    t = np.asarray(traj["timesteps"])
    own = traj["own_class_mass"]
    for c in range(own.shape[1]):
        if np.isfinite(own[:, c]).any():
            ax1.plot(t, own[:, c], label=class_names[c] if c < len(class_names) else str(c),
                     color=colours[c % len(colours)] / 255.0 if c else (0.5, 0.5, 0.5))
    ax1.axhline(1.0 / own.shape[1], ls="--", color="k", lw=0.8, label="uniform")
    ax1.set_ylabel("attention mass on own class")
    for li, lv in enumerate(traj["levels"]):
        ax2.plot(t, traj["accuracy"][:, li], label=f"{lv['key']} (ds {lv['ds']})")
    ax2.set_ylabel("argmax attention == final mask")
    ax3.plot(t, traj["token_similarity"][:, 0], label="within class")
    ax3.plot(t, traj["token_similarity"][:, 1], label="across classes")
    ax3.set_ylabel("cosine similarity of register tokens")
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel("timestep t")
        ax.invert_xaxis()
        ax.legend(fontsize="small")
    fig.tight_layout()
    path = os.path.join(out_dir, "attention_vs_timestep.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _figures(out_dir: str, sim: dict[str, Any], traj: dict[str, Any], class_names: Sequence[str],
             colours: np.ndarray, k: int, max_columns: int = 6) -> dict[str, str]:
    """Write the register-similarity, attention-map and attention-vs-timestep figures; their paths by kind."""
    return {"similarity": _similarity_figure(out_dir, sim, class_names, k),
            "maps": _attention_maps_figure(out_dir, traj, colours, max_columns),
            "timestep": _timestep_figure(out_dir, traj, class_names, colours)}


def _json_safe(node: Any) -> Any:
    """``node`` with non-finite floats replaced by ``None`` (strict JSON)."""
    if isinstance(node, dict):
        return {k: _json_safe(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_json_safe(v) for v in node]
    if isinstance(node, float) and not math.isfinite(node):
        return None
    return node


def _diagnostics_figure(out_dir: str, diag: dict[str, Any], heights: Sequence[float]) -> str:
    plt = _pyplot()
    t = np.asarray(diag["timesteps"])
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for key, values in diag["output_ratio"].items():
        axes[0].plot(t, values, marker="o", label=key)
    axes[0].set_ylabel("||register output|| / ||features||")
    axes[1].plot(t, diag["eps_mse"], marker="o", label="intact")
    axes[1].plot(t, diag["eps_mse_zeroed"], marker="o", label="register outputs zeroed")
    axes[1].set_ylabel("prediction MSE (noised phantom latents)")
    for key, values in diag["attention_entropy"].items():
        axes[2].plot(t, values, marker="o", label=key)
    axes[2].set_ylabel("class-attention entropy / log C")
    for ax in axes[:3]:
        ax.set_xlabel("timestep t")
        ax.legend(fontsize="x-small")
    if "register_similarity_matrix" in diag:
        order = np.argsort(heights)
        matrix = np.asarray(diag["register_similarity_matrix"])[order][:, order]
        im = axes[3].imshow(matrix, cmap="coolwarm", vmin=-1, vmax=1)
        labels = [f"{heights[i]:.2f}" for i in order]
        axes[3].set_xticks(range(len(order)), labels, rotation=90, fontsize=7)
        axes[3].set_yticks(range(len(order)), labels, fontsize=7)
        axes[3].set_title(f"register state cosine, t={diag['register_similarity_timestep']} (by body height)")
        fig.colorbar(im, ax=axes[3])
    fig.tight_layout()
    path = os.path.join(out_dir, "register_diagnostics.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def inspect_registers(model: torch.nn.Module, out_dir: str, num_samples: int = 4, ddim_steps: int = 20,
                      eta: float = 0.0, seed: int = 0, class_names: Optional[Sequence[str]] = None,
                      colours: Optional[Sequence[Sequence[int]]] = None, use_ema: bool = True,
                      diagnostic_latents: int = 8) -> dict[str, Any]:
    """Write the register figures and ``registers.json``; returns the JSON summary (with ``files``).

    ``diagnostic_latents``: phantom validation slices for :func:`register_diagnostics` (0: skip them).
    """
    if diagnostic_latents < 0 or diagnostic_latents == 1:
        raise ValueError(f"diagnostic_latents must be 0 (off) or >= 2, got {diagnostic_latents}")
    unet = anatomical_unet(model)
    os.makedirs(out_dir, exist_ok=True)
    scope = model.ema_scope("inspect_registers") if use_ema and getattr(model, "use_ema", False) else nullcontext()
    with scope, torch.no_grad():
        bank = unet.register_bank
        sim = register_similarity(bank.registers)
        traj = attention_trajectory(model, num_samples, ddim_steps, eta, seed)
        diag, heights = None, []
        if diagnostic_latents:
            z0, heights = phantom_latents(model, diagnostic_latents, seed)
            diag = register_diagnostics(model, z0, heights, seed=seed)
    c, k = bank.registers.shape[:2]
    label_set = label_set_of(model, int(c))
    names = list(class_names) if class_names else list(label_set.classes)
    pal = np.asarray(colours if colours is not None else label_set.palette(int(c)), dtype=np.float64)
    files = _figures(out_dir, sim, traj, names, pal, k)
    if diag is not None:
        files["diagnostics"] = _diagnostics_figure(out_dir, diag, heights)
        diag = _json_safe({"data": "phantom validation slices", "heights": heights, **diag})
    maps = torch.from_numpy(traj["maps"])  # [S, L, N, C, h, w]
    entropy = attention_entropy(maps.flatten(0, 2)).view(maps.shape[:3]).mean(2)  # [S, L]
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
                       "token_similarity_across": traj["token_similarity"][:, 1].tolist(),
                       "attention_entropy_per_level": entropy.tolist()},
        "diagnostics": diag,
        "files": {k2: os.path.basename(v) for k2, v in files.items()},
    }
    with open(os.path.join(out_dir, "registers.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logger.info("Wrote register inspection to %s", out_dir)
    return summary
