"""MNIST loading (verified IDX files, cached arrays, optional tfds) and epoch batching.

Offline use (the default): put the four original gzip files in one folder and call
``load_mnist()``. The folder is, in order: the ``data_dir`` argument (if given, only it is
looked at), else env ``MNIST_DIR``, else ``~/.cache/cnn/mnist``. Every file is checked by size
and SHA-256 against the values tensorflow-datasets records for MNIST before it is parsed.

Online use (getting the files once)::

    mkdir -p ~/.cache/cnn/mnist && cd ~/.cache/cnn/mnist && for f in train-images-idx3-ubyte \\
      train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do \\
      curl -fLO https://storage.googleapis.com/cvdf-datasets/mnist/$f.gz; done

or, with tensorflow-datasets and network access, ``tfds.data_source("mnist")`` downloads the
same four files itself (into its own ``~/tensorflow_datasets``); this module never downloads.

Decoded arrays are cached as an uncompressed ``.npz`` in ``$CNN_CACHE_DIR/arrays`` (default
``~/.cache/cnn/arrays``), keyed by the files' checksums and written atomically; a bad cache file is
detected and rebuilt. ``source="tfds"`` reads the same four files through a small offline
tensorflow-datasets builder (:mod:`cnn.tfds_mnist`, array_record format, no TensorFlow needed)
prepared once into ``$CNN_CACHE_DIR/tfds``.

Batching: :func:`steps_per_epoch` / :func:`total_steps` are the one place step counts are
computed; :func:`epoch_indices` gives a per-(seed, epoch) permutation as (steps, batch) index
and mask arrays; :func:`iterate_batches` is a plain Python loop over them.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import operator
import os
import pathlib
import warnings
import zlib
from collections.abc import Iterator, Mapping

import numpy as np

from cnn.files import atomic_write, cache_dir

__all__ = [
    "MNIST_URL",
    "MNIST_FILES",
    "MNIST_CHECKSUMS",
    "IMAGE_SHAPE",
    "NUM_CLASSES",
    "MnistNotFoundError",
    "MnistFileError",
    "MnistChecksumError",
    "MnistFormatError",
    "default_data_dir",
    "cache_dir",
    "load_mnist",
    "steps_per_epoch",
    "total_steps",
    "epoch_indices",
    "iterate_batches",
]

MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"

# split -> (images file, labels file)
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# file -> (size in bytes, sha256): tensorflow_datasets/url_checksums/mnist.txt (tfds 4.9.10).
MNIST_CHECKSUMS: dict[str, tuple[int, str]] = {
    "train-images-idx3-ubyte.gz": (
        9912422,
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    ),
    "train-labels-idx1-ubyte.gz": (
        28881,
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    ),
    "t10k-images-idx3-ubyte.gz": (
        1648877,
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    ),
    "t10k-labels-idx1-ubyte.gz": (
        4542,
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    ),
}

IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
_IMAGES_MAGIC = 2051  # 0x00000803: ubyte, 3 dims
_LABELS_MAGIC = 2049  # 0x00000801: ubyte, 1 dim
_CACHE_FORMAT = 1  # bump when the cached array layout changes

Splits = dict[str, tuple[np.ndarray, np.ndarray]]


class MnistNotFoundError(FileNotFoundError):
    """The MNIST files are in none of the folders looked at."""


class MnistFileError(ValueError):
    """An MNIST file is present but not the expected one (base class)."""


class MnistChecksumError(MnistFileError):
    """A file's size or SHA-256 differs from the recorded value."""


class MnistFormatError(MnistFileError):
    """A file is not a valid gzip'd IDX file of the expected kind."""


# --------------------------------------------------------------------------- locating files


def default_data_dir() -> pathlib.Path:
    """The documented default folder for the raw files: ``~/.cache/cnn/mnist``."""
    return pathlib.Path.home() / ".cache" / "cnn" / "mnist"


def _how_to_get(names: list[str]) -> str:
    urls = "\n".join(f"  {MNIST_URL}{n}" for n in names)
    cmd = (
        f"mkdir -p {default_data_dir()} && cd {default_data_dir()} && for f in "
        + " ".join(names)
        + f"; do curl -fLO {MNIST_URL}$f; done"
    )
    return (
        f"Get the files from:\n{urls}\ne.g.:\n  {cmd}\n"
        "then pass data_dir=... or set MNIST_DIR to their folder. "
        "(With network access, tensorflow-datasets' tfds.data_source('mnist') downloads the "
        "same files.)"
    )


def _candidates(data_dir: str | os.PathLike | None) -> list[tuple[str, pathlib.Path]]:
    if data_dir is not None:
        return [("data_dir argument", pathlib.Path(data_dir).expanduser())]
    out = []
    env = os.environ.get("MNIST_DIR")
    if env:
        out.append(("env MNIST_DIR", pathlib.Path(env).expanduser()))
    out.append(("default", default_data_dir()))
    return out


def _find_dir(data_dir: str | os.PathLike | None, names: list[str]) -> pathlib.Path:
    """First candidate folder holding all ``names``, else one MnistNotFoundError."""
    looked = []
    for why, folder in _candidates(data_dir):
        missing = [n for n in names if not (folder / n).is_file()]
        if not missing:
            return folder
        if len(missing) == len(names):
            looked.append(f"  {folder} ({why}): no MNIST files")
        else:
            looked.append(f"  {folder} ({why}): missing {', '.join(missing)}")
    raise MnistNotFoundError(
        "MNIST files not found. Looked in:\n" + "\n".join(looked) + "\n" + _how_to_get(names)
    )


# --------------------------------------------------------------------------- verify and parse


def _read_verified(path: pathlib.Path, size: int, sha256: str) -> bytes:
    """The file's bytes, after checking its size and SHA-256."""
    actual_size = path.stat().st_size
    fix = (
        f"Delete it and fetch it again from {MNIST_URL}{path.name} "
        "(sha256sum it against the expected value)."
    )
    if actual_size != size:
        raise MnistChecksumError(
            f"{path}: size {actual_size} bytes, expected {size} "
            f"({'truncated' if actual_size < size else 'too long'}). {fix}"
        )
    raw = path.read_bytes()
    actual = hashlib.sha256(raw).hexdigest()
    if actual != sha256:
        raise MnistChecksumError(
            f"{path}: checksum mismatch: sha256 {actual}, expected {sha256} "
            f"(size {actual_size} as expected). {fix}"
        )
    return raw


def _parse_idx(raw_gz: bytes, *, magic: int, name: str) -> np.ndarray:
    """Decode one gzip'd IDX file (ubyte data) into an array shaped by its header."""
    try:
        raw = gzip.decompress(raw_gz)
    except (OSError, EOFError, zlib.error) as e:
        raise MnistFormatError(f"{name}: not a valid gzip file ({e}).") from e
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < 4:
        raise MnistFormatError(f"{name}: {len(raw)} bytes, too short for an IDX header.")
    actual_magic = int.from_bytes(raw[:4], "big")
    if actual_magic != magic:
        raise MnistFormatError(
            f"{name}: IDX magic number {actual_magic}, expected {magic} "
            f"({'images' if magic == _IMAGES_MAGIC else 'labels'} file)."
        )
    if len(raw) < header:
        raise MnistFormatError(f"{name}: {len(raw)} bytes, too short for a {ndim}-d IDX header.")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise MnistFormatError(
            f"{name}: header dims {dims} need {expected} bytes, file has {len(raw)}."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _parse_split(images_gz: bytes, labels_gz: bytes, names: tuple[str, str]):
    """(images uint8 (N,28,28,1), labels int32 (N,)) from the two verified files."""
    images_NHW = _parse_idx(images_gz, magic=_IMAGES_MAGIC, name=names[0])
    labels_N = _parse_idx(labels_gz, magic=_LABELS_MAGIC, name=names[1])
    if images_NHW.shape[1:] != IMAGE_SHAPE:
        raise MnistFormatError(
            f"{names[0]}: images are {images_NHW.shape[1:]}, expected {IMAGE_SHAPE}."
        )
    if labels_N.shape[0] != images_NHW.shape[0]:
        raise MnistFormatError(
            f"{names[0]} has {images_NHW.shape[0]} images but {names[1]} has "
            f"{labels_N.shape[0]} labels."
        )
    if labels_N.size and int(labels_N.max()) >= NUM_CLASSES:
        raise MnistFormatError(f"{names[1]}: label {int(labels_N.max())} is not a digit 0-9.")
    return images_NHW[..., None], labels_N.astype(np.int32)


def _read_split_files(
    folder: pathlib.Path,
    files: Mapping[str, tuple[str, str]],
    checksums: Mapping[str, tuple[int, str]],
) -> dict[str, tuple[bytes, bytes]]:
    """Verified raw bytes of every file; raises before anything is parsed."""
    out = {}
    for split, names in files.items():
        out[split] = tuple(_read_verified(folder / n, *checksums[n]) for n in names)
    return out


def _cache_key(
    files: Mapping[str, tuple[str, str]], checksums: Mapping[str, tuple[int, str]]
) -> str:
    h = hashlib.sha256(f"cnn-mnist-cache-v{_CACHE_FORMAT}".encode())
    for split in sorted(files):
        for n in files[split]:
            size, sha = checksums[n]
            h.update(f"|{split}:{n}:{size}:{sha}".encode())
    return h.hexdigest()[:20]


def _load_cache(path: pathlib.Path, splits: list[str]) -> Splits | None:
    """Cached arrays, or None when missing or unreadable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {s: (z[f"{s}_images"], z[f"{s}_labels"]) for s in splits}
        for s, (x, y) in out.items():
            ok = (
                x.dtype == np.uint8
                and x.ndim == 4
                and x.shape[1:] == (*IMAGE_SHAPE, 1)
                and y.dtype == np.int32
                and y.shape == (x.shape[0],)
            )
            if not ok:
                raise ValueError(f"bad arrays for split {s!r}: {x.shape} {x.dtype}, {y.dtype}")
        return out
    except Exception as e:  # noqa: BLE001 - any unreadable cache is rebuilt
        warnings.warn(f"MNIST cache {path} is unreadable ({e!r}); rebuilding it.", stacklevel=3)
        return None


def _save_cache(path: pathlib.Path, data: Splits) -> None:
    """Write atomically (files.atomic_write); warn on failure."""
    arrays = {}
    for s, (x, y) in data.items():
        arrays[f"{s}_images"], arrays[f"{s}_labels"] = x, y
    try:
        atomic_write(path, lambda f: np.savez(f, **arrays))
    except OSError as e:
        warnings.warn(f"could not write MNIST cache {path}: {e}", stacklevel=3)


def _load_idx_dir(
    data_dir: str | os.PathLike,
    files: Mapping[str, tuple[str, str]] = MNIST_FILES,
    checksums: Mapping[str, tuple[int, str]] = MNIST_CHECKSUMS,
    cache: bool = True,
) -> Splits:
    """Verify, parse (or load from cache) the IDX files of ``data_dir`` for each split.

    ``files``/``checksums`` default to real MNIST; tests pass tables for tiny synthetic files.
    """
    folder = pathlib.Path(data_dir)
    raw = _read_split_files(folder, files, checksums)  # verifies all before parsing or caching
    # Not cache_dir()/"mnist": that is the default folder of the raw files.
    path = cache_dir() / "arrays" / f"mnist-idx-{_cache_key(files, checksums)}.npz"
    if cache:
        cached = _load_cache(path, list(files))
        if cached is not None:
            return cached
    data = {s: _parse_split(*raw[s], names=files[s]) for s in files}
    if cache:
        _save_cache(path, data)
    return data


def load_mnist(data_dir: str | os.PathLike | None = None, source: str = "idx") -> Splits:
    """MNIST as ``{"train": (images, labels), "test": (images, labels)}``.

    images: np.uint8 (N, 28, 28, 1); labels: np.int32 (N,); N = 60000 / 10000.
    ``source="idx"`` parses the gzip'd IDX files with NumPy (cached); ``source="tfds"`` reads
    the same files through tensorflow-datasets (array_record, offline; see cnn.tfds_mnist).
    Raises MnistNotFoundError (lists where it looked) or MnistFileError (bad file).
    """
    if source not in ("idx", "tfds"):
        raise ValueError(f"unknown source {source!r}; expected 'idx' or 'tfds'.")
    names = [n for pair in MNIST_FILES.values() for n in pair]
    folder = _find_dir(data_dir, names)
    if source == "idx":
        return _load_idx_dir(folder)
    from cnn import tfds_mnist  # lazy: tensorflow-datasets is optional

    return tfds_mnist.load(folder, data_dir=cache_dir() / "tfds")


# --------------------------------------------------------------------------- batching


def _pos_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}.")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}.") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return value


def steps_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool) -> int:
    """Batches per epoch: floor(n/b) with drop_remainder, else ceil(n/b) (last one padded)."""
    n = _pos_int("num_examples", num_examples)
    b = _pos_int("batch_size", batch_size)
    if drop_remainder:
        if n < b:
            raise ValueError(
                f"num_examples={n} < batch_size={b} with drop_remainder=True gives 0 steps; "
                "use a smaller batch or drop_remainder=False."
            )
        return n // b
    return -(-n // b)


def total_steps(num_examples: int, batch_size: int, num_epochs: int, drop_remainder: bool) -> int:
    """Steps over ``num_epochs`` epochs (each epoch has steps_per_epoch steps)."""
    e = _pos_int("num_epochs", num_epochs, minimum=0)
    return e * steps_per_epoch(num_examples, batch_size, drop_remainder)


def epoch_indices(
    seed: int, epoch: int, num_examples: int, batch_size: int, drop_remainder: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(idx (steps, batch) int32, mask (steps, batch) float32) for one epoch.

    The permutation is deterministic from (seed, epoch). With drop_remainder=False the last
    batch is padded with valid indices (from the start of the permutation) whose mask is 0.
    """
    seed = _pos_int("seed", seed, minimum=0)
    epoch = _pos_int("epoch", epoch, minimum=0)
    steps = steps_per_epoch(num_examples, batch_size, drop_remainder)
    n, b = num_examples, batch_size
    perm_N = np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)
    mask = np.ones(steps * b, np.float32)
    if drop_remainder:
        flat = perm_N[: steps * b]
    else:
        pad = steps * b - n
        flat = np.concatenate([perm_N, perm_N[:pad]])
        mask[n:] = 0.0
    return flat.reshape(steps, b), mask.reshape(steps, b)


def iterate_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    drop_remainder: bool,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield {"image", "label", "mask"} batches of one epoch (see :func:`epoch_indices`)."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels.")
    idx, mask = epoch_indices(seed, epoch, len(images), batch_size, drop_remainder)
    for idx_B, mask_B in zip(idx, mask, strict=True):
        yield {"image": images[idx_B], "label": labels[idx_B], "mask": mask_B}
