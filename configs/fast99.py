"""99% test accuracy as fast as possible on a CPU: a small BN net, one epoch, one-cycle LR.

Run:
  MNIST_DIR=../shared/data/mnist python3 scripts/train.py --config configs/fast99.py --workdir runs/fast99
Measured: 30,946 params; score [0.0254, 0.9917]; wall 13.0 s (2-core AMD EPYC Zen 4 CPU, BENCHMARKS.md;
the median of six runs on the current kernels, 12.5-18.4 s, each with an empty compilation
cache and the native kernel built; the 18.4 s one was the first after a reinstall). Before
them: [0.0265, 0.9923], 13.7 s, the median of five runs, 11.5-14.6 s; earlier code ran
11.1-12.3 s one night and 13.2-14.0 s the next morning here: this VM's speed varies. Before
the native convolution kernel: 12.4 s on a faster Zen 5, 15.0-16.3 s on this Zen 4.
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
