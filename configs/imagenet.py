"""The official ShuffleNet V2 ImageNet recipe (megvii's train.py).

    python train.py --config configs/imagenet.py:1.0 --workdir runs/x1_0

The argument after the colon is the width (0.5, 1.0, 1.5 or 2.0; default 1.0). SGD with momentum
0.9, learning rate 0.5 for a global batch of 1024 scaled linearly with the batch, linear decay to
0 over 300,000 steps, weight decay 4e-5 on conv and linear kernels only, label smoothing 0.1,
random-resized crop 224 + flip + color jitter 0.4, evaluation at resize 256 / crop 224.
"""

import ml_collections


def get_config(width: str = "1.0") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.width = float(width)
    c.num_classes = 1000
    c.seed = 0

    c.dataset = "imagenet2012"
    c.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.train_split = "train"
    c.eval_split = "validation"
    c.image_size = 224
    c.eval_resize = 256
    c.crop_scale = (0.08, 1.0)
    c.flip = True
    c.color_jitter = 0.4
    c.skip_corrupt = False
    c.worker_count = 8
    c.read_threads = 16

    c.batch_size = 1024  # global, over all devices and processes
    c.eval_batch_size = 1024
    c.grad_accum_steps = 1
    c.total_steps = 300_000
    c.optimizer = "sgd"
    c.base_learning_rate = 0.5  # for a global batch of `base_batch_size`, scaled linearly
    c.base_batch_size = 1024
    c.schedule = "linear"  # linear decay to 0, or "cosine"
    c.warmup_steps = 0
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 4e-5  # conv and linear kernels only
    c.label_smoothing = 0.1
    c.compute_dtype = "float32"  # or "bfloat16": parameters and BN statistics stay float32
    c.ema_decay = 0.0  # > 0 keeps an exponential moving average of the weights
    c.init_from = ml_collections.FieldReference(None, field_type=str)  # model checkpoint dir

    c.num_devices = 0  # 0: every device of every process
    c.log_every = 100
    c.eval_every = 5000
    c.eval_at_end = True
    c.checkpoint_every = 2000
    c.keep_checkpoints = 3
    return c
