"""The offline quickstart: ShuffleNet V2 0.5x on scikit-learn's handwritten digits.

    python -m shufflenet_jax.prepare digits
    python train.py --config configs/digits.py --workdir runs/digits

1,438 training and 359 test images, 8x8 grayscale upsampled to 32x32 (the network downsamples
by 32). No flip (digits are not mirror-symmetric), mild random-resized crops.
"""

import ml_collections

from configs.imagenet import get_config as official


def get_config() -> ml_collections.ConfigDict:
    c = official("0.5")
    c.num_classes = 10
    c.dataset = "digits"
    c.eval_split = "test"
    c.image_size = 32
    c.eval_resize = 32
    c.crop_scale = (0.5, 1.0)
    c.flip = False
    c.color_jitter = 0.0
    c.worker_count = 0
    c.read_threads = 0

    c.batch_size = 64
    c.eval_batch_size = 128
    c.total_steps = 1500
    c.base_learning_rate = 0.1
    c.base_batch_size = 64
    c.schedule = "cosine"
    c.warmup_steps = 50
    c.weight_decay = 5e-5
    c.label_smoothing = 0.1

    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    return c
