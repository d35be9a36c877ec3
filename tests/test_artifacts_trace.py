"""Resume never duplicates or loses a trace row (issue 28): metrics.jsonl is cut back to the
checkpoint, atomically and byte for byte, and TensorBoard is told to drop the orphaned steps."""

import json

import pytest

from mim4dd_jax import artifacts


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cut_metrics_keeps_earlier_rows_byte_for_byte_and_drops_a_torn_line(tmp_path):
    writer = artifacts.MetricWriter(str(tmp_path))
    for step in range(1, 7):
        writer.write(step, loss=1.0 / step)
    writer.write(4, accuracy={"convnet": {"mean": 0.5}})
    path = tmp_path / "metrics.jsonl"
    before = path.read_bytes().splitlines(keepends=True)
    with open(path, "ab") as f:
        f.write(b'{"step": 7, "lo')  # a kill mid-write
    assert artifacts.cut_metrics(str(path), 4) == 3  # steps 5, 6, the torn 7; not the accuracy at 4
    assert path.read_bytes() == b"".join(before[:4] + before[6:])
    assert [r["step"] for r in _rows(path)] == [1, 2, 3, 4, 4]
    # keep=: the final evaluation, which a resumed run always redoes, goes too.
    artifacts.cut_metrics(str(path), 4, keep=lambda r: "accuracy" not in r)
    assert [r["step"] for r in _rows(path)] == [1, 2, 3, 4]
    # Nothing to cut: the file is not rewritten.
    stamp = path.stat().st_mtime_ns
    assert artifacts.cut_metrics(str(path), 10) == 0 and path.stat().st_mtime_ns == stamp
    assert artifacts.cut_metrics(str(tmp_path / "none.jsonl"), 3) == 0


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = artifacts.MetricWriter(str(tmp_path), tensorboard=True)
    for step in range(1, 6):
        first.write(step, loss=float(step))
    # Killed after step 5; the last checkpoint was step 3: the resumed run redoes 4 and 5.
    second = artifacts.MetricWriter(str(tmp_path), tensorboard=True)
    second.resume_at(3)
    for step in range(4, 7):
        second.write(step, loss=10.0 * step)
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, 40.0),
        (5, 50.0),
        (6, 60.0),
    ]
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
