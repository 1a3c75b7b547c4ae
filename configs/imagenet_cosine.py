"""The ImageNet recipe with cosine decay after a linear warm-up (5 epochs at batch 1024).

python train.py --config configs/imagenet_cosine.py:1.0 --workdir runs/x1_0_cosine
"""

import ml_collections

from configs.imagenet import get_config as official


def get_config(width: str = "1.0") -> ml_collections.ConfigDict:
    c = official(width)
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 6_255  # 5 epochs of 1,281,167 images at batch 1024
    return c
