"""The disk caches' one helper (autosquash.files): entries named by a hash of what they depend on, folders
written whole, the first of two racing writers kept."""

import hashlib

import pytest

from autosquash.files import atomic_folder, content_key


def test_a_content_key_is_the_hash_of_its_parts_in_order():
    assert content_key("model|1", b"\x00\x01") == hashlib.sha256(b"model|1\x00\x01").hexdigest()[:24]
    assert content_key("a", "b") == content_key("ab") != content_key("b", "a")
    assert len(content_key("x", length=32)) == 32


def test_a_folder_is_written_whole_or_not_at_all(tmp_path):
    path = tmp_path / "entry"
    with pytest.raises(RuntimeError), atomic_folder(path) as tmp:
        (tmp / "half").write_text("a")
        raise RuntimeError("stopped mid-write")
    assert list(tmp_path.iterdir()) == []  # neither the entry nor its temporary
    with atomic_folder(path) as tmp:
        (tmp / "index.json").write_text("{}")
    assert [p.name for p in path.iterdir()] == ["index.json"] and [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_of_two_writers_the_first_copy_renamed_stays(tmp_path):
    path = tmp_path / "entry"
    with atomic_folder(path) as tmp:
        (tmp / "ours").write_text("late")
        path.mkdir()  # another process renamed its copy here while this one was writing
        (path / "theirs").write_text("first")
    assert [p.name for p in path.iterdir()] == ["theirs"] and [p.name for p in tmp_path.iterdir()] == ["entry"]
