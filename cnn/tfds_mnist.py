"""Offline tensorflow-datasets builder for MNIST from the four original gzip files.

``CnnMnist`` (registered as ``"cnn_mnist"``) reads the files from tfds' ``manual_dir``, checks
them against :data:`cnn.data.MNIST_CHECKSUMS`, parses them with NumPy and writes array_record
files; :func:`load` reads them back with ``tfds.data_source``. No TensorFlow needed. Import this
module only when tensorflow-datasets is wanted (``cnn.data.load_mnist(source="tfds")`` does).

Online alternative (needs network, and TensorFlow for the stock builder's default format)::

    tfds.data_source("mnist", data_dir=...)  # downloads from storage.googleapis.com itself
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from cnn import data as _data

__all__ = ["CnnMnist", "load"]


class CnnMnist(tfds.core.GeneratorBasedBuilder):
    """MNIST from the four gzip'd IDX files in ``manual_dir``, in file order."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Offline build from the original IDX gzip files."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place the four MNIST gzip files ("
        + ", ".join(n for pair in _data.MNIST_FILES.values() for n in pair)
        + f") from {_data.MNIST_URL} in manual_dir."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="MNIST digits (LeCun et al.), built offline from the IDX files.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=(*_data.IMAGE_SHAPE, 1),
                        dtype=np.uint8,
                        encoding=tfds.features.Encoding.BYTES,
                    ),
                    "label": tfds.features.ClassLabel(num_classes=_data.NUM_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="http://yann.lecun.com/exdb/mnist/",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        folder = pathlib.Path(dl_manager.manual_dir)
        raw = _data._read_split_files(folder, _data.MNIST_FILES, _data.MNIST_CHECKSUMS)
        return {
            split: self._generate_examples(raw[split], _data.MNIST_FILES[split])
            for split in _data.MNIST_FILES
        }

    def _generate_examples(self, raw, names):
        images, labels = _data._parse_split(*raw, names=names)
        for i in range(len(labels)):
            yield i, {"image": images[i], "label": int(labels[i])}


def load(manual_dir: str | os.PathLike, data_dir: str | os.PathLike) -> _data.Splits:
    """Prepare (once) and read back MNIST via tfds; same dict format as cnn.data.load_mnist.

    ``manual_dir`` holds the four gzip files (verified on every call, before tfds runs);
    ``data_dir`` is tfds' own folder for the prepared array_record files (a writable cache).
    """
    _data._read_split_files(pathlib.Path(manual_dir), _data.MNIST_FILES, _data.MNIST_CHECKSUMS)
    sources = tfds.data_source(
        CnnMnist.name,
        data_dir=os.fspath(data_dir),
        builder_kwargs={"file_format": "array_record"},
        download_and_prepare_kwargs={
            "download_config": tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)),
        },
    )
    out = {}
    for split in _data.MNIST_FILES:
        ds = sources[split]
        examples = ds.__getitems__(range(len(ds)))
        images = np.stack([ex["image"] for ex in examples]).astype(np.uint8, copy=False)
        labels = np.fromiter((ex["label"] for ex in examples), np.int32, len(examples))
        out[split] = (images, labels)
    return out
