"""MetricWriter.write_image: image summaries in the TensorBoard event file, read back."""

import io as stdio

import numpy as np
import pytest
from PIL import Image

from mim4dd_jax import artifacts

pytest.importorskip("tensorboard")


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_image_grid_is_read_back_next_to_the_scalars(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.random((6, 5, 5, 1)).astype(np.float32), np.arange(6) % 3
    grid = artifacts.image_grid(images, labels, 3)  # [H, W] uint8, one row per class
    colour = rng.integers(0, 256, (4, 7, 3), dtype=np.uint8)
    writer = artifacts.MetricWriter(str(tmp_path), tensorboard=True)
    writer.write(10, loss=0.5)
    writer.write_image(10, "synthetic/grid", grid)
    writer.write_image(20, "synthetic/grid", artifacts.png_bytes(grid[::-1]))
    writer.write_image(20, "colour", colour)
    acc = _events(tmp_path / "tensorboard")
    assert set(acc.Tags()["images"]) == {"synthetic/grid", "colour"}
    assert [e.value for e in acc.Scalars("loss")] == [0.5]
    shown = acc.Images("synthetic/grid")
    assert [e.step for e in shown] == [10, 20]
    assert (shown[0].height, shown[0].width) == grid.shape
    np.testing.assert_array_equal(
        np.asarray(Image.open(stdio.BytesIO(shown[0].encoded_image_string))), grid
    )
    np.testing.assert_array_equal(
        np.asarray(Image.open(stdio.BytesIO(shown[1].encoded_image_string))), grid[::-1]
    )
    [c] = acc.Images("colour")
    np.testing.assert_array_equal(
        np.asarray(Image.open(stdio.BytesIO(c.encoded_image_string))), colour
    )


def test_write_image_without_tensorboard_writes_nothing_and_bad_images_are_refused(tmp_path):
    writer = artifacts.MetricWriter(str(tmp_path))
    writer.write_image(0, "grid", np.zeros((4, 4), np.uint8))
    assert not (tmp_path / "tensorboard").exists()
    with pytest.raises(ValueError, match="uint8"):
        artifacts.png_bytes(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="not a PNG"):
        artifacts.png_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="channels"):
        artifacts.png_bytes(np.zeros((4, 4, 2), np.uint8))
