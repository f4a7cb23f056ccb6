"""Train a config: python scripts/train.py --config configs/X.py --workdir DIR [--config.k=v]."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repo's configs/

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cnn import train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, results.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax reports every save at INFO
    try:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except train.USER_ERRORS as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
