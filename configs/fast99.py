"""99% test accuracy as fast as possible on a CPU: a small BN net, one epoch, one-cycle LR.

Run:
  MNIST_DIR=../shared/data/mnist python3 scripts/train.py --config configs/fast99.py --workdir runs/fast99
Measured: 33,338 params; score [0.0237, 0.9924]; wall 9.85 s (2-core Zen 3 CPU, BENCHMARKS.md;
warm compilation cache; 14.6-17.6 s on the first run).
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model = "fast99"
    c.batch_size = 64
    c.num_epochs = 1
    c.optimizer = "adam"
    c.learning_rate = 1e-2
    c.schedule = "onecycle"
    c.warmup_fraction = 0.25
    c.tensorboard = False
    c.keep_checkpoints = 1
    return c
