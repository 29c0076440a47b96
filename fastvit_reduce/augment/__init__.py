"""On-device batch augmentation: batched timm RandAugment, normalisation, Mixup/CutMix, erasing."""
from .batch import BatchAugment, augment_from_cfg, augment_from_config, normalize
from .randaugment import BatchRandAugment

__all__ = ["BatchAugment", "BatchRandAugment", "augment_from_cfg", "augment_from_config",
           "normalize"]
