"""99% test accuracy as fast as possible on a CPU: a small BN net, one epoch, one-cycle LR.

Run:
  MNIST_DIR=../shared/data/mnist python3 scripts/train.py --config configs/fast99.py --workdir runs/fast99
Measured: 30,946 params; score [0.0275, 0.9917]; wall 12.4 s (2-core AMD EPYC Zen 5 CPU, BENCHMARKS.md;
empty compilation cache; 12.4-15.8 s over 8 first runs of seeds 0-2 in a slow phase of the
machine, 8.9-10.6 s on later runs). On a slower 2-core Zen 4 (2026-11-30): [0.0280, 0.9911]
(other bits than on Zen 5), wall 15.0-16.3 s.
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
