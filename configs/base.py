"""Settings every config starts from; not a run of its own."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "tiny"
    c.seed = 0
    # Data: empty data_dir means $MNIST_DIR, then ~/.cache/cnn/mnist. 0 examples means all.
    c.data_dir = ""
    c.data_source = "idx"
    c.train_examples = 0
    c.test_examples = 0
    # Iterations: batch_size examples per step, ceil(N / batch_size) steps per epoch unless
    # drop_remainder (then floor); the last partial batch is masked, not dropped.
    c.batch_size = 128
    c.num_epochs = 15
    c.drop_remainder = False
    # Optimization.
    c.optimizer = "adam"
    c.learning_rate = 1e-3
    c.schedule = "constant"  # constant | onecycle | cosine
    c.warmup_fraction = 0.3
    c.onecycle_div = 25.0
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 0.0
    c.label_smoothing = 0.0
    c.augment = ml_collections.ConfigDict({"rotation_deg": 0.0, "translation_px": 0.0})
    # Checked when the step is traced: the last layer's receptive field covers the input.
    c.require_full_field = True
    # Execution.
    c.steps_per_dispatch = 128  # training steps per device call (one lax.scan)
    # Larger evaluation batches cost memory (1000: +0.8 GB peak RSS) and are no faster on CPU.
    c.eval_batch_size = 100
    c.keep_checkpoints = 2
    c.compilation_cache = True
    c.compilation_cache_dir = ""  # empty: $CNN_CACHE_DIR/jax or ~/.cache/cnn/jax
    c.progress = True
    c.tensorboard = True
    return c
