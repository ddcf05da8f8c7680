"""CIFAR-10 reading and fetching on files in the exact on-disk format, and the stand-in."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from optimizer import data
from optimizer.errors import DataError


def write_cifar_folder(folder: Path, per_batch: int = 20) -> dict[str, np.ndarray]:
    """Write cifar-10-batches-py as the official python archive lays it out."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [*data.CIFAR10_TRAIN, data.CIFAR10_TEST]:
        pixels = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": pixels,
                 b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]}
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[name] = pixels
    meta = {b"num_cases_per_batch": per_batch, b"num_vis": 3072,
            b"label_names": [n.encode() for n in ["airplane", "automobile", "bird", "cat",
                                                  "deer", "dog", "frog", "horse", "ship",
                                                  "truck"]]}
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump(meta, f, protocol=2)
    return written


def make_archive(tmp: Path) -> tuple[Path, str]:
    write_cifar_folder(tmp / "src" / data.CIFAR10_DIR)
    archive = tmp / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp / "src" / data.CIFAR10_DIR, arcname=data.CIFAR10_DIR)
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


@pytest.mark.unit
def test_reads_the_official_python_format(tmp_path: Path) -> None:
    written = write_cifar_folder(tmp_path / data.CIFAR10_DIR)
    d = data.cifar10(tmp_path, download=False)
    assert d.train_images.shape == (100, 3, 32, 32) and d.test_images.shape == (20, 3, 32, 32)
    assert d.classes[0] == "airplane" and d.classes[9] == "truck"
    # Row-major 3072 = 1024 red, then green, then blue: pixel (c, y, x) is index c*1024+y*32+x.
    first = written["data_batch_1"][0]
    assert int(d.train_images[0, 2, 5, 7]) == int(first[2 * 1024 + 5 * 32 + 7])
    assert d.train_labels.dtype == torch.int64 and d.source == "cifar10"


@pytest.mark.unit
def test_missing_dataset_without_download_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--data synthetic"):
        data.cifar10(tmp_path, download=False)


@pytest.mark.unit
def test_archive_with_wrong_checksum_is_refused(tmp_path: Path) -> None:
    archive, _ = make_archive(tmp_path)
    (tmp_path / "root").mkdir()
    os.replace(archive, tmp_path / "root" / archive.name)
    with pytest.raises(DataError, match="checksum mismatch.*c58f30108f718f92721af3b95e74349a"):
        data.cifar10(tmp_path / "root")  # the official MD5 cannot match the test's archive
    assert not (tmp_path / "root" / data.CIFAR10_DIR).exists()


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on loopback serving `tmp_path/www`."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):  # type: ignore[no-untyped-def]
            super().__init__(*a, directory=str(www), **k)

        def log_message(self, *args):  # type: ignore[no-untyped-def]
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", www
    server.shutdown()
    server.server_close()


@pytest.mark.e2e
def test_download_checks_md5_then_extracts(tmp_path: Path,
                                           http_root: tuple[str, Path]) -> None:
    base, www = http_root
    archive, md5 = make_archive(tmp_path)
    os.replace(archive, www / archive.name)
    d = data.cifar10(tmp_path / "root", url=f"{base}/{archive.name}", md5=md5)
    assert d.train_images.shape[0] == 100


@pytest.mark.e2e
def test_download_failure_names_the_url_and_the_offline_option(
        tmp_path: Path, http_root: tuple[str, Path]) -> None:
    base, _ = http_root
    with pytest.raises(DataError, match="download from .* failed .*--data synthetic"):
        data.cifar10(tmp_path / "root", url=f"{base}/absent.tar.gz")
    assert list((tmp_path / "root").iterdir()) == []  # no partial download left behind


@pytest.mark.unit
def test_batch_file_that_unpickles_code_is_refused(tmp_path: Path) -> None:
    write_cifar_folder(tmp_path / data.CIFAR10_DIR)
    evil = io.BytesIO()
    pickle.dump({b"data": os.system}, evil, protocol=2)
    (tmp_path / data.CIFAR10_DIR / "test_batch").write_bytes(evil.getvalue())
    with pytest.raises(DataError, match="refusing to load"):
        data.cifar10(tmp_path, download=False)


@pytest.mark.unit
def test_truncated_batch_file_is_a_data_error(tmp_path: Path) -> None:
    write_cifar_folder(tmp_path / data.CIFAR10_DIR)
    path = tmp_path / data.CIFAR10_DIR / "data_batch_3"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match="data_batch_3"):
        data.cifar10(tmp_path, download=False)


@pytest.mark.unit
def test_stand_in_is_deterministic_by_seed() -> None:
    a, b, c = data.synthetic(50, 20, seed=1), data.synthetic(50, 20, seed=1), \
        data.synthetic(50, 20, seed=2)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels,
                                                                       b.test_labels)
    assert not torch.equal(a.train_images, c.train_images)
    assert a.train_images.dtype == torch.uint8 and a.input_shape == [3, 32, 32]
    assert "not CIFAR-10" in a.describe()["description"]


@pytest.mark.unit
def test_augmentation_crops_and_flips_but_keeps_shape() -> None:
    d = data.synthetic(64, 10)
    gen = torch.Generator().manual_seed(0)
    x, y = next(data.batches(d.train_images, d.train_labels, 64, d.mean, d.std,
                             augment=True, generator=gen))
    plain, _ = next(data.batches(d.train_images, d.train_labels, 64, d.mean, d.std))
    assert x.shape == plain.shape == (64, 3, 32, 32) and x.dtype == torch.float32
    assert not torch.equal(x, plain)
    assert torch.equal(y, d.train_labels)


@pytest.mark.unit
def test_folder_calibration_is_read_in_batches_the_same_each_time(tmp_path: Path) -> None:
    from optimizer.config import DataConfig
    from optimizer.folder import FolderData
    from tests.support.image_folder import write

    write(tmp_path, 12)
    folder = FolderData.scan(DataConfig(source="folder", root=str(tmp_path), workers=0),
                             [3, 24, 24])
    calib = folder.calibration(20, seed=3)
    first = list(calib.batches(8))
    assert calib.count == 20 and [x.shape[0] for x in first] == [8, 8, 4]
    assert all(x.dtype == torch.float32 and x.shape[1:] == (3, 24, 24) for x in first)
    again = torch.cat(list(calib.batches(64)))  # a second reading, in other batch sizes
    assert torch.equal(torch.cat(first), again)
    # The same seed picks the same images; another seed others.
    assert torch.equal(torch.cat(list(folder.calibration(20, seed=3).batches())), again)
    assert not torch.equal(torch.cat(list(folder.calibration(20, seed=4).batches())), again)
