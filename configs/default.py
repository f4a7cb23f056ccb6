"""Default config: the tiny network (under 8k parameters) with its record recipe.

Run:
  python scripts/train.py --config configs/default.py --workdir runs/default
Expected: see configs/tiny.py, which this config is.
"""

from configs import tiny


def get_config():
    return tiny.get_config()
