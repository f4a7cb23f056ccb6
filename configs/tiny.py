"""Under 8k parameters: BN, small dropout, a GAP head, rotation augmentation, one-cycle LR.

Run:
  python scripts/train.py --config configs/tiny.py --workdir runs/tiny
Expected: see BENCHMARKS.md.
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
