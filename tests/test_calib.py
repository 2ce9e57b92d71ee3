"""The calibration data contract: formats, validation, and every refusal message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnxprune.calib import load_calibration
from onnxprune.errors import CalibrationError
from onnxprune.testing import model_from_text

TWO_INPUTS = """
<ir_version: 10, opset_import: ["" : 17]>
g (float[batch, 3, 4] image, int64[batch, seq] ids) => (float[batch, 3, 4] y)
{ y = Identity (image) }
"""


@pytest.fixture
def model():
    return model_from_text(TWO_INPUTS)


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_with_sample_axis(model, tmp_path: Path):
    image = np.arange(5 * 3 * 4, dtype=np.float32).reshape(5, 3, 4)
    ids = np.arange(5 * 7, dtype=np.int64).reshape(5, 7)
    data = load_calibration(_npz(tmp_path / "c.npz", image=image, ids=ids), model)
    assert len(data) == 5
    feeds = list(data.feeds())
    # rank r arrays for rank r inputs: one-sample feeds keep the batch axis
    assert feeds[2]["image"].shape == (1, 3, 4)
    np.testing.assert_array_equal(feeds[2]["image"][0], image[2])
    np.testing.assert_array_equal(feeds[4]["ids"], ids[4:5])


def test_npz_with_extra_sample_axis(model, tmp_path: Path):
    image = np.zeros((6, 2, 3, 4), np.float32)  # 6 samples of batch 2
    ids = np.zeros((6, 2, 9), np.int64)
    data = load_calibration(_npz(tmp_path / "c.npz", image=image, ids=ids), model)
    assert len(data) == 6
    assert data.feed(0)["image"].shape == (2, 3, 4)


def test_folder_of_feeds_with_varying_shapes(model, tmp_path: Path):
    folder = tmp_path / "feeds"
    folder.mkdir()
    for i, seq in enumerate([3, 8, 5]):
        _npz(
            folder / f"{i:03d}.npz",
            image=np.full((1, 3, 4), i, np.float32),
            ids=np.zeros((1, seq), np.int64),
        )
    data = load_calibration(folder, model)
    assert [f["ids"].shape[1] for f in data.feeds()] == [3, 8, 5]
    assert [f["image"][0, 0, 0] for f in data.feeds()] == [0, 1, 2]


def _refused(model, path: Path, pattern: str) -> None:
    with pytest.raises(CalibrationError, match=pattern):
        load_calibration(path, model)


def test_refuses_missing_input(model, tmp_path: Path):
    path = _npz(tmp_path / "c.npz", image=np.zeros((2, 3, 4), np.float32))
    _refused(model, path, "no array for model input 'ids'")


def test_refuses_unknown_key(model, tmp_path: Path):
    path = _npz(
        tmp_path / "c.npz",
        image=np.zeros((2, 3, 4), np.float32),
        ids=np.zeros((2, 5), np.int64),
        mask=np.zeros((2, 5), np.int64),
    )
    _refused(model, path, "'mask' is not a model input")


def test_refuses_wrong_dtype(model, tmp_path: Path):
    path = _npz(
        tmp_path / "c.npz",
        image=np.zeros((2, 3, 4), np.float64),
        ids=np.zeros((2, 5), np.int64),
    )
    _refused(model, path, "input 'image' .*expected dtype float32, given float64")


def test_refuses_wrong_shape(model, tmp_path: Path):
    path = _npz(
        tmp_path / "c.npz",
        image=np.zeros((2, 3, 5), np.float32),
        ids=np.zeros((2, 5), np.int64),
    )
    _refused(
        model, path, r"input 'image' \(sample 0.*expected shape \[batch, 3, 4\], given \[1, 3, 5\]"
    )


def test_refuses_wrong_shape_in_folder_names_file(model, tmp_path: Path):
    folder = tmp_path / "feeds"
    folder.mkdir()
    _npz(folder / "a.npz", image=np.zeros((1, 3, 4), np.float32), ids=np.zeros((1, 2), np.int64))
    _npz(folder / "b.npz", image=np.zeros((1, 4, 4), np.float32), ids=np.zeros((1, 2), np.int64))
    _refused(model, folder, r"input 'image' \(sample 1, file b.npz\): expected shape")


def test_refuses_empty(model, tmp_path: Path):
    path = _npz(
        tmp_path / "c.npz", image=np.zeros((0, 3, 4), np.float32), ids=np.zeros((0, 5), np.int64)
    )
    _refused(model, path, "no samples")
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(model, empty, "no .npz files")


def test_refuses_mismatched_sample_counts(model, tmp_path: Path):
    path = _npz(
        tmp_path / "c.npz", image=np.zeros((3, 3, 4), np.float32), ids=np.zeros((2, 5), np.int64)
    )
    _refused(model, path, "different sample counts")


def test_refuses_unreadable_and_missing(model, tmp_path: Path):
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip")
    _refused(model, bad, "not a readable .npz")
    _refused(model, tmp_path / "missing.npz", "no such file or folder")


def test_scalar_input_from_a_stacked_npz_is_a_rank0_array(tmp_path: Path):
    """A scalar input stacked on axis 0 (``sr`` of a VAD model) feeds rank-0 arrays."""
    from onnxprune.testing import model_from_text

    model = model_from_text(
        """
        <ir_version: 10, opset_import: ["" : 17]>
        m (float[1, 4] x, int64 sr) => (float[1, 4] y) {
            [c] s = Cast <to = 1> (sr)
            [mul] y = Mul (x, s)
        }
        """
    )
    path = tmp_path / "c.npz"
    np.savez(path, x=np.ones((3, 1, 4), np.float32), sr=np.full(3, 16000, np.int64))
    data = load_calibration(path, model)
    feed = data.feed(1)
    assert isinstance(feed["sr"], np.ndarray) and feed["sr"].shape == ()
    from onnxprune.runtime import run_model

    np.testing.assert_array_equal(run_model(model, feed)["y"], np.full((1, 4), 16000.0))
