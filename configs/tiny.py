"""Under 8k parameters: BN, a GAP head, rotation and 1-pixel shifts, one-cycle LR (no dropout).

Run:
  MNIST_DIR=../shared/data/mnist python3 scripts/train.py --config configs/tiny.py --workdir runs/tiny
Measured: 7,746 params; score [0.0160, 0.9954]; wall 1 min 20 s (2-core AMD EPYC Zen 4 CPU, BENCHMARKS.md).
Seeds 1-2: 0.9948, 0.9942; 99.4% first at epochs 11, 11 and 12 on seeds 0-2 (seed 0, latest
run: after 54 s of epochs and 3 s of compilation). Seeds 3-5, run only as a check: 0.9946, 0.9947, 0.9945
(six of six at or above 99.4%). Margins are small: the 1-pixel shifts were added when the
native convolution kernel's rounding left seed 0 at 0.9937 without them (learning rate 1.5e-2
chosen on seeds 0-2 before); the batch norms folded into the convs after them rounded
otherwise again (these figures).
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model = "tiny"
    c.batch_size = 128
    c.num_epochs = 15
    c.optimizer = "adam"
    c.learning_rate = 1.5e-2
    c.schedule = "onecycle"
    c.warmup_fraction = 0.25
    c.augment.rotation_deg = 7.0
    c.augment.translation_px = 1.0
    return c
