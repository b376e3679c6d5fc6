"""What a training run feeds the model: its dataset folders split into training and validation
samples, the training images as augmented random crops, and the batches drawn from them (shuffled,
sharded between processes under DDP, or weighted by dataset folder).

The images, masks and transforms themselves are ``training.data``'s; this module adds torch's
Dataset, Sampler and DataLoader around them.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from training import data as ds
from training.config import TrainConfig

log = logging.getLogger(__name__)


def load_folders(cfg: TrainConfig) -> tuple[list[ds.Sample], list[ds.Sample]]:
    """(training samples, validation samples) of the run's dataset folders: each folder's
    training ids with a validation share carved from them (``val_fraction``, ``seed``)."""
    if not cfg.data:
        raise ds.DatasetError("no dataset folders: give --data DIR (or 'data:' in the config)")
    train, val = [], []
    for folder in cfg.data:
        train_ids, val_ids = ds.train_val_split(folder, cfg.val_fraction, cfg.seed)
        train += ds.samples(folder, train_ids)
        val += ds.samples(folder, val_ids)
        log.info("%s: %d train, %d validation images", folder, len(train_ids), len(val_ids))
    return train, val


class CrackCrops(torch.utils.data.Dataset):
    """In-memory (image, mask) pairs, served as augmented random crops of side ``crop`` (set it
    between epochs for progressive resizing). Binary masks come out as float (1, H, W), class
    masks as int64 (H, W), as the losses expect. An epoch is ``cfg.epoch_images`` crops when set
    (the images cycled), else one crop of every image."""

    def __init__(self, pairs: list[tuple[np.ndarray, np.ndarray]], crop: int, mean, std,
                 seed: int, cfg: TrainConfig | None = None) -> None:
        self.pairs, self.crop, self.mean, self.std = pairs, crop, mean, std
        self.rng = np.random.default_rng(seed)
        self.cfg = cfg or TrainConfig()

    def __len__(self) -> int:
        return self.cfg.epoch_images or len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"crop {index} of an epoch of {len(self)}")
        cfg = self.cfg
        image, mask = ds.augment(*self.pairs[index % len(self.pairs)], self.crop, self.rng,
                                 max_rotation=cfg.max_rotation, elastic_sigma=cfg.elastic_sigma,
                                 elastic_grid=cfg.elastic_grid, border=cfg.border,
                                 scale_range=cfg.scale_range,
                                 contrast_range=cfg.contrast_range, gamma_range=cfg.gamma_range,
                                 crack_label=cfg.crack_label)
        if cfg.distractor_p and self.rng.random() < cfg.distractor_p:
            from training.lining import paste_distractors

            image, mask = paste_distractors(image, mask, self.rng, cfg.num_classes)
        target = (torch.from_numpy(mask[None].astype(np.float32)) if cfg.num_classes == 1
                  else torch.from_numpy(mask.astype(np.int64)))
        return torch.from_numpy(ds.normalize(image, self.mean, self.std)), target


def sampling_weights(datasets: list[str], rule: str) -> list[float]:
    """Per-image draw weights so each dataset folder is drawn in proportion to its number of
    images ("proportional"), to the square root of it ("sqrt") or equally ("balanced")."""
    sizes = {name: datasets.count(name) for name in set(datasets)}
    power = {"proportional": 1.0, "sqrt": 0.5, "balanced": 0.0}[rule]
    return [sizes[name] ** power / sizes[name] for name in datasets]


class WeightedShardSampler(torch.utils.data.Sampler):
    """``draws`` (default ``len(weights)``) indices per epoch drawn with replacement by
    ``weights``, the same draw in every process (seeded by seed and epoch), each process taking
    its ``rank::world`` share."""

    def __init__(self, weights: list[float], rank: int, world: int, seed: int,
                 draws: int | None = None) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.rank, self.world, self.seed, self.epoch = rank, world, seed, 0
        self.draws = draws or len(weights)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        draw = torch.multinomial(self.weights, self.draws, True, generator=generator)
        return iter(draw[self.rank::self.world].tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self.draws, self.world))


def make_loader(cfg: TrainConfig, crops: CrackCrops, rank: int, world: int,
                device: torch.device, datasets: list[str] | None = None):
    """(loader, sampler): shuffled batches, or this process's shard of them under DDP (sampler
    None outside DDP); with ``cfg.sampling`` other than proportional, images are drawn by their
    dataset's weight (``datasets``: each training image's folder name). The last short batch is
    dropped when there is more than one batch, as batch norm cannot learn from a batch of one."""
    if cfg.sampling != "proportional" and datasets:
        sampler = WeightedShardSampler(sampling_weights(datasets, cfg.sampling), rank, world,
                                       cfg.seed, len(crops))
    else:
        sampler = (torch.utils.data.DistributedSampler(crops, world, rank, shuffle=True,
                                                       seed=cfg.seed) if world > 1 else None)
    per_process = math.ceil(len(crops) / world)
    loader = torch.utils.data.DataLoader(
        crops, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
        drop_last=per_process > cfg.batch_size, pin_memory=device.type == "cuda")
    return loader, sampler
