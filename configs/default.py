"""Default config: the tiny network (under 8k parameters) with its record recipe.

Run:
  MNIST_DIR=../shared/data/mnist python3 scripts/train.py --config configs/default.py --workdir runs/default
Expected: as configs/tiny.py, which this config is.
"""

from configs import tiny


def get_config():
    return tiny.get_config()
