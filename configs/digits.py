"""The offline quickstart: ShuffleNet V2 0.5x on scikit-learn's handwritten digits.

    python -m shufflenet_jax.data.prepare digits
    python train.py --config configs/digits.py --workdir runs/digits

1,438 training and 359 test images, 8x8 grayscale upsampled to 32x32 (the network downsamples
by 32). No flip (digits are not mirror-symmetric), mild random-resized crops.
"""

import ml_collections

from configs.imagenet import get_config as official


def get_config() -> ml_collections.ConfigDict:
    c = official("0.5")
    c.model.num_classes = 10

    c.data.dataset = "digits"
    c.data.eval_split = "test"
    c.data.image_size = 32
    c.data.eval_resize = 32
    c.data.crop_scale = (0.5, 1.0)
    c.data.flip = False
    c.data.color_jitter = 0.0
    c.data.worker_count = 0
    c.data.read_threads = 0

    c.optim.base_learning_rate = 0.1
    c.optim.base_batch_size = 64
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 5e-5
    c.optim.label_smoothing = 0.1

    c.train.batch_size = 64
    c.train.eval_batch_size = 128
    c.train.total_steps = 1500
    c.train.log_every = 50
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 2
    return c
