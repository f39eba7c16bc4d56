"""Atomic writes: the target appears complete or not at all; a failure leaves the old one and no debris."""

import pytest

from pyramid_peft.atomic import atomic_directory, atomic_write_text, publish_directory


def test_atomic_directory_publishes_on_success_and_replaces_an_old_folder(tmp_path):
    target = tmp_path / "out"
    for text in ("first", "second"):
        with atomic_directory(target) as staging:
            (staging / "file.txt").write_text(text)
            assert not (target / "file.txt").exists() or (target / "file.txt").read_text() != text
        assert (target / "file.txt").read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_directory_keeps_the_old_folder_when_writing_fails(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as staging:
        (staging / "good.txt").write_text("good")
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "half.txt").write_text("half")
        raise RuntimeError("disk full")
    assert [p.name for p in target.iterdir()] == ["good.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_publish_directory_moves_a_filled_staging_folder(tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "a").write_text("a")
    publish_directory(staging, tmp_path / "final")
    assert (tmp_path / "final" / "a").read_text() == "a" and not staging.exists()


def test_atomic_write_text_replaces_whole_files_only(tmp_path):
    path = tmp_path / "report.json"
    atomic_write_text(path, "old")
    with pytest.raises(TypeError):
        atomic_write_text(path, None)  # fails while writing: the old file stays
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
