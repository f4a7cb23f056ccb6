"""99% test accuracy as fast as possible on a CPU: a small BN net, one epoch, one-cycle LR.

Run:
  python scripts/train.py --config configs/fast99.py --workdir runs/fast99
Expected: see BENCHMARKS.md.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model = "fast99"
    c.batch_size = 128
    c.num_epochs = 1
    c.optimizer = "adam"
    c.learning_rate = 1e-2
    c.schedule = "onecycle"
    c.warmup_fraction = 0.25
    c.tensorboard = False
    c.keep_checkpoints = 1
    return c
