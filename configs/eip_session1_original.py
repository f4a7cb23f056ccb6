"""The course's original first network, exactly: conv3x3-32, relu, conv1x1-10, relu, conv26x26-10,
flatten, softmax. 68,260 parameters; Adam 1e-3, batch 32, 10 epochs, no augmentation.

Run:
  python scripts/train.py --config configs/eip_session1_original.py --workdir runs/original
Expected (the course notebook reported test [0.0764, 0.9829]): see BENCHMARKS.md.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model = "eip_session1_original"
    c.batch_size = 32
    c.num_epochs = 10
    c.optimizer = "adam"
    c.learning_rate = 1e-3
    c.schedule = "constant"
    return c
