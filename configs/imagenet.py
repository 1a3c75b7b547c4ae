"""The official ShuffleNet V2 ImageNet recipe (megvii's train.py).

    python train.py --config configs/imagenet.py:1.0 --workdir runs/x1_0

The argument after the colon is the width (0.5, 1.0, 1.5 or 2.0; default 1.0). SGD with momentum
0.9, learning rate 0.5 for a global batch of 1024 scaled linearly with the batch, linear decay to
0 over 300,000 steps, weight decay 4e-5 on conv and linear kernels only, label smoothing 0.1,
random-resized crop 224 + flip + color jitter 0.4, evaluation at resize 256 / crop 224.

Sections: `model` (the constructor's options), `data` (dataset and preprocessing), `optim`
(optimizer, schedule, loss), `train` (batch, steps, precision, devices, cadences). Override any
field as `--config.optim.base_learning_rate=0.25`.
"""

import ml_collections


def get_config(width: str = "1.0") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.width = float(width)
    c.model.num_classes = 1000
    c.model.unbiased_running_var = False  # True: PyTorch's running variance in training mode
    # the kernel family (shufflenet_jax.ops.dispatch.KERNELS): "cpp", the C++ CPU kernels in
    # float32 on the CPU (XLA's formulation elsewhere); "xla", XLA's everywhere
    c.model.kernels = "cpp"
    c.model.init_from = ml_collections.FieldReference(None, field_type=str)  # model checkpoint

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "imagenet2012"
    c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.image_size = 224
    c.data.eval_resize = 256
    c.data.crop_scale = (0.08, 1.0)
    c.data.flip = True
    c.data.color_jitter = 0.4
    c.data.skip_corrupt = False
    c.data.worker_count = 8
    c.data.read_threads = 16
    c.data.read_buffer_batches = 4  # decoded ahead per worker (uint8: 154 MB per batch at 1024)
    c.data.prefetch_batches = 2  # on the devices ahead of the step (uint8: 154 MB each at 1024)

    c.optim = ml_collections.ConfigDict()
    c.optim.optimizer = "sgd"
    c.optim.base_learning_rate = 0.5  # for a global batch of `base_batch_size`, scaled linearly
    c.optim.base_batch_size = 1024
    c.optim.schedule = "linear"  # linear decay to 0, or "cosine"
    c.optim.warmup_steps = 0
    c.optim.momentum = 0.9
    c.optim.nesterov = False
    c.optim.weight_decay = 4e-5  # conv and linear kernels only
    c.optim.label_smoothing = 0.1
    c.optim.ema_decay = 0.0  # > 0 keeps an exponential moving average of the weights
    c.optim.grad_accum_steps = 1

    c.train = ml_collections.ConfigDict()
    c.train.seed = 0
    c.train.batch_size = 1024  # global, over all devices and processes
    c.train.eval_batch_size = 1024
    c.train.total_steps = 300_000
    c.train.compute_dtype = "float32"  # or "bfloat16": parameters and BN statistics stay float32
    c.train.num_devices = 0  # 0: every device of every process
    c.train.log_every = 100
    c.train.eval_every = 5000
    c.train.eval_at_end = True
    c.train.checkpoint_every = 2000
    c.train.keep_checkpoints = 3
    return c
