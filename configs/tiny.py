"""Under 8k parameters: BN, a GAP head, rotation and 1-pixel shifts, one-cycle LR (no dropout).

Run:
  MNIST_DIR=../shared/data/mnist python3 scripts/train.py --config configs/tiny.py --workdir runs/tiny
Measured: 7,746 params; score [0.0159, 0.9951]; wall 1 min 0 s (2-core AMD EPYC Zen 4 CPU, BENCHMARKS.md).
Seeds 1-5: 0.9944, 0.9952, 0.9943, 0.9948, 0.9945 (six of six at or above 99.4%); 99.4% first
at epochs 12, 13 and 12 on seeds 0-2 (seed 0: after about 45 s of epochs and 2.5 s of
compilation). Margins are small: the 1-pixel shifts were added when the native convolution
kernel's rounding left seed 0 at 0.9937 without them (learning rate 1.5e-2 chosen on seeds 0-2
before). This session's kernels round otherwise (Winograd; fused multiply-adds in a gradient's
tail); all six seeds were re-run on them (these figures).
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
