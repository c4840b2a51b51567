"""Dataset sources: each returns the train and test images as uint8 tensors held in memory.

A source knows one on-disk format (or none, for `digits` and `synthetic`). The datamodule carves
the validation split out of `train` and moves everything to the training device once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return int(self.labels.numel())


@dataclass
class Source:
    train: ImageSet
    test: ImageSet
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.train.images.shape[1:]
        return int(c), int(h), int(w)


def resized(source: Source, size: int) -> Source:
    """The same source at size x size (bilinear, uint8): `data.image_size`, e.g. digits at 16 px so that
    no ResNet stage works on 1x1 maps. Unchanged when it already has that size."""
    if source.shape[1:] == (size, size):
        return source

    def scale(images: torch.Tensor) -> torch.Tensor:
        if len(images) == 0:
            return images.new_empty((0, images.shape[1], size, size))
        x = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
        return x.round().clamp(0, 255).to(torch.uint8)

    return Source(ImageSet(scale(source.train.images), source.train.labels),
                  ImageSet(scale(source.test.images), source.test.labels), source.classes)
