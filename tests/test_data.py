"""cnn.data: verified IDX loading, cache, tfds source, batching."""

import gzip
import hashlib
import os
import pathlib
import time
import warnings

import numpy as np
import pytest

from cnn import data

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

FILES = {"train": ("tr-img.gz", "tr-lbl.gz"), "test": ("te-img.gz", "te-lbl.gz")}


# --------------------------------------------------------------------------- synthetic IDX


def idx_bytes(arr: np.ndarray, magic: int, dims=None) -> bytes:
    """Raw IDX bytes (ubyte) with the given magic and header dims (default: arr.shape)."""
    dims = arr.shape if dims is None else dims
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    return header + arr.astype(np.uint8).tobytes()


def write(folder: pathlib.Path, name: str, raw: bytes, *, compress: bool = True) -> None:
    (folder / name).write_bytes(gzip.compress(raw, mtime=0) if compress else raw)


def table_for(folder: pathlib.Path) -> dict[str, tuple[int, str]]:
    """Checksum table matching whatever files are in folder."""
    out = {}
    for pair in FILES.values():
        for n in pair:
            raw = (folder / n).read_bytes()
            out[n] = (len(raw), hashlib.sha256(raw).hexdigest())
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch) -> pathlib.Path:
    c = tmp_path / "cache"
    monkeypatch.setenv("CNN_CACHE_DIR", str(c))
    return c


@pytest.fixture
def synth(tmp_path):
    """A folder of tiny good IDX files: 7 train, 3 test examples. Returns (folder, arrays)."""
    folder = tmp_path / "idx"
    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 7), ("test", 3)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, (n,), dtype=np.uint8)
        write(folder, FILES[split][0], idx_bytes(x, 2051))
        write(folder, FILES[split][1], idx_bytes(y, 2049))
        arrays[split] = (x, y)
    return folder, arrays


def cached_files(cache_root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(cache_root.rglob("*")) if cache_root.exists() else []


def test_synthetic_good_files_parse_and_cache(synth, cache, monkeypatch):
    folder, arrays = synth
    table = table_for(folder)
    out = data._load_idx_dir(folder, files=FILES, checksums=table)
    assert set(out) == {"train", "test"}
    for split, (x, y) in arrays.items():
        images, labels = out[split]
        assert images.dtype == np.uint8 and images.shape == (len(x), 28, 28, 1)
        assert labels.dtype == np.int32 and labels.shape == (len(x),)
        np.testing.assert_array_equal(images[..., 0], x)
        np.testing.assert_array_equal(labels, y)
    npz = [p for p in cached_files(cache) if p.suffix == ".npz"]
    assert len(npz) == 1 and not [p for p in cached_files(cache) if p.suffix == ".tmp"]

    # Warm: served from the cache, no parsing.
    def no_parse(*a, **k):
        raise AssertionError("parsed although cached")

    monkeypatch.setattr(data, "_parse_split", no_parse)
    warm = data._load_idx_dir(folder, files=FILES, checksums=table)
    for split in arrays:
        np.testing.assert_array_equal(warm[split][0], out[split][0])
        np.testing.assert_array_equal(warm[split][1], out[split][1])


def test_cache_key_follows_checksums(synth, cache):
    folder, _ = synth
    table = table_for(folder)
    data._load_idx_dir(folder, files=FILES, checksums=table)
    # New content (same layout) -> new checksums -> a second cache entry, new data.
    x = np.full((7, 28, 28), 9, np.uint8)
    write(folder, FILES["train"][0], idx_bytes(x, 2051))
    out = data._load_idx_dir(folder, files=FILES, checksums=table_for(folder))
    assert (out["train"][0] == 9).all()
    assert len([p for p in cached_files(cache) if p.suffix == ".npz"]) == 2


@pytest.mark.parametrize(
    "damage",
    ["truncate", "garbage", "flip_bits", "wrong_arrays"],
)
def test_corrupt_cache_is_rebuilt(synth, cache, damage):
    folder, arrays = synth
    table = table_for(folder)
    data._load_idx_dir(folder, files=FILES, checksums=table)
    (npz,) = [p for p in cached_files(cache) if p.suffix == ".npz"]
    raw = npz.read_bytes()
    if damage == "truncate":
        npz.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        npz.write_bytes(b"not a zip file at all")
    elif damage == "flip_bits":  # inside the array payload: caught by the zip CRC
        b = bytearray(raw)
        b[len(b) // 2] ^= 0xFF
        npz.write_bytes(bytes(b))
    else:  # a readable npz with the wrong contents
        np.savez(npz, train_images=np.zeros(3, np.float64))
    with pytest.warns(UserWarning, match="unreadable.*rebuilding"):
        out = data._load_idx_dir(folder, files=FILES, checksums=table)
    np.testing.assert_array_equal(out["train"][0][..., 0], arrays["train"][0])
    with np.load(npz) as z:
        np.testing.assert_array_equal(z["test_labels"], arrays["test"][1].astype(np.int32))
    with warnings.catch_warnings():  # the rebuilt cache is good again: no warning now
        warnings.simplefilter("error")
        data._load_idx_dir(folder, files=FILES, checksums=table)


def test_interrupted_cache_write_leaves_no_cache(synth, cache, monkeypatch):
    folder, arrays = synth
    table = table_for(folder)

    def killed_savez(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the write

    monkeypatch.setattr(data.np, "savez", killed_savez)
    with pytest.raises(KeyboardInterrupt):
        data._load_idx_dir(folder, files=FILES, checksums=table)
    _check_nothing_cached(cache)  # neither a final file nor the temp file
    monkeypatch.undo()
    monkeypatch.setenv("CNN_CACHE_DIR", str(cache))
    out = data._load_idx_dir(folder, files=FILES, checksums=table)
    np.testing.assert_array_equal(out["test"][1], arrays["test"][1])
    assert len([p for p in cached_files(cache) if p.suffix == ".npz"]) == 1


def test_unwritable_cache_warns_and_still_loads(synth, tmp_path, monkeypatch):
    folder, arrays = synth
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    monkeypatch.setenv("CNN_CACHE_DIR", str(not_a_dir))
    with pytest.warns(UserWarning, match="could not write MNIST cache"):
        out = data._load_idx_dir(folder, files=FILES, checksums=table_for(folder))
    np.testing.assert_array_equal(out["train"][1], arrays["train"][1])


def _check_nothing_cached(cache: pathlib.Path) -> None:
    assert not [p for p in cached_files(cache) if p.is_file()]


def test_truncated_file(synth, cache):
    folder, _ = synth
    table = table_for(folder)
    name = FILES["train"][0]
    raw = (folder / name).read_bytes()
    (folder / name).write_bytes(raw[:-100])
    msg = rf"{name}: size {len(raw) - 100} bytes, expected {len(raw)} \(truncated\)"
    with pytest.raises(data.MnistChecksumError, match=msg) as e:
        data._load_idx_dir(folder, files=FILES, checksums=table)
    assert isinstance(e.value, ValueError) and "fetch it again" in str(e.value)
    _check_nothing_cached(cache)


def test_wrong_checksum(synth, cache):
    folder, _ = synth
    table = table_for(folder)
    name = FILES["test"][1]
    raw = bytearray((folder / name).read_bytes())
    raw[-9] ^= 1  # same size, different content
    (folder / name).write_bytes(bytes(raw))
    actual = hashlib.sha256(bytes(raw)).hexdigest()
    msg = rf"{name}: checksum mismatch: sha256 {actual}, expected {table[name][1]}"
    with pytest.raises(data.MnistChecksumError, match=msg):
        data._load_idx_dir(folder, files=FILES, checksums=table)
    _check_nothing_cached(cache)


def test_missing_file_in_table_folder(synth, cache):
    folder, _ = synth
    table = table_for(folder)
    (folder / FILES["test"][0]).unlink()
    with pytest.raises(FileNotFoundError):
        data._load_idx_dir(folder, files=FILES, checksums=table)
    _check_nothing_cached(cache)


def _broken(folder, split, which, raw, *, compress=True):
    write(folder, FILES[split][which], raw, compress=compress)
    return table_for(folder)  # checksums match the broken file: the parser must catch it


@pytest.mark.parametrize(
    "case, match",
    [
        ("images_magic", r"tr-img.gz: IDX magic number 2049, expected 2051 \(images file\)"),
        ("labels_magic", r"te-lbl.gz: IDX magic number 2051, expected 2049 \(labels file\)"),
        ("dims", r"tr-img.gz: images are \(27, 28\), expected \(28, 28\)"),
        ("count_header", r"tr-img.gz: header dims \(8, 28, 28\) need 6288 bytes, file has 5504"),
        ("extra_bytes", r"te-lbl.gz: header dims \(3,\) need 11 bytes, file has 12"),
        ("short_header", r"tr-img.gz: 6 bytes, too short for a 3-d IDX header"),
        ("not_gzip", r"tr-img.gz: not a valid gzip file"),
        ("label_mismatch", r"tr-img.gz has 7 images but tr-lbl.gz has 6 labels"),
        ("label_range", r"te-lbl.gz: label 10 is not a digit 0-9"),
    ],
)
def test_broken_idx(synth, cache, case, match):
    folder, arrays = synth
    x, y = arrays["train"]
    if case == "images_magic":
        table = _broken(folder, "train", 0, idx_bytes(x, 2049, dims=(x.size,)))
    elif case == "labels_magic":
        table = _broken(folder, "test", 1, idx_bytes(np.zeros((3, 1, 1)), 2051))
    elif case == "dims":
        table = _broken(folder, "train", 0, idx_bytes(x[:, :27], 2051))
    elif case == "count_header":
        table = _broken(folder, "train", 0, idx_bytes(x, 2051, dims=(8, 28, 28)))
    elif case == "extra_bytes":
        table = _broken(folder, "test", 1, idx_bytes(np.arange(4), 2049, dims=(3,)))
    elif case == "short_header":
        table = _broken(folder, "train", 0, idx_bytes(x, 2051)[:6])
    elif case == "not_gzip":
        table = _broken(folder, "train", 0, idx_bytes(x, 2051), compress=False)
    elif case == "label_mismatch":
        table = _broken(folder, "train", 1, idx_bytes(y[:6], 2049))
    else:
        table = _broken(folder, "test", 1, idx_bytes(np.array([1, 10, 2]), 2049))
    with pytest.raises(data.MnistFormatError, match=match) as e:
        data._load_idx_dir(folder, files=FILES, checksums=table)
    assert isinstance(e.value, data.MnistFileError) and isinstance(e.value, ValueError)
    _check_nothing_cached(cache)


# --------------------------------------------------------------------------- locating files


@pytest.fixture
def no_mnist(tmp_path, monkeypatch):
    """HOME and MNIST_DIR point at empty folders."""
    home = tmp_path / "home"
    env_dir = tmp_path / "env_mnist"
    home.mkdir()
    env_dir.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MNIST_DIR", str(env_dir))
    monkeypatch.setenv("CNN_CACHE_DIR", str(tmp_path / "cache"))
    return home, env_dir


def test_not_found_lists_every_place_and_how_to_fix(no_mnist):
    home, env_dir = no_mnist
    with pytest.raises(data.MnistNotFoundError, match="MNIST files not found") as e:
        data.load_mnist()
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert f"{env_dir} (env MNIST_DIR): no MNIST files" in msg
    assert f"{home / '.cache' / 'cnn' / 'mnist'} (default): no MNIST files" in msg
    for pair in data.MNIST_FILES.values():
        for n in pair:
            assert f"https://storage.googleapis.com/cvdf-datasets/mnist/{n}" in msg
    assert "curl -fLO" in msg and "MNIST_DIR" in msg and "tfds" in msg


def test_not_found_partial_folder_and_explicit_dir(no_mnist, tmp_path, monkeypatch):
    _, env_dir = no_mnist
    (env_dir / "train-images-idx3-ubyte.gz").write_bytes(b"x")
    with pytest.raises(data.MnistNotFoundError, match=r"env MNIST_DIR\): missing train-labels"):
        data.load_mnist()
    monkeypatch.delenv("MNIST_DIR")
    with pytest.raises(data.MnistNotFoundError, match=r"\(default\): no MNIST files"):
        data.load_mnist()
    # An explicit data_dir is the only place looked at.
    with pytest.raises(data.MnistNotFoundError, match=r"data_dir argument") as e:
        data.load_mnist(tmp_path / "nowhere")
    assert "(default)" not in str(e.value)


def test_default_dir_is_used_and_checksums_enforced(no_mnist, monkeypatch):
    home, _ = no_mnist
    monkeypatch.delenv("MNIST_DIR")
    default = home / ".cache" / "cnn" / "mnist"
    assert data.default_data_dir() == default
    default.mkdir(parents=True)
    junk = b"\x1f\x8b not really mnist"
    for pair in data.MNIST_FILES.values():
        for n in pair:
            (default / n).write_bytes(junk)
    msg = rf"train-images-idx3-ubyte.gz: size {len(junk)} bytes, expected 9912422 \(truncated\)"
    with pytest.raises(data.MnistChecksumError, match=msg):
        data.load_mnist()
    # source="tfds" verifies the files the same way before tfds runs.
    with pytest.raises(data.MnistChecksumError, match="expected 9912422"):
        data.load_mnist(source="tfds")


def test_unknown_source():
    with pytest.raises(ValueError, match="unknown source 'torch'"):
        data.load_mnist(source="torch")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CNN_CACHE_DIR", str(tmp_path))
    assert data.cache_dir() == tmp_path
    monkeypatch.delenv("CNN_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert data.cache_dir() == tmp_path / "h" / ".cache" / "cnn"


# --------------------------------------------------------------------------- real MNIST


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("cnn_cache")


def _check_real(d):
    assert set(d) == {"train", "test"}
    for split, n, counts in (("train", 60000, TRAIN_COUNTS), ("test", 10000, TEST_COUNTS)):
        images, labels = d[split]
        assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int32
        assert np.bincount(labels, minlength=10).tolist() == counts
        assert images.max() == 255 and images.min() == 0


def test_checksum_constants_match_tfds_and_files():
    import tensorflow_datasets as tfds

    recorded = pathlib.Path(tfds.__file__).parent / "url_checksums" / "mnist.txt"
    table = {}
    for line in recorded.read_text().splitlines():
        url, size, sha, name = line.split()
        assert url == data.MNIST_URL + name
        table[name] = (int(size), sha)
    assert table == data.MNIST_CHECKSUMS
    folder = pathlib.Path(os.environ["MNIST_DIR"])
    for n, (size, _) in data.MNIST_CHECKSUMS.items():
        assert (folder / n).stat().st_size == size


@pytest.fixture(scope="session")
def real_idx(real_cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CNN_CACHE_DIR", str(real_cache))
        cold = data.load_mnist()  # data_dir from MNIST_DIR (tests/conftest.py)
        warm_s = []
        for _ in range(2):  # best of two: a busy CI machine should not fail the check
            t = time.perf_counter()
            warm = data.load_mnist()
            warm_s.append(time.perf_counter() - t)
    return cold, warm, min(warm_s)


def test_real_mnist_idx(real_idx):
    cold, warm, warm_s = real_idx
    _check_real(cold)
    _check_real(warm)
    for split in cold:
        np.testing.assert_array_equal(cold[split][0], warm[split][0])
        np.testing.assert_array_equal(cold[split][1], warm[split][1])
    assert warm_s < 1.0, f"warm cache load took {warm_s:.2f} s"


def _sorted_examples(images, labels):
    """Order-free view: examples sorted by (label, pixel bytes)."""
    keys = [bytes([int(lbl)]) + img.tobytes() for img, lbl in zip(images, labels, strict=True)]
    order = np.array(sorted(range(len(keys)), key=keys.__getitem__))
    return images[order], labels[order]


def test_real_mnist_tfds_matches_idx(real_idx, real_cache):
    idx = real_idx[0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CNN_CACHE_DIR", str(real_cache))
        tf = data.load_mnist(source="tfds")
    _check_real(tf)
    assert (real_cache / "tfds" / "cnn_mnist").is_dir()  # tfds wrote to the cache, not MNIST_DIR
    for split in ("train", "test"):
        a_img, a_lbl = _sorted_examples(*idx[split])
        b_img, b_lbl = _sorted_examples(*tf[split])
        np.testing.assert_array_equal(a_lbl, b_lbl)
        np.testing.assert_array_equal(a_img, b_img)
        # The builder keeps file order (disable_shuffling), so the order matches too.
        np.testing.assert_array_equal(idx[split][1], tf[split][1])
        np.testing.assert_array_equal(idx[split][0], tf[split][0])


# --------------------------------------------------------------------------- batching


def test_steps_seed_example():
    # 10 examples, batch size 2, 3 epochs -> 5 iterations per epoch, 15 in total.
    assert data.steps_per_epoch(10, 2, drop_remainder=True) == 5
    assert data.total_steps(10, 2, 3, drop_remainder=True) == 15
    assert data.total_steps(10, 2, 3, drop_remainder=False) == 15
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    labels = np.arange(10, dtype=np.int32)
    n = 0
    for epoch in range(3):
        for batch in data.iterate_batches(
            images, labels, 2, seed=0, epoch=epoch, drop_remainder=True
        ):
            assert batch["image"].shape == (2, 1, 1, 1) and batch["label"].shape == (2,)
            n += 1
    assert n == 15


def test_steps_remainder():
    assert data.steps_per_epoch(10, 4, drop_remainder=True) == 2
    assert data.steps_per_epoch(10, 4, drop_remainder=False) == 3
    assert data.total_steps(10, 4, 2, drop_remainder=False) == 6
    assert data.total_steps(10, 4, 0, drop_remainder=False) == 0
    assert data.steps_per_epoch(3, 4, drop_remainder=False) == 1
    assert data.steps_per_epoch(np.int64(8), 4, drop_remainder=True) == 2


def test_epoch_indices_drop():
    idx, mask = data.epoch_indices(0, 0, 10, 4, drop_remainder=True)
    assert idx.shape == mask.shape == (2, 4)
    assert idx.dtype == np.int32 and mask.dtype == np.float32
    assert (mask == 1).all() and len(set(idx.ravel().tolist())) == 8


def test_epoch_indices_keep_pads_with_masked_valid_indices():
    for epoch in range(5):
        idx, mask = data.epoch_indices(3, epoch, 10, 4, drop_remainder=False)
        assert idx.shape == mask.shape == (3, 4)
        assert idx.dtype == np.int32 and mask.dtype == np.float32
        assert mask.sum() == 10 and (mask[-1] == [1, 1, 0, 0]).all()
        assert ((idx >= 0) & (idx < 10)).all()
        # Each example exactly once among the real (mask 1) slots.
        assert sorted(idx[mask == 1].tolist()) == list(range(10))


def test_epoch_orders_deterministic_and_different():
    a, _ = data.epoch_indices(7, 0, 100, 10, drop_remainder=True)
    b, _ = data.epoch_indices(7, 0, 100, 10, drop_remainder=True)
    c, _ = data.epoch_indices(7, 1, 100, 10, drop_remainder=True)
    d, _ = data.epoch_indices(8, 0, 100, 10, drop_remainder=True)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    assert sorted(c.ravel().tolist()) == list(range(100))


def test_iterate_batches_matches_indices_and_masks():
    images = (np.arange(10, dtype=np.uint8) * 3).reshape(10, 1, 1, 1)
    labels = np.arange(10, dtype=np.int32)
    batches = list(data.iterate_batches(images, labels, 4, seed=1, epoch=2, drop_remainder=False))
    idx, mask = data.epoch_indices(1, 2, 10, 4, drop_remainder=False)
    assert len(batches) == 3
    for batch, idx_B, mask_B in zip(batches, idx, mask, strict=True):
        assert set(batch) == {"image", "label", "mask"}
        np.testing.assert_array_equal(batch["label"], idx_B)
        np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], idx_B * 3)
        np.testing.assert_array_equal(batch["mask"], mask_B)
    seen = np.concatenate([b["label"][b["mask"] == 1] for b in batches])
    assert sorted(seen.tolist()) == list(range(10))


@pytest.mark.parametrize(
    "args, exc, match",
    [
        ((10, 0, True), ValueError, "batch_size must be >= 1, got 0"),
        ((10, -2, False), ValueError, "batch_size must be >= 1"),
        ((0, 2, False), ValueError, "num_examples must be >= 1"),
        ((3, 4, True), ValueError, r"num_examples=3 < batch_size=4 with drop_remainder=True"),
        ((10, 2.5, True), TypeError, "batch_size must be an int"),
        ((10, True, True), TypeError, "batch_size must be an int"),
    ],
)
def test_steps_validation(args, exc, match):
    with pytest.raises(exc, match=match):
        data.steps_per_epoch(*args)


def test_other_validation():
    with pytest.raises(ValueError, match="num_epochs must be >= 0"):
        data.total_steps(10, 2, -1, drop_remainder=True)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        data.epoch_indices(-1, 0, 10, 2, drop_remainder=True)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        data.epoch_indices(0, -1, 10, 2, drop_remainder=True)
    with pytest.raises(ValueError, match="num_examples=3 < batch_size=4"):
        data.epoch_indices(0, 0, 3, 4, drop_remainder=True)
    with pytest.raises(ValueError, match="10 images but 9 labels"):
        next(
            data.iterate_batches(
                np.zeros((10, 1)), np.zeros(9), 2, seed=0, epoch=0, drop_remainder=True
            )
        )
