"""Links in an image folder are followed once: a loop back to a parent, a link into another
class's folder, a file reached twice (a link, a hard link) and a broken link are skipped and
counted, so no image lands in two classes or in both splits."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from optimizer.config import DataConfig
from optimizer.folder import FolderData
from tests.support.image_folder import write

pytestmark = pytest.mark.unit


def scan(root: Path) -> FolderData:
    return FolderData.scan(DataConfig(source="folder", root=str(root), workers=0,
                                      val_fraction=0.25), [3, 32, 32])


def check_no_repeats(data: FolderData) -> None:
    real = [os.path.realpath(p) for p, _ in data.train_files + data.test_files]
    assert not [p for p, n in Counter(real).items() if n > 1]
    labels: dict[str, set[int]] = {}
    for p, t in data.train_files + data.test_files:
        labels.setdefault(os.path.realpath(p), set()).add(t)
    assert all(len(v) == 1 for v in labels.values())


def test_a_link_back_to_a_parent_folder_is_not_walked(tmp_path: Path) -> None:
    write(tmp_path, 4, classes=("cat", "dog"))
    os.symlink("..", tmp_path / "train" / "cat" / "up")  # train/ again, from inside cat/
    os.symlink("../..", tmp_path / "train" / "dog" / "root")  # the root
    data = scan(tmp_path)
    assert len(data.train_files) + len(data.test_files) == 8
    check_no_repeats(data)
    assert len(data.skipped) == 2 and "linked or repeated" in data.description
    assert data.describe()["skipped_links"] == 2


def test_a_link_into_another_class_does_not_relabel_its_images(tmp_path: Path) -> None:
    write(tmp_path, 4, classes=("cat", "dog"))
    os.symlink(tmp_path / "train" / "dog", tmp_path / "train" / "cat" / "more")
    data = scan(tmp_path)
    by_class = Counter(t for _, t in data.train_files + data.test_files)
    assert by_class == {0: 4, 1: 4}
    check_no_repeats(data)


def test_a_file_reached_twice_is_read_once(tmp_path: Path) -> None:
    paths = write(tmp_path, 4, classes=("cat", "dog"))
    cat, dog = tmp_path / "train" / "cat", tmp_path / "train" / "dog"
    os.symlink(paths[0], dog / "linked.png")  # a cat image linked into dog/
    os.link(paths[1], dog / "hard.jpg")  # a hard link: the same file
    os.symlink(tmp_path / "gone.png", cat / "broken.png")
    sub = cat / "more"
    sub.mkdir()
    os.symlink(paths[2], sub / "again.png")  # a second path within its own class
    data = scan(tmp_path)
    assert len(data.train_files) + len(data.test_files) == 8
    check_no_repeats(data)
    assert len(data.skipped) == 4, data.skipped
    assert sum("broken link" in r for _, r in data.skipped) == 1, data.skipped


def test_a_val_folder_linked_to_train_never_puts_a_file_in_both_splits(tmp_path: Path) -> None:
    write(tmp_path, 4, classes=("cat", "dog"))
    (tmp_path / "val").mkdir()
    for name in ("cat", "dog"):
        (tmp_path / "val" / name).mkdir()
        write(tmp_path, 2, classes=(name,), split="val", seed=3)
        for f in sorted((tmp_path / "train" / name).iterdir())[:1]:
            os.symlink(f, tmp_path / "val" / name / f"dup_{f.name}")
    data = scan(tmp_path)
    train = {os.path.realpath(p) for p, _ in data.train_files}
    test = {os.path.realpath(p) for p, _ in data.test_files}
    assert not train & test and len(test) == 4
    assert len(data.skipped) == 2
