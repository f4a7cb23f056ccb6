"""The improved first DNN: stacked 3x3 convolutions, a max-pool and a 1x1 channel reduction once
the receptive field has grown, ReLU, softmax, no dense layer. Same recipe as the original: Adam
1e-3, batch 32, 10 epochs, no augmentation.

Run:
  python scripts/train.py --config configs/eip_session1.py --workdir runs/eip_session1
Expected: see BENCHMARKS.md.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model = "eip_session1"
    c.batch_size = 32
    c.num_epochs = 10
    c.optimizer = "adam"
    c.learning_rate = 1e-3
    c.schedule = "constant"
    return c
