"""``DataModuleFromConfig``: a LightningDataModule built from CompVis ``data:`` configs."""
from __future__ import annotations

import logging
import random
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_only
from torch.utils.data import DataLoader, Dataset

from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test", "predict")


class WrappedDataset(Dataset):
    """Any object with ``__len__`` and ``__getitem__`` as a torch Dataset.

    Args:
        dataset: the object to wrap.
    """

    def __init__(self, dataset: Any) -> None:
        self.data = dataset

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int) -> Any:
        return self.data[idx]


def worker_init_fn(worker_id: int) -> None:
    """Seed ``random``, NumPy and torch in a DataLoader worker, distinct per worker and per DDP rank."""
    rank = max(int(getattr(rank_zero_only, "rank", 0) or 0), 0)
    seed = (torch.initial_seed() + 1_000_003 * rank) % 2**32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class DataModuleFromConfig(pl.LightningDataModule):
    """Train/validation/test/predict datasets instantiated from ``{target, params}`` configs.

    Args:
        batch_size: batch size of every loader.
        train, validation, test, predict: dataset configs (any may be absent).
        wrap: wrap each dataset in ``WrappedDataset`` (for objects that are not torch Datasets).
        num_workers: DataLoader workers; default ``2 * batch_size`` as CompVis.
        shuffle_test_loader: shuffle the test loader.
        use_worker_init_fn: seed each worker with ``worker_init_fn`` (otherwise Lightning's seeding applies
            when ``seed_everything(workers=True)`` was called, as ``main.py`` does).
        shuffle_val_dataloader: shuffle the validation loader.
        pin_memory: pin host memory (useful on CUDA).
        persistent_workers: keep workers alive between epochs (when ``num_workers > 0``).
    """

    def __init__(self, batch_size: int, train: Optional[Any] = None, validation: Optional[Any] = None,
                 test: Optional[Any] = None, predict: Optional[Any] = None, wrap: bool = False,
                 num_workers: Optional[int] = None, shuffle_test_loader: bool = False,
                 use_worker_init_fn: bool = False, shuffle_val_dataloader: bool = False,
                 pin_memory: bool = False, persistent_workers: bool = True) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"data.params.batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers) if num_workers is not None else 2 * self.batch_size
        self.dataset_configs = {k: v for k, v in zip(SPLITS, (train, validation, test, predict)) if v is not None}
        self.wrap = wrap
        self.use_worker_init_fn = use_worker_init_fn
        self.shuffle_test_loader = shuffle_test_loader
        self.shuffle_val_dataloader = shuffle_val_dataloader
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.datasets: dict[str, Dataset] = {}
        # Lightning looks these hooks up; only splits with a config get one.
        for split, method in (("train", "_train_dataloader"), ("validation", "_val_dataloader"),
                              ("test", "_test_dataloader"), ("predict", "_predict_dataloader")):
            if split in self.dataset_configs:
                setattr(self, method.lstrip("_"), getattr(self, method))

    def has_split(self, split: str) -> bool:
        return split in self.dataset_configs

    def prepare_data(self) -> None:
        """Nothing to download; datasets are built per process in ``setup``."""

    def setup(self, stage: Optional[str] = None) -> None:
        for split, cfg in self.dataset_configs.items():
            if split in self.datasets:
                continue
            dataset = instantiate_from_config(cfg)
            self.datasets[split] = WrappedDataset(dataset) if self.wrap else dataset
            rank_zero_info(f"data: {split} = {type(dataset).__name__} with {len(self.datasets[split])} examples")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup()
        return DataLoader(
            self.datasets[split], batch_size=self.batch_size, num_workers=self.num_workers, shuffle=shuffle,
            worker_init_fn=worker_init_fn if self.use_worker_init_fn else None, pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    def _train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def _val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=self.shuffle_val_dataloader)

    def _test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=self.shuffle_test_loader)

    def _predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)
