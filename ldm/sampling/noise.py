"""Per-sample seeding: each sample's start noise and step noise come from its own seed, so a sample does not
depend on the batch it is in, nor on the device. Re-exported by :mod:`ldm.sampling`."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch


def sample_seed(seed: int, index: int, stream: int = 0) -> int:
    """A 63-bit seed for sample ``index`` of a run seeded with ``seed`` (independent streams, no overlap)."""
    return int(np.random.SeedSequence([int(seed), int(index), int(stream)]).generate_state(1, np.uint64)[0] >> 1)


def initial_noise(shape: Sequence[int], seed: int, indices: Sequence[int], device: Optional[torch.device] = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x_T`` for the samples ``indices``: each drawn on the CPU from its own seed, so a sample does not depend
    on the batch it is in, nor on the device."""
    noise = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(sample_seed(seed, i)))
             for i in indices]
    return torch.stack(noise).to(device=device, dtype=dtype)


class SampleNoise:
    """Per-sample step noise: one CPU generator per sample, seeded by ``(seed, index)``, so a sample's noise does
    not depend on the batch it is in, nor on the device. It is a registry sampler's ``noise_fn``; the
    generators advance with every draw, so use a fresh one per sampling call.

    Args:
        seed: the run's seed.
        indices: global sample indices of the batch rows.
    """

    def __init__(self, seed: int, indices: Sequence[int]) -> None:
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, i, stream=1)) for i in indices]
        self._last_step = -1

    def __call__(self, like: torch.Tensor, step: int) -> torch.Tensor:
        if like.shape[0] != len(self.generators):
            raise ValueError(f"SampleNoise was made for {len(self.generators)} samples but asked for a batch of "
                             f"{like.shape[0]}; build it with the indices of exactly this batch")
        if step <= self._last_step:
            raise ValueError(f"SampleNoise asked for step {step} after step {self._last_step}: its generators only "
                             "move forward, so build a new SampleNoise for every sampling call")
        self._last_step = step
        noise = [torch.randn(tuple(like.shape[1:]), generator=g) for g in self.generators]
        return torch.stack(noise).to(device=like.device, dtype=like.dtype)
