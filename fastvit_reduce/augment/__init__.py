"""On-device batch augmentation: ``batch`` (normalise, erasing, Mixup/CutMix, the train transform),
``randaugment`` (timm's RandAugment on a batch) and ``spec`` (timm's spec strings, torch-free)."""
