"""Mode "evaluate": the protocol on an existing .npz set, its formats and its bad inputs."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import pixel_range_forms, run_cli

from mim4dd_jax import artifacts, data, evaluate, evaluate_run, inner
from mim4dd_jax import config as config_lib
from mim4dd_jax.errors import ConfigError

C, HW = 3, 8


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    """A 3-class dataset of 8x8 grey uint8 images, 4 train and 5 test images per class."""
    rng = np.random.default_rng(0)
    path = str(tmp_path_factory.mktemp("data") / "tiny.npz")
    y_train, y_test = np.arange(12) % C, np.arange(15) % C
    np.savez(
        path,
        x_train=rng.integers(0, 256, (12, HW, HW)).astype(np.uint8),
        y_train=y_train,
        x_test=rng.integers(0, 256, (15, HW, HW)).astype(np.uint8),
        y_test=y_test,
    )
    return path


def eval_config(data_path, set_path, **overrides):
    c = config_lib.build({"name": "tiny", "source": "npz", "path": data_path}, "evaluate")
    values = {
        "model.width": 4,
        "model.depth": 1,
        "eval.epochs": 2,
        "eval.num_models": 2,
        "eval.set": str(set_path),
        **overrides,
    }
    for dotted, value in values.items():
        config_lib.set_dotted(c, dotted, value)
    return c


def dataset_of(config):
    return data.load_from_config(config.data)


def spy(monkeypatch):
    """Replaces the training with a spy; returns the list of (images, labels, lr) it gets."""
    calls = []

    def fake(keys, images, labels, lr, *args, **kwargs):
        calls.append((np.asarray(images), np.asarray(labels), float(lr)))
        return jnp.full(keys.shape[0], 0.5)

    monkeypatch.setattr(inner, "train_and_test_many", fake)
    return calls


def test_evaluates_our_set_as_the_protocol_does(tmp_path, data_path):
    """Soft labels, the stored lr and the stored model-space images are used: the accuracies
    are exactly those of evaluate_from_config on the same arrays."""
    config = eval_config(data_path, tmp_path / "set" / "distilled.npz")
    ds = dataset_of(config)
    model_images = ds.train_images[:6] + 0.25  # not a copy of the train split
    soft = np.asarray(jax.nn.softmax(jax.random.normal(jax.random.key(0), (6, C))), np.float32)
    os.makedirs(tmp_path / "set")
    artifacts.save_synthetic_set(
        str(tmp_path / "set"),
        ds.to_pixels(model_images),
        soft,
        C,
        lr=0.037,
        config={"method": "mtt"},
        model_images=model_images,
        mean=ds.mean,
        std=ds.std,
        zca=np.bool_(False),
    )
    workdir = tmp_path / "eval"
    summary = evaluate_run.run(config, str(workdir))
    key = jax.random.fold_in(jax.random.key(config.seed), 1)
    expected = evaluate.evaluate_from_config(key, model_images, soft, ds, config, lr=0.037)
    np.testing.assert_array_equal(summary["accuracy"]["convnet"]["all"], expected[0].accuracies)
    assert summary["lr"] == pytest.approx(0.037) and summary["lr_source"] == "set"
    assert summary["labels"] == "soft" and summary["input"] == "model_images"
    assert summary["protocol"]["epochs"] == 2 and summary["protocol"]["num_models"] == 2
    on_disk = json.loads((workdir / "results.json").read_text())
    assert on_disk["accuracy"] == json.loads(json.dumps(summary["accuracy"]))
    table = (workdir / "results.md").read_text()
    mean, std = 100 * expected[0].mean, 100 * expected[0].std
    assert f"| convnet | {mean:.2f} ± {std:.2f} | 2 | 2 | no | 0.037 (set) |" in table
    rows = artifacts.read_metrics(str(workdir / "metrics.jsonl"))
    assert rows[-1]["accuracy"]["convnet"]["all"] == summary["accuracy"]["convnet"]["all"]
    assert (workdir / "grid.png").stat().st_size > 0


def test_raw_uint8_set_goes_through_the_normalisation(tmp_path, data_path, monkeypatch):
    calls = spy(monkeypatch)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (6, HW, HW, 1)).astype(np.uint8)
    labels = np.array([0, 0, 1, 1, 2, 2])
    np.savez(tmp_path / "raw.npz", images=images, labels=labels)
    config = eval_config(data_path, tmp_path / "raw.npz", **{"eval.models": ("convnet", "alexnet")})
    summary = evaluate_run.run(config, str(tmp_path / "eval"))
    ds = dataset_of(config)
    assert len(calls) == 2  # one program per architecture
    np.testing.assert_array_equal(calls[0][0], ds.from_pixels(images / np.float32(255)))
    np.testing.assert_array_equal(calls[0][1], labels)
    assert calls[0][2] == pytest.approx(config.eval.lr)  # no stored lr: eval.lr
    assert summary["lr_source"] == "config" and summary["input"] == "pixels"
    assert set(summary["accuracy"]) == {"convnet", "alexnet"}


def test_float_grey_set_without_channel_axis_and_an_lr_override(tmp_path, data_path, monkeypatch):
    calls = spy(monkeypatch)
    pixels = np.random.default_rng(2).random((3, HW, HW)).astype(np.float32)
    np.savez(tmp_path / "s.npz", images=pixels, labels=np.arange(3), lr=np.float32(0.5))
    config = eval_config(data_path, tmp_path / "s.npz")
    evaluate_run.run(config, str(tmp_path / "a"))
    summary = evaluate_run.run(config, str(tmp_path / "b"), lr=0.02)
    np.testing.assert_array_equal(calls[0][0], dataset_of(config).from_pixels(pixels[..., None]))
    assert [c[2] for c in calls] == pytest.approx([0.5, 0.02])
    assert summary["lr_source"] == "config"


def _bad_sets(folder):
    good = np.zeros((6, HW, HW, 1), np.float32)
    labels = np.array([0, 0, 1, 1, 2, 2])
    nan = good.copy()
    nan[3, 1, 1, 0] = np.nan
    soft = np.full((6, C), 0.5, np.float32)
    sets = {
        "wrong shape": (
            dict(images=np.zeros((6, 10, 10, 1)), labels=labels),
            "needs \\[N, 8, 8, 1\\]",
        ),
        "channels first": (
            dict(images=np.zeros((6, 1, HW, HW)), labels=labels),
            "channels first\\? transpose to \\[N, H, W, C\\]",
        ),
        "labels out of range": (dict(images=good, labels=labels + 1), "labels in 1..3"),
        "negative label": (dict(images=good, labels=labels - 1), "labels in -1..1"),
        "a label per image": (dict(images=good, labels=labels[:5]), "labels of shape \\(5,\\)"),
        "NaN pixels": (dict(images=nan, labels=labels), "NaN or infinite pixels in 1 of"),
        "soft not probabilities": (dict(images=good, labels=soft), "not probabilities"),
        "no labels": (dict(images=good), "no 'labels' array"),
        "bad lr": (dict(images=good, labels=labels, lr=np.float32(-1)), "lr=-1.0"),
    }
    out = {}
    for name, (arrays, message) in sets.items():
        path = os.path.join(folder, name.replace(" ", "_") + ".npz")
        np.savez(path, **arrays)
        out[name] = (path, message)
    out["missing file"] = (os.path.join(folder, "nope.npz"), "no such file")
    out["no eval.set"] = ("", "evaluate needs a set")
    not_npz = os.path.join(folder, "text.npz")
    with open(not_npz, "w") as f:
        f.write("images,labels\n0.5,1\n")
    out["not an npz"] = (not_npz, "is a text file, not an .npz; expected an .npz with 'images'")
    npy = os.path.join(folder, "images.npy")
    np.save(npy, good)
    out["one .npy array"] = (npy, "is a single .npy array, not an .npz")
    run_folder = os.path.join(folder, "a_run")
    os.makedirs(run_folder)
    out["a folder"] = (run_folder, "is a folder, not an .npz file$")
    np.savez(os.path.join(folder, "distilled.npz"), images=good, labels=labels)
    out["a run's folder"] = (folder, "is a folder, not an .npz file; did you mean .*distilled.npz")
    float_sets = {
        "float 0..255 undeclared": (good + 200, "", "in \\[200, 200\\], outside \\[0, 1\\]"),
        "normalised undeclared": (good - 0.5, "", "in \\[-0.5, -0.5\\], outside \\[0, 1\\]"),
        "uint8 declared normalised": (
            good.astype(np.uint8),
            "normalised",
            "holds uint8 images, which are 0..255 pixels, but is declared 'normalised'",
        ),
        "unknown range in the file": (good, "0-255", "pixel_range is '0-255'; valid: 0_255,"),
    }
    for name, (images, stored, message) in float_sets.items():
        path = os.path.join(folder, name.replace(" ", "_") + ".npz")
        extra = {"pixel_range": np.asarray(stored)} if stored else {}
        np.savez(path, images=images, labels=labels, **extra)
        if not stored:
            message += "(.*); declare it: --config.eval.pixel_range=0_255\\|0_1\\|normalised$"
        out[name] = (path, message)
    return out


def test_bad_sets_fail_before_the_workdir_exists(tmp_path, data_path, monkeypatch):
    calls = spy(monkeypatch)
    for name, (path, message) in _bad_sets(str(tmp_path)).items():
        workdir = tmp_path / "w" / name.replace(" ", "_")
        with pytest.raises(ConfigError, match=message):
            evaluate_run.run(eval_config(data_path, path), str(workdir))
        assert not workdir.exists(), name
        assert not (tmp_path / "w").exists(), name
    assert calls == []


def test_refuses_the_workdir_of_another_run(tmp_path, data_path, monkeypatch):
    spy(monkeypatch)
    np.savez(tmp_path / "s.npz", images=np.zeros((3, HW, HW, 1)), labels=np.arange(3))
    config = eval_config(data_path, tmp_path / "s.npz")
    artifacts.write_json(str(tmp_path / "results.json"), {"method": "dm", "accuracy": {}})
    with pytest.raises(ConfigError, match="holds another run's results"):
        evaluate_run.run(config, str(tmp_path))
    own = tmp_path / "own"
    evaluate_run.run(config, str(own))
    evaluate_run.run(config, str(own))  # an evaluate workdir may be evaluated again


def _cli(data_path, *args):
    return run_cli(
        "--config=configs/fashion_mnist.py:evaluate",
        "--config.data.name=tiny",
        "--config.data.source=npz",
        f"--config.data.path={data_path}",
        "--config.model.width=4",
        "--config.model.depth=1",
        "--config.eval.epochs=1",
        "--config.eval.num_models=1",
        *args,
    )


@pytest.mark.parametrize(
    "case",
    [
        "labels out of range",
        "missing file",
        "no eval.set",
        "float 0..255 undeclared",
        "not an npz",
        "a folder",
    ],
)
def test_cli_bad_set_is_one_line_exit_2_and_no_workdir(tmp_path, data_path, case):
    path, message = _bad_sets(str(tmp_path))[case]
    workdir = tmp_path / "run"
    r = _cli(data_path, f"--config.eval.set={path}", f"--workdir={workdir}")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert re.search(message, lines[0]), lines[0]
    assert not workdir.exists()


def test_cli_evaluates_with_the_lr_given_on_the_command_line(tmp_path, data_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (3, HW, HW, 1)).astype(np.uint8)
    np.savez(tmp_path / "s.npz", images=images, labels=np.arange(3), lr=np.float32(0.5))
    r = _cli(
        data_path,
        f"--config.eval.set={tmp_path / 's.npz'}",
        "--config.eval.lr=0.02",
        f"--workdir={tmp_path / 'run'}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "results.json").read_text())
    assert summary["lr"] == pytest.approx(0.02) and summary["lr_source"] == "config"
    assert "results.md" in r.stdout and "evaluate s.npz: convnet" in r.stdout


# ----------------------------------------------------------------------------------------------
# Pixel ranges are decided, not guessed (issue 28).
# ----------------------------------------------------------------------------------------------


def test_same_images_as_uint8_and_as_declared_floats_give_the_same_accuracy(tmp_path, data_path):
    """End to end, real training: uint8, floats in 0..255 declared 0_255, floats in [0, 1]
    (undeclared or declared 0_1) and the normalised images declared normalised are one set."""
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (6, HW, HW, 1)).astype(np.uint8)
    labels = np.array([0, 0, 1, 1, 2, 2])
    config = eval_config(data_path, "")
    ds = dataset_of(config)
    forms = pixel_range_forms(images, ds)
    accuracies = {}
    for name, (array, flag) in forms.items():
        path = tmp_path / (name.replace(" ", "_").replace(",", "") + ".npz")
        np.savez(path, images=array, labels=labels)
        c = eval_config(data_path, path, **{"eval.pixel_range": flag, "eval.epochs": 3})
        summary = evaluate_run.run(c, str(tmp_path / f"eval_{len(accuracies)}"))
        accuracies[name] = summary["accuracy"]["convnet"]["all"]
        assert summary["pixel_range"] == flag or (name, summary["pixel_range"]) in (
            ("uint8", "0_255"),
            ("float 0..1", "0_1"),
        )
    assert len({json.dumps(a) for a in accuracies.values()}) == 1, accuracies
    # ... and a different set scores differently: the comparison can fail.
    np.savez(tmp_path / "other.npz", images=255 - images, labels=labels)
    c = eval_config(data_path, tmp_path / "other.npz", **{"eval.epochs": 3})
    other = evaluate_run.run(c, str(tmp_path / "eval_other"))["accuracy"]["convnet"]["all"]
    assert other != accuracies["uint8"]


def test_our_own_set_beyond_1_needs_no_flag_and_logs_no_warning(tmp_path, data_path, caplog):
    """A distilled set's pixels are not clipped (they reach 4.9 on Fashion-MNIST): its file
    says they are [0, 1] pixels, so nothing is refused or warned about."""
    config = eval_config(data_path, tmp_path / "set" / "distilled.npz")
    ds = dataset_of(config)
    pixels = np.random.default_rng(5).uniform(-1.0, 4.9, (6, HW, HW, 1)).astype(np.float32)
    model_images = ds.from_pixels(pixels)
    assert pixels.max() > 2 and pixels.min() < -0.5
    os.makedirs(tmp_path / "set")
    artifacts.save_synthetic_set(
        str(tmp_path / "set"), pixels, np.array([0, 0, 1, 1, 2, 2]), C, lr=0.01, config={}
    )
    with np.load(tmp_path / "set" / "distilled.npz") as f:
        assert str(f["pixel_range"]) == "0_1"
    with caplog.at_level("WARNING"):
        summary = evaluate_run.run(config, str(tmp_path / "eval"))
    assert summary["pixel_range"] == "0_1" and summary["input"] == "pixels"
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []
    # A file of ours from before pixel_range was recorded is recognised by its model copy.
    with np.load(tmp_path / "set" / "distilled.npz") as f:
        old = {k: f[k] for k in f.files if k != "pixel_range"}
    np.savez(tmp_path / "old.npz", **old, model_images=model_images, mean=ds.mean, std=ds.std)
    config = eval_config(data_path, tmp_path / "old.npz")
    assert evaluate_run.run(config, str(tmp_path / "eval_old"))["pixel_range"] == "0_1"


def test_a_declaration_that_contradicts_the_file_is_refused(tmp_path, data_path):
    np.savez(
        tmp_path / "s.npz",
        images=np.zeros((3, HW, HW, 1), np.float32),
        labels=np.arange(3),
        pixel_range=np.asarray("0_1"),
    )
    config = eval_config(data_path, tmp_path / "s.npz", **{"eval.pixel_range": "0_255"})
    with pytest.raises(ConfigError, match="declares its pixel range as '0_1', but --config"):
        evaluate_run.run(config, str(tmp_path / "eval"))
    assert not (tmp_path / "eval").exists()


def test_config_refuses_an_unknown_pixel_range(data_path):
    config = eval_config(data_path, "x.npz", **{"eval.pixel_range": "0-255"})
    with pytest.raises(ConfigError, match="unknown eval.pixel_range '0-255'"):
        config_lib.validate(config)
