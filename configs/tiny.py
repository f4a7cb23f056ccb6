"""Under 8k parameters: BN, small dropout, a GAP head, rotation augmentation, one-cycle LR.

Run:
  MNIST_DIR=../shared/data/mnist python3 scripts/train.py --config configs/tiny.py --workdir runs/tiny
Measured: 6,554 params; score [0.0182, 0.9940]; wall 2 min 33 s (2-core Zen 3 CPU, BENCHMARKS.md).
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model = "tiny"
    c.batch_size = 128
    c.num_epochs = 15
    c.optimizer = "adam"
    c.learning_rate = 1e-2
    c.schedule = "onecycle"
    c.warmup_fraction = 0.25
    c.augment.rotation_deg = 7.0
    return c
