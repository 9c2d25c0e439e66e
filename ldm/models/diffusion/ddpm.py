"""Denoising diffusion models (CompVis-compatible names, parameters and state-dict keys).

- :class:`DDPM`: the diffusion process (schedule buffers, ``q_sample``, losses, the eps/x0 prediction
  dispatcher, ancestral sampling), EMA, optimiser and Lightning steps; Ho et al. 2020.
- :class:`LatentDiffusion`: DDPM in the latent space of a frozen first-stage autoencoder, with optional
  conditioning (``concat``, ``crossattn``, ``hybrid``, ``adm``); Rombach et al. 2022.
- :class:`DiffusionWrapper` (:mod:`ldm.models.diffusion.wrapper`, importable from here): routes conditioning into
  the UNet.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Optional, Sequence

import pytorch_lightning as pl
import torch
from einops import rearrange
from torch import nn

from ldm.checkpoints import load_weights
from ldm.data.batch import to_channels_first
from ldm.models.diffusion.ddim import ancestral_sample, truncate_cond
from ldm.models.diffusion.losses import LossGroup, diffusion_loss, element_loss
from ldm.models.diffusion.samplers import Callback, Denoiser, NoiseFn, guided_output, randn, sample_model, sampler_spec
from ldm.models.diffusion.training import DiffusionLightningMixin, ScaleByStdMixin, denoise_grid, diffusion_row
from ldm.models.diffusion.wrapper import _NONE_STRINGS, CONDITIONING_KEYS, DiffusionWrapper  # noqa: F401
from ldm.modules.diffusionmodules.util import SCHEDULE_BUFFERS, extract_into_tensor, make_beta_schedule, schedule_arrays
from ldm.modules.ema import LitEma
from ldm.modules.mask_condition import MaskCondition, check_mask_condition
from ldm.modules.representation_alignment import build_representation_alignment
from ldm.util import (FIRST_STAGE_SENTINEL, UNCONDITIONAL_SENTINEL, count_params, default, instantiate_from_config,
                      isimage)

logger = logging.getLogger(__name__)
class DDPM(DiffusionLightningMixin, pl.LightningModule):
    """Gaussian diffusion in pixel space with a UNet denoiser (CompVis parameters).

    Args:
        unet_config: ``{target, params}`` of the denoiser. timesteps, beta_schedule, linear_start,
            linear_end, cosine_s, given_betas: the noise schedule. loss_type: "l1" or "l2".
        ckpt_path, ignore_keys, load_only_unet: weights to load after construction (see :meth:`init_from_ckpt`).
        monitor: metric name for checkpointing. use_ema: keep an EMA of the weights in ``model_ema``.
        first_stage_key: batch key of the images. image_size, channels: sample shape.
        log_every_t: interval of logged intermediates. clip_denoised: clamp x_0 to [-1, 1] when sampling.
        original_elbo_weight, l_simple_weight: weights of the VLB and simple losses. v_posterior: blend of the
            posterior variance with beta_t. conditioning_key: see :class:`DiffusionWrapper`.
        parameterization: "eps" (predict noise) or "x0". scheduler_config: ``{target, params}`` of an
            ``ldm.lr_scheduler`` multiplier (step-wise LambdaLR). use_positional_encodings: not supported (must be False).
        learn_logvar, logvar_init: learned per-timestep loss log-variance (Kendall & Gal style weighting).
    """

    def __init__(self, unet_config: Mapping[str, Any], timesteps: int = 1000, beta_schedule: str = "linear",
                 loss_type: str = "l2", ckpt_path: Optional[str] = None, ignore_keys: Sequence[str] = (),
                 load_only_unet: bool = False, monitor: Optional[str] = "val/loss", use_ema: bool = True,
                 first_stage_key: str = "image", image_size: int = 256, channels: int = 3, log_every_t: int = 100,
                 clip_denoised: bool = True, linear_start: float = 1e-4, linear_end: float = 2e-2,
                 cosine_s: float = 8e-3, given_betas: Optional[Sequence[float]] = None,
                 original_elbo_weight: float = 0.0, v_posterior: float = 0.0, l_simple_weight: float = 1.0,
                 conditioning_key: Optional[str] = None, parameterization: str = "eps",
                 scheduler_config: Optional[Mapping[str, Any]] = None, use_positional_encodings: bool = False,
                 learn_logvar: bool = False, logvar_init: float = 0.0) -> None:
        super().__init__()
        if parameterization not in ("eps", "x0"):
            raise ValueError(f"parameterization must be 'eps' or 'x0', got {parameterization!r}")
        if loss_type not in ("l1", "l2"):
            raise ValueError(f"loss_type must be 'l1' or 'l2', got {loss_type!r}")
        if use_positional_encodings:
            raise ValueError("use_positional_encodings=True (bounding-box positional conditioning) is not supported")
        self.parameterization = parameterization
        self.cond_stage_model = None
        self.clip_denoised = clip_denoised
        self.log_every_t = log_every_t
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.use_positional_encodings = use_positional_encodings
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        count_params(self.model, verbose=True)
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.model)
            logger.info("Keeping EMAs of %d parameters.", len(self.model_ema.m_name2s_name))
        self.use_scheduler = scheduler_config is not None
        self.scheduler_config = scheduler_config
        self.v_posterior = v_posterior
        self.original_elbo_weight = original_elbo_weight
        self.l_simple_weight = l_simple_weight
        self.loss_type = loss_type
        if monitor is not None:
            self.monitor = monitor
        self.register_schedule(given_betas=given_betas, beta_schedule=beta_schedule, timesteps=timesteps,
                               linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s)
        self.learn_logvar = learn_logvar
        logvar = torch.full((self.num_timesteps,), float(logvar_init))
        if learn_logvar:
            self.logvar = nn.Parameter(logvar)
        else:
            self.register_buffer("logvar", logvar, persistent=False)
        self.restarted_from_ckpt = False
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, only_model=load_only_unet)

    # ------------------------------------------------------------------ schedule and the forward process
    def register_schedule(self, given_betas: Optional[Sequence[float]] = None, beta_schedule: str = "linear",
                          timesteps: int = 1000, linear_start: float = 1e-4, linear_end: float = 2e-2,
                          cosine_s: float = 8e-3) -> None:
        """Compute the schedule once and store it as float32 buffers (CompVis names; lvlb_weights non-persistent)."""
        if given_betas is not None:
            betas = given_betas
        else:
            betas = make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end,
                                       cosine_s=cosine_s)
        arrays = schedule_arrays(betas, self.v_posterior, self.parameterization)
        self.num_timesteps = int(len(arrays["betas"]))
        self.linear_start, self.linear_end = linear_start, linear_end
        for name in SCHEDULE_BUFFERS:
            self.register_buffer(name, torch.tensor(arrays[name], dtype=torch.float32))
        self.register_buffer("lvlb_weights", torch.tensor(arrays["lvlb_weights"], dtype=torch.float32),
                             persistent=False)

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps (Ho et al. 2020, eq. 4)."""
        noise = default(noise, lambda: torch.randn_like(x_start))
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eqs. 6-7)."""
        mean = (extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        variance = extract_into_tensor(self.posterior_variance, t, x_t.shape)
        log_variance = extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)

    def predict_noise_from_start(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return ((extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - x0)
                / extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape))

    # ------------------------------------------------------------------ the network and its predictions
    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None, return_ids: bool = False,
                    **model_kwargs: Any) -> Any:
        """Run the UNet on ``x_noisy`` at steps ``t`` with ``cond`` routed by ``conditioning_key``.

        ``cond`` is a tensor, a list of tensors or a ``{c_concat, c_crossattn}`` dict. Returns the UNet's
        output. ``return_ids`` is accepted for CompVis call compatibility.
        """
        del return_ids
        return self.model(x_noisy, t, **self.conditioning_kwargs(cond), **model_kwargs)

    def conditioning_kwargs(self, cond: Any) -> dict[str, Any]:
        """``cond`` as the ``c_concat``/``c_crossattn`` keywords of :class:`DiffusionWrapper`."""
        key = self.model.conditioning_key
        if isinstance(cond, dict):
            return cond
        if key is None or cond is None:
            return {}
        return {"c_concat" if key == "concat" else "c_crossattn": cond if isinstance(cond, list) else [cond]}

    @property
    def unet(self) -> nn.Module:
        """The denoising network (``model.diffusion_model``, the CompVis attribute path)."""
        return self.model.diffusion_model

    def model_predictions(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None,
                          unconditional_guidance_scale: float = 1.0,
                          unconditional_conditioning: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The one eps/x0 dispatcher every sampler uses: returns ``(eps, x0)`` whatever the parameterization."""
        out = guided_output(self.apply_model, x, t, cond, unconditional_guidance_scale, unconditional_conditioning)
        if self.parameterization == "eps":
            return out, self.predict_start_from_noise(x, t, out)
        return self.predict_noise_from_start(x, t, out), out

    def p_mean_variance(self, x: torch.Tensor, cond: Any, t: torch.Tensor,
                        clip_denoised: bool) -> tuple[torch.Tensor, ...]:
        """Mean, variance, log-variance of p(x_{t-1} | x_t) and the x_0 prediction."""
        _, x0 = self.model_predictions(x, t, cond)
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        mean, variance, log_variance = self.q_posterior(x0, x, t)
        return mean, variance, log_variance, x0

    def cond_for_step(self, cond: Any, t: torch.Tensor) -> Any:
        """Conditioning used at step ``t`` of ancestral sampling (unchanged here)."""
        return cond

    def denoiser(self, cond: Any = None, unconditional_guidance_scale: float = 1.0,
                 unconditional_conditioning: Any = None, clip_denoised: bool = False,
                 noise_cond: bool = False) -> Denoiser:
        """``denoise(x, t) -> (eps, x0)`` over :meth:`model_predictions` for the registry samplers; ``clip_denoised``
        clamps x0 to [-1, 1], ``noise_cond`` applies :meth:`cond_for_step` (the ancestral loop's conventions)."""
        def denoise(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            eps, x0 = self.model_predictions(x, t, self.cond_for_step(cond, t) if noise_cond else cond,
                                             unconditional_guidance_scale, unconditional_conditioning)
            return eps, (x0.clamp(-1.0, 1.0) if clip_denoised else x0)
        return denoise

    @torch.no_grad()
    def sample(self, batch_size: int = 16, return_intermediates: bool = False, **kwargs: Any) -> Any:
        """Ancestral samples ``[batch_size, channels, image_size, image_size]``; ``kwargs`` as ``ancestral_sample``."""
        shape = (batch_size, self.channels, self.image_size, self.image_size)
        return ancestral_sample(self, None, shape, return_intermediates=return_intermediates, **kwargs)

    # ------------------------------------------------------------------ losses
    def get_loss(self, pred: torch.Tensor, target: torch.Tensor, mean: bool = True) -> torch.Tensor:
        """The ``loss_type`` element loss (:func:`~ldm.models.diffusion.losses.element_loss`), averaged with ``mean``."""
        loss = element_loss(pred, target, self.loss_type)
        return loss.mean() if mean else loss

    def diffusion_loss(self, model_output: torch.Tensor, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                       groups: Sequence[LossGroup] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Simple loss (weighted by the per-step log-variance) + ``original_elbo_weight`` * VLB term, over channel
        ``groups`` when given (:func:`ldm.models.diffusion.losses.diffusion_loss`)."""
        target = noise if self.parameterization == "eps" else x_start
        return diffusion_loss(self.get_loss(model_output, target, mean=False), t, self.logvar, self.lvlb_weights,
                              l_simple_weight=self.l_simple_weight, original_elbo_weight=self.original_elbo_weight,
                              learn_logvar=self.learn_logvar, prefix="train" if self.training else "val",
                              groups=groups)

    def p_losses(self, x_start: torch.Tensor, cond: Any, t: torch.Tensor,
                 noise: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        noise = default(noise, lambda: torch.randn_like(x_start))
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        model_output = self.apply_model(x_noisy, t, cond)
        return self.diffusion_loss(model_output, x_start, t, noise)

    def forward(self, x: torch.Tensor, c: Any = None, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict]:
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=x.device).long()
        return self.p_losses(x, c, t, *args, **kwargs)

    # ------------------------------------------------------------------ data and Lightning steps
    def get_input(self, batch: Mapping[str, Any], k: str) -> torch.Tensor:
        """``batch[k]`` as a float B,C,H,W tensor: channel-last B,H,W[,C] (CompVis) and channel-first B,C,H,W
        (MONAI) batches are told apart by ``input_channels(k)`` (:func:`ldm.data.batch.to_channels_first`)."""
        if k not in batch:
            raise ValueError(f"batch has no key {k!r} (keys: {sorted(batch)}); check first_stage_key / cond_stage_key")
        return to_channels_first(batch[k], self.input_channels(k), k)

    def input_channels(self, k: str) -> Optional[int]:
        """Channel count expected under batch key ``k`` (None: unknown, channel-last assumed)."""
        return int(self.channels) if k == self.first_stage_key else None

    def shared_step(self, batch: Mapping[str, Any], **kwargs: Any) -> tuple[torch.Tensor, dict]:
        x = self.get_input(batch, self.first_stage_key)
        return self(x)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser updates: the denoiser (+ ``logvar`` when learned)."""
        params = list(self.model.parameters())
        if self.learn_logvar:
            params.append(self.logvar)
        return params

    # ------------------------------------------------------------------ checkpoints
    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = (), only_model: bool = False) -> list[str]:
        """Load weights from ``path`` (see :func:`ldm.checkpoints.load_weights`).

        Extra keys or other shapes raise ``ValueError`` naming the file; missing keys are logged and returned.
        """
        missing, _ = load_weights(self, path, ignore_keys=(*ignore_keys, *self.optional_checkpoint_keys()),
                                  only_model=only_model)
        self.restarted_from_ckpt = True
        return missing

    def optional_checkpoint_keys(self) -> tuple[str, ...]:
        """Prefixes of checkpoint keys this config does not use (EMA copies when ``use_ema`` is off)."""
        return () if self.use_ema else ("model_ema.",)


class LatentDiffusion(ScaleByStdMixin, DDPM):
    """DDPM in the latent space of a frozen first stage (``z = scale_factor * E(x)``), optionally conditioned.

    Args:
        first_stage_config: ``{target, params}`` of the autoencoder (frozen, kept in eval mode).
        cond_stage_config: ``{target, params}`` of the conditioning encoder, or ``"__is_first_stage__"``
            (encode with the first stage) or ``"__is_unconditional__"`` (no conditioning, whatever
            ``conditioning_key`` says).
        num_timesteps_cond: >1 noises the conditioning on a shortened schedule (``cond_ids``).
        cond_stage_key: batch key of the conditioning input. cond_stage_trainable: train the cond encoder
            jointly. concat_mode: default routing ("concat" or "crossattn") when ``conditioning_key`` is None.
        cond_stage_forward: name of the cond encoder method to call instead of ``encode``/``forward``.
        conditioning_key: see :class:`DiffusionWrapper`.
        scale_factor: latent scaling. scale_by_std: set ``scale_factor = 1 / std(z)`` from the first training
            batch (kept in the ``scale_factor`` buffer, so checkpoints carry it).
        mask_condition: ``{key, num_classes, ignore_index, dropout, partial}``: condition on the batch's masks with
            condition dropout (:class:`~ldm.modules.mask_condition.MaskCondition`; unconditional models only, the
            UNet with ``mask_condition_classes: num_classes``).
        representation_alignment: ``{num_classes, encoder_path, layer, weight, ...}``: in training, align a UNet
            feature map to a frozen mask encoder's features of the batch's masks (REPA;
            :class:`~ldm.modules.representation_alignment.RepresentationAlignment`); sampling is unchanged.
        **kwargs: the :class:`DDPM` parameters (``ckpt_path``/``ignore_keys`` load after the first stage is built).
    """

    def __init__(self, first_stage_config: Mapping[str, Any], cond_stage_config: Any,
                 num_timesteps_cond: Optional[int] = None, cond_stage_key: str = "image",
                 cond_stage_trainable: bool = False, concat_mode: bool = True, cond_stage_forward: Optional[str] = None,
                 conditioning_key: Optional[str] = None, scale_factor: float = 1.0, scale_by_std: bool = False,
                 mask_condition: Optional[Mapping[str, Any]] = None,
                 representation_alignment: Optional[Mapping[str, Any]] = None, **kwargs: Any) -> None:
        self.num_timesteps_cond = default(num_timesteps_cond, 1)
        self.scale_by_std = scale_by_std
        if self.num_timesteps_cond > kwargs.get("timesteps", 1000):
            raise ValueError(f"num_timesteps_cond ({self.num_timesteps_cond}) exceeds timesteps")
        unconditional = cond_stage_config == UNCONDITIONAL_SENTINEL
        if unconditional:
            conditioning_key = None
        elif conditioning_key in _NONE_STRINGS:
            raise ValueError(f"conditioning_key is {conditioning_key!r} but cond_stage_config is a real encoder; "
                             "use concat/crossattn/hybrid/adm, or cond_stage_config: __is_unconditional__")
        elif conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", ())
        super().__init__(conditioning_key=conditioning_key, **kwargs)
        self.concat_mode = concat_mode
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_key = cond_stage_key
        self._scale_factor_fixed = not scale_by_std
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
            self.register_load_state_dict_pre_hook(ScaleByStdMixin.note_loaded_scale_factor)
        else:
            self.scale_factor = scale_factor
        self.instantiate_first_stage(first_stage_config)
        self.instantiate_cond_stage(cond_stage_config)
        self.cond_stage_forward = cond_stage_forward
        self.clip_denoised = False
        self.mask_condition = check_mask_condition(MaskCondition.from_config(mask_condition), self)
        self.representation_alignment = build_representation_alignment(representation_alignment, self.unet)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)

    def register_schedule(self, *args: Any, **kwargs: Any) -> None:
        super().register_schedule(*args, **kwargs)
        self.shorter_cond_schedule = self.num_timesteps_cond > 1
        if self.shorter_cond_schedule:
            cond_ids = torch.full((self.num_timesteps,), self.num_timesteps - 1, dtype=torch.long)
            cond_ids[: self.num_timesteps_cond] = torch.round(
                torch.linspace(0, self.num_timesteps - 1, self.num_timesteps_cond)).long()
            self.register_buffer("cond_ids", cond_ids, persistent=False)

    # ------------------------------------------------------------------ stages
    def instantiate_first_stage(self, config: Mapping[str, Any]) -> None:
        model = instantiate_from_config(config)
        model.eval()
        for param in model.parameters():
            param.requires_grad = False
        self.first_stage_model = model

    def instantiate_cond_stage(self, config: Any) -> None:
        if config == UNCONDITIONAL_SENTINEL:
            logger.info("Training %s as an unconditional model.", type(self).__name__)
            self.cond_stage_model = None
            return
        if config == FIRST_STAGE_SENTINEL:
            if self.cond_stage_trainable:
                raise ValueError("cond_stage_trainable=True needs a real cond_stage_config, not __is_first_stage__")
            logger.info("Using the first stage also as cond stage.")
            self.cond_stage_model = self.first_stage_model
            return
        model = instantiate_from_config(config)
        if not self.cond_stage_trainable:
            model.eval()
            for param in model.parameters():
                param.requires_grad = False
        self.cond_stage_model = model

    def train(self, mode: bool = True) -> "LatentDiffusion":
        """As ``nn.Module.train`` but the frozen first stage (and a frozen cond stage) stay in eval mode."""
        super().train(mode)
        self.first_stage_model.eval()
        if self.cond_stage_model is not None and not self.cond_stage_trainable:
            self.cond_stage_model.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = super().trainable_parameters()
        if self.cond_stage_trainable:
            logger.info("%s: also optimizing conditioner params!", type(self).__name__)
            params = params + list(self.cond_stage_model.parameters())
        if self.representation_alignment is not None:
            params = params + list(self.representation_alignment.projector.parameters())
        return params

    def on_train_start(self) -> None:
        """Refuse to train representation alignment without a trained mask encoder (after any checkpoint restore)."""
        super().on_train_start()
        if self.representation_alignment is not None:
            self.representation_alignment.check_ready()

    def encode_first_stage(self, x: torch.Tensor) -> Any:
        """The first stage's encoding of ``x`` (a posterior distribution or a tensor)."""
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior: Any) -> torch.Tensor:
        """``scale_factor`` * a sample of the posterior (or the tensor itself)."""
        return self.scale_factor * self._raw_latent(encoder_posterior)

    def encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        """``scale_factor`` x the first stage's posterior mean of ``x`` (no sampling noise; a deterministic first
        stage's output as it is)."""
        posterior = self.encode_first_stage(x)
        return self.scale_factor * (posterior.mode() if hasattr(posterior, "mode") else self._raw_latent(posterior))

    @staticmethod
    def _raw_latent(encoder_posterior: Any) -> torch.Tensor:
        if isinstance(encoder_posterior, torch.Tensor):
            return encoder_posterior
        if callable(getattr(encoder_posterior, "sample", None)):
            return encoder_posterior.sample()
        raise TypeError(f"encoder_posterior of type {type(encoder_posterior).__name__} is neither a tensor "
                        "nor a distribution with sample()")

    def decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False,
                           force_not_quantize: bool = False) -> torch.Tensor:
        """Decode latents ``z`` (divided by ``scale_factor``) to images; differentiable when ``z`` needs grad."""
        if predict_cids:
            if z.dim() == 4:
                z = torch.argmax(z.exp(), dim=1).long()
            z = self.first_stage_model.quantize.get_codebook_entry(z, shape=None)
            z = rearrange(z, "b h w c -> b c h w").contiguous()
        z = 1.0 / self.scale_factor * z
        if any(cls.__name__ == "VQModelInterface" for cls in type(self.first_stage_model).__mro__):
            return self.first_stage_model.decode(z, force_not_quantize=predict_cids or force_not_quantize)
        return self.first_stage_model.decode(z)

    def get_learned_conditioning(self, c: Any) -> Any:
        """Encode raw conditioning ``c`` with the cond stage (``cond_stage_forward``, ``encode`` or ``forward``)."""
        if self.cond_stage_model is None:
            raise ValueError("this model is unconditional (cond_stage_config: __is_unconditional__)")
        if self.cond_stage_forward is not None:
            if not callable(getattr(self.cond_stage_model, self.cond_stage_forward, None)):
                raise ValueError(f"cond_stage_forward {self.cond_stage_forward!r} is not a method of "
                                 f"{type(self.cond_stage_model).__name__}")
            return getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        if callable(getattr(self.cond_stage_model, "encode", None)):
            c = self.cond_stage_model.encode(c)
            return c if isinstance(c, torch.Tensor) or not callable(getattr(c, "mode", None)) else c.mode()
        return self.cond_stage_model(c)

    def optional_checkpoint_keys(self) -> tuple[str, ...]:
        """Also ``scale_factor`` when ``scale_by_std`` is off (the configured value is used)."""
        return super().optional_checkpoint_keys() + (() if self.scale_by_std else ("scale_factor",))

    # ------------------------------------------------------------------ data and training
    @torch.no_grad()
    def input_channels(self, k: str) -> Optional[int]:
        """Image channels of the first stage for ``first_stage_key`` (of the cond encoder for ``cond_stage_key``)."""
        model = self.first_stage_model if k == self.first_stage_key else (
            getattr(self, "cond_stage_model", None) if k == self.cond_stage_key else None)
        conv_in = getattr(getattr(model, "encoder", None), "conv_in", None)
        return int(conv_in.in_channels) if isinstance(conv_in, nn.Conv2d) else None

    def get_input(self, batch: Mapping[str, Any], k: str, return_first_stage_outputs: bool = False,
                  force_c_encode: bool = False, cond_key: Optional[str] = None, return_original_cond: bool = False,
                  bs: Optional[int] = None) -> list[Any]:
        """``[z, c]`` (+ ``[x, xrec]`` with ``return_first_stage_outputs``, + ``[xc]`` with ``return_original_cond``)."""
        x = super().get_input(batch, k)
        if bs is not None:
            x = x[:bs]
        x = x.to(self.device)
        z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
        c = xc = None
        if self.model.conditioning_key is not None:
            cond_key = default(cond_key, self.cond_stage_key)
            if cond_key == self.first_stage_key:
                xc = x
            elif cond_key in ("caption", "coordinates_bbox"):
                xc = batch[cond_key]
            elif cond_key == "class_label":
                xc = batch
            else:
                xc = super().get_input(batch, cond_key).to(self.device)
            if not self.cond_stage_trainable or force_c_encode:
                c = self.get_learned_conditioning(xc if isinstance(xc, (dict, list)) else xc.to(self.device))
            else:
                c = xc
            if bs is not None:
                c = c[:bs]
        if self.mask_condition is not None and k == self.first_stage_key:
            masks = {self.mask_condition.key: batch[self.mask_condition.key][:bs]} if bs is not None else batch
            c = self.mask_condition.from_batch(masks, z.shape[2:], z.device, self.training)
        out = [z, c]
        if return_first_stage_outputs:
            out.extend([x, self.decode_first_stage(z)])
        if return_original_cond:
            out.append(xc)
        return out

    def shared_step(self, batch: Mapping[str, Any], **kwargs: Any) -> tuple[torch.Tensor, dict]:
        x, c = self.get_input(batch, self.first_stage_key)
        if self.representation_alignment is None:
            return self(x, c)
        masks = self.representation_alignment.batch_masks(batch, self.device, required=self.training)
        return self(x, c, alignment_masks=masks)

    def p_losses(self, x_start: torch.Tensor, cond: Any, t: torch.Tensor, noise: Optional[torch.Tensor] = None,
                 alignment_masks: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The diffusion loss, plus the representation alignment to ``alignment_masks`` [B, H, W] when the model
        has one and masks are given (:meth:`with_alignment`)."""
        return self.with_alignment(lambda: super(LatentDiffusion, self).p_losses(x_start, cond, t, noise),
                                   alignment_masks)

    def with_alignment(self, losses: Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]],
                       alignment_masks: Optional[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``losses()`` (one training loss with its UNet call), plus ``weight`` times the alignment of the UNet's
        aligned layer in that call to ``alignment_masks``; ``losses()`` alone without alignment or masks."""
        align = self.representation_alignment
        if align is None or alignment_masks is None:
            return losses()
        with align.capture(self.unet) as captured:
            loss, loss_dict = losses()
        align_loss = align.loss(captured.output, alignment_masks)
        prefix = "train" if self.training else "val"
        loss_dict.setdefault(f"{prefix}/diffusion_loss", loss.detach())
        loss_dict[f"{prefix}/alignment_loss"] = align_loss.detach()
        loss = loss + align.weight * align_loss
        loss_dict[f"{prefix}/loss"] = loss.detach()
        return loss, loss_dict

    def forward(self, x: torch.Tensor, c: Any = None, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict]:
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=self.device).long()
        if self.model.conditioning_key is not None:
            if c is None:
                raise ValueError(f"conditioning_key is {self.model.conditioning_key!r} but no conditioning was given")
            if self.cond_stage_trainable:
                c = self.get_learned_conditioning(c)
            c = self.cond_for_step(c, t)
        return self.p_losses(x, c, t, *args, **kwargs)

    def cond_for_step(self, cond: Any, t: torch.Tensor) -> Any:
        """With a shortened cond schedule, the conditioning noised to step ``cond_ids[t]``."""
        if self.shorter_cond_schedule and isinstance(cond, torch.Tensor):
            cond = self.q_sample(x_start=cond, t=self.cond_ids[t], noise=torch.randn_like(cond.float()))
        return cond

    # ------------------------------------------------------------------ sampling and images
    @torch.no_grad()
    def sample(self, cond: Any, batch_size: int = 16, return_intermediates: bool = False,
               x_T: Optional[torch.Tensor] = None, verbose: bool = True, shape: Optional[Sequence[int]] = None,
               **kwargs: Any) -> Any:
        """Ancestral (DDPM) samples in latent space; ``kwargs`` as ``ddim.ancestral_sample``."""
        shape = tuple(shape) if shape is not None else (batch_size, self.channels, self.image_size, self.image_size)
        return ancestral_sample(self, truncate_cond(cond, batch_size), shape, return_intermediates=return_intermediates,
                                x_T=x_T, verbose=verbose, **kwargs)

    @torch.no_grad()
    def sample_log(self, cond: Any, batch_size: int, ddim: bool, ddim_steps: Optional[int], eta: float = 0.0,
                   x_T: Optional[torch.Tensor] = None, sampler: Optional[str] = None,
                   noise_fn: Optional[NoiseFn] = None,
                   callback: Optional[Callback] = None) -> tuple[torch.Tensor, dict]:
        """``(samples, {"x_inter", "pred_x0"})`` from the registry: ``sampler`` by name, else DDIM (``ddim=True``) or
        the ancestral loop (every step, ``eta`` ignored); logged every ``log_every_t`` (ancestral) or 100 steps."""
        spec = sampler_spec(sampler or ("ddim" if ddim else "ancestral"))
        if x_T is None:
            x_T = randn((batch_size, self.channels, self.image_size, self.image_size), self.betas.device)
        ancestral = spec.ddpm_loop
        return sample_model(self, spec.name, x_T, None if ancestral else ddim_steps,
                            cond=truncate_cond(cond, batch_size),
                            eta=None if ancestral else eta, noise_fn=noise_fn, callback=callback,
                            log_every_t=self.log_every_t if ancestral else 100)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, n_row: int = 4, sample: bool = True,
                   ddim_steps: Optional[int] = 200, ddim_eta: float = 1.0, return_keys: Optional[Sequence[str]] = None,
                   plot_denoise_rows: bool = False, plot_progressive_rows: bool = True,
                   plot_diffusion_rows: bool = True, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Images for the image logger, in [-1, 1]: inputs, reconstruction, conditioning (when image-like),
        diffusion_row, samples (EMA weights; DDIM unless ``ddim_steps`` is None), denoise_row, progressive_row.
        A mask-conditioned model's ``samples`` (and rows) are its unconditional ones, and ``samples_from_masks`` are
        drawn from the inputs' masks. Other CompVis keyword arguments (``split``, ``inpaint``,
        ``quantize_denoised``, ...) are ignored.
        """
        z, c, x, xrec, xc = self.get_input(batch, self.first_stage_key, return_first_stage_outputs=True,
                                           force_c_encode=True, return_original_cond=True, bs=N)
        N, n_row = min(x.shape[0], N), min(x.shape[0], n_row)
        log: dict[str, torch.Tensor] = {"inputs": x, "reconstruction": xrec}
        if self.model.conditioning_key is not None and isimage(xc):
            log["conditioning"] = xc
        if self.mask_condition is not None:
            c = None  # the mask is an optional condition: the samples need none
        if plot_diffusion_rows:
            log["diffusion_row"] = diffusion_row(self, z[:n_row], self.decode_first_stage)
        if sample:
            with self.ema_scope("Plotting"):
                samples, inter = self.sample_log(cond=c, batch_size=N, ddim=ddim_steps is not None,
                                                 ddim_steps=ddim_steps, eta=ddim_eta)
            log["samples"] = self.decode_first_stage(samples)
            if plot_denoise_rows:
                log["denoise_row"] = denoise_grid(self.decode_first_stage, [r[:n_row] for r in inter["x_inter"]])
            log.update(self.log_samples_from_masks(batch, N, ddim_steps, ddim_eta))
        if plot_progressive_rows:
            with self.ema_scope("Plotting Progressives"):
                _, x0_rows = self.sample(cond=c, batch_size=n_row, return_intermediates=True, verbose=False,
                                         record_x0=True)
            log["progressive_row"] = denoise_grid(self.decode_first_stage, x0_rows[1:])
        return {k: v for k, v in log.items() if k in return_keys} if return_keys else log

    @torch.no_grad()
    def log_samples_from_masks(self, batch: Mapping[str, Any], N: int, ddim_steps: Optional[int],
                               ddim_eta: float) -> dict[str, torch.Tensor]:
        """``{"samples_from_masks"}``: a mask-conditioned model's samples of the first ``N`` masks of the batch
        (EMA weights, guidance scale 1); ``{}`` for a model without a mask condition."""
        if self.mask_condition is None:
            return {}
        masks = {self.mask_condition.key: batch[self.mask_condition.key][:N]}
        n = len(masks[self.mask_condition.key])
        cond = self.mask_condition.from_batch(masks, (self.image_size, self.image_size), self.device, False)
        with self.ema_scope("Plotting from masks"):
            samples, _ = self.sample_log(cond=cond, batch_size=n, ddim=ddim_steps is not None,
                                         ddim_steps=ddim_steps, eta=ddim_eta)
        return {"samples_from_masks": self.decode_first_stage(samples)}

