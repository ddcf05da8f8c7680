"""The pieces between an input and a result, in process: the preprocessing the host defines
and the board runs, the hand-over queue's policies and counters, the publishing policies,
and the source section's checks."""

from __future__ import annotations

import io
import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agent.config import AgentConfig, SourceConfig, load_config
from agent.errors import ConfigError, ImageError
from agent.manifest import Manifest
from agent.predictions import Predictor
from agent.preprocess import Preprocess
from agent.sources import Frame, FrameQueue
from optimizer.config import OptimizerConfig
from optimizer.data import load
from optimizer.train import first_test_inputs
from tests.support.media import png_bytes


def frame(i: int) -> Frame:
    return Frame(str(i), 0.0, 0.0)


@pytest.mark.e2e
def test_the_boards_tensor_of_a_png_is_the_hosts_tensor_of_the_same_test_image(
        bundle: Path, small_config: Path, tmp_path: Path) -> None:
    """The host evaluates the stand-in test set through Preprocess.batch; the board decodes
    PNG files of the same images with the manifest's recipe: identical, bit for bit."""
    data = load(replace(load_config(small_config, [], OptimizerConfig).data,
                        source="synthetic"), [3, 32, 32])
    host = first_test_inputs(data, 64)
    board_prep = Manifest.read(bundle).preprocess
    assert board_prep == data.preprocess  # the manifest records what the host used
    for i in range(64):
        path = tmp_path / f"t{i}.png"
        path.write_bytes(png_bytes(data.test_images[i]))
        board = board_prep.encoded(path.read_bytes())
        assert np.array_equal(board, host[i].numpy()), f"image {i} differs"


@pytest.mark.unit
def test_resize_policies_give_the_input_size_and_the_host_batch_runs_the_same_steps() -> None:
    prep = Preprocess((32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    wide = np.zeros((48, 96, 3), np.uint8)
    wide[:, 24:72] = 255  # the centre half is white: the shorter-side crop keeps about it
    x = prep.image(wide)
    assert list(x.shape) == [3, 32, 32]
    assert x.dtype == np.float32 and (x[:, :, 2:30] == 2.0).all()  # (1 - .5) / .25
    stretched = Preprocess((32, 32), (0.5,) * 3, (0.25,) * 3, "stretch").image(wide)
    assert list(stretched.shape) == [3, 32, 32] and float(stretched.min()) == -2.0
    # Images of another size through the host's batch path equal the board's, one by one.
    images = torch.randint(0, 256, (3, 3, 40, 56), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    host = prep.batch(images)
    for i in range(3):
        assert np.array_equal(host[i].numpy(), prep.encoded(png_bytes(images[i])))


@pytest.mark.unit
@pytest.mark.parametrize("data, problem", [
    (b"", "empty"),
    (b"garbage, not an image" * 10, "not an image of a format read here"),
    (None, "corrupt or truncated"),  # a PNG cut in half
])
def test_unusable_images_raise_one_clear_image_error(data: bytes | None, problem: str) -> None:
    prep = Preprocess((32, 32), (0.0,) * 3, (1.0,) * 3)
    if data is None:
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
                        ).save(buf, "PNG")
        data = buf.getvalue()[: len(buf.getvalue()) // 2]
    with pytest.raises(ImageError, match=problem):
        prep.encoded(data)


@pytest.mark.unit
def test_a_huge_image_is_refused_before_it_is_decoded() -> None:
    buf = io.BytesIO()
    Image.new("L", (10_000, 6_000)).save(buf, "PNG")  # 60 MP of zeros: a small file
    with pytest.raises(ImageError, match="larger than 50,000,000 pixels"):
        Preprocess((32, 32), (0.0,) * 3, (1.0,) * 3).encoded(buf.getvalue())


@pytest.mark.unit
def test_newest_policy_keeps_the_latest_frames_and_counts_every_drop() -> None:
    q = FrameQueue(2, "newest")
    for i in range(5):
        assert q.put(frame(i))
    assert q.counts() == (5, 3)
    assert [f.source_id for f in q.take(10, 0.0)] == ["3", "4"]


@pytest.mark.unit
def test_refuse_policy_returns_false_and_counts_and_wait_policy_blocks_until_room() -> None:
    q = FrameQueue(1, "refuse")
    assert q.put(frame(0)) and not q.put(frame(1))
    assert q.counts() == (1, 1)
    w = FrameQueue(1, "wait")
    assert w.put(frame(0))
    assert not w.put(frame(1), timeout_s=0.05)  # full: times out, nothing dropped
    assert w.counts() == (1, 0)
    w.take(1, 0.0)
    assert w.put(frame(2), timeout_s=0.05)


@pytest.mark.unit
def test_publishing_policies_every_change_and_rate() -> None:
    def top(label: str) -> list[dict[str, object]]:
        return [{"label": label, "score": 0.9}]

    labels = ["cat", "cat", "dog", "dog", "cat"]
    every = Predictor(SourceConfig(kind="video", path="x", publish="every"))
    assert [every.wanted(top(t), i) for i, t in enumerate(labels)] == [True] * 5
    change = Predictor(SourceConfig(kind="video", path="x", publish="change"))
    assert [change.wanted(top(t), i) for i, t in enumerate(labels)] == \
        [True, False, True, False, True]
    rate = Predictor(SourceConfig(kind="camera", path="x", publish="rate", max_per_s=2))
    times = [i * 0.1 for i in range(20)]  # 10 results a second for 2 s
    assert sum(rate.wanted(top("cat"), t) for t in times) == 4
    # Files and requests are always answered, whatever the policy says.
    folder = Predictor(SourceConfig(kind="folder", path="x", publish="change"))
    assert all(folder.wanted(top("cat"), t) for t in itertools.islice(times, 5))


@pytest.mark.unit
def test_top_k_is_best_first_with_manifest_labels_and_the_threshold() -> None:
    probs = np.array([0.05, 0.6, 0.3, 0.05])
    p = Predictor(SourceConfig(kind="mqtt", top_k=3, min_score=0.1))
    assert p.top(probs, ("a", "b", "c", "d")) == [{"label": "b", "score": 0.6},
                                                  {"label": "c", "score": 0.3}]


@pytest.mark.unit
@pytest.mark.parametrize("override, message", [
    ("source.kind=folder", "source.path: source.kind folder needs source.path"),
    ("source.kind=webcam", "source.kind: must be one of random, sample, folder"),
    ("source.publish=sometimes", "source.publish: must be one of every, change, rate"),
    ("source.min_score=2", "source.min_score: must be 0-1"),
])
def test_source_config_mistakes_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, [override], AgentConfig)


@pytest.mark.unit
def test_an_old_config_with_loop_input_is_read_as_source_kind_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A board upgraded in place keeps its config.yaml: it must keep running."""
    old = tmp_path / "old.yaml"
    old.write_text("loop:\n  input: sample\n  rate_hz: 20\n")
    cfg = load_config(old, [], AgentConfig)
    assert cfg.source.kind == "sample" and cfg.loop.rate_hz == 20
    assert "loop.input is now source.kind" in caplog.text
    both = tmp_path / "both.yaml"
    both.write_text("loop:\n  input: sample\nsource:\n  kind: mqtt\n")
    with pytest.raises(ConfigError, match="loop.input moved to source.kind, which is set too"):
        load_config(both, [], AgentConfig)
