"""cnn.files: atomic writes keep the old file on failure and leave no temp file."""

import pytest

from cnn.files import atomic_write, atomic_write_text


def test_atomic_write_replaces_and_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "sub" / "f.json"
    atomic_write_text(path, "old\n")
    assert path.read_text() == "old\n"

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.json"]
