"""run.py end to end, and one clear line with exit code 2 for every user mistake."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT
from helpers import run_cli as run

FMNIST = "/usr/share/datasets/fashion-mnist"
# Small and fast: a tiny ConvNet, few epochs, a subset of the test split.
QUICK = [
    "--config.eval.epochs=3",
    "--config.eval.num_models=1",
    "--config.model.width=8",
    "--config.data.test_per_class=20",
]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A fake MNIST-format folder: 3 train and 2 test images per class."""
    folder = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 20)):
        for kind, array in (
            ("images-idx3", rng.integers(0, 256, (n, 28, 28))),
            ("labels-idx1", np.arange(n) % 10),
        ):
            header = bytes([0, 0, 8, array.ndim]) + b"".join(
                int(d).to_bytes(4, "big") for d in array.shape
            )
            with gzip.open(folder / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + array.astype(np.uint8).tobytes())
    return folder


@pytest.mark.slow
@pytest.mark.skipif(
    not os.path.isdir(FMNIST) and not os.environ.get("CI"), reason="needs dataset-fashion-mnist"
)
@pytest.mark.parametrize("method", ["random", "herding"])
def test_coreset_end_to_end_on_real_fashion_mnist(tmp_path, method):
    workdir = tmp_path / "run"
    # herding: features of a random net; random: with ZCA, whose fit is cached in the workdir.
    extra = {
        "herding": ["--config.coreset.features=random_net", "--config.data.train_per_class=200"],
        "random": ["--config.data.zca=True", "--config.data.train_per_class=300"],
    }[method]
    r = run(
        f"--config=configs/fashion_mnist.py:{method},ipc2", f"--workdir={workdir}", *QUICK, *extra
    )
    assert r.returncode == 0, r.stderr[-3000:]
    if method == "random":
        assert len(list(workdir.glob("zca_*.npz"))) == 1
    with np.load(workdir / "distilled.npz") as f:
        assert f["images"].shape == (20, 28, 28, 1)
        # Pixel space (de-normalised, ZCA inverted): real images come back within [0, 1].
        assert -1e-3 <= f["images"].min() and f["images"].max() <= 1.0 + 1e-3
        np.testing.assert_array_equal(np.bincount(f["labels"]), np.full(10, 2))
        assert json.loads(str(f["config"]))["method"] == method
    assert (workdir / "grid.png").stat().st_size > 0
    results = json.loads((workdir / "results.json").read_text())
    acc = results["accuracy"]["convnet"]["mean"]
    assert 0.0 <= acc <= 1.0 and results["ipc"] == 2
    assert "results in" in r.stdout


BAD_INPUTS = {
    "unknown method": (["--config=configs/fashion_mnist.py:bogus,ipc10"], "unknown method 'bogus'"),
    "ipc zero": (["--config=configs/fashion_mnist.py:random,ipc0"], "ipc must be a positive"),
    "ipc negative": (["--config=configs/fashion_mnist.py", "--config.ipc=-3"], "got -3"),
    "ipc above smallest class": (
        ["--config=configs/fashion_mnist.py:random,ipc4", "--config.data.path={tiny}"],
        "larger than the smallest class (3 examples)",
    ),
    "unknown model": (["--config.model.name=lenet7"], "unknown model 'lenet7'"),
    "unknown eval model": (["--config.eval.models=('convnet','vgg99')"], "unknown model 'vgg99'"),
    "unknown norm": (["--config.model.norm=weird"], "unknown norm 'weird'"),
    "unknown activation": (["--config.model.act=gelu7"], "unknown activation 'gelu7'"),
    "unknown augmentation op": (
        ["--config.dsa.strategy=color_bogus"],
        "unknown augmentation op 'bogus'",
    ),
    "unknown data source": (["--config.data.source=ftp"], "unknown data.source 'ftp'"),
    "unknown coreset features": (["--config.coreset.features=sift"], "unknown coreset.features"),
    "unknown tfds dataset": (
        ["--config.data.name=no_such_dataset", "--config.data.source=tfds"],
        "unknown tfds dataset 'no_such_dataset'",
    ),
    "missing local folder": (
        ["--config.data.path=/nonexistent/fmnist"],
        "apt-get install dataset-fashion-mnist",
    ),
    "corrupt npz": (["--config.data.path={corrupt_npz}"], "corrupt npz file"),
    "truncated idx": (["--config.data.path={truncated}"], "corrupt IDX file"),
    "config type error": (["--config.ipc=abc"], "--config.ipc=abc"),
    "unknown config field": (["--config.nokey=3"], "unknown config field 'nokey'"),
    "missing config file": (["--config=configs/nothere.py"], "cannot load config file"),
    "non-positive lr": (["--config.eval.lr=0.0"], "eval.lr must be > 0"),
    "workdir is a file": (["--workdir={file}"], "is a file"),
    "unknown mode": (["--mode=dance"], "unknown mode 'dance'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_and_exit_code_2(tmp_path, tiny_folder, case):
    args, expected = BAD_INPUTS[case]
    corrupt_npz = tmp_path / "bad.npz"
    corrupt_npz.write_bytes(b"PK\x03\x04 definitely not a zip")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in tiny_folder.iterdir():
        (truncated / f.name).write_bytes(f.read_bytes())
    content = gzip.decompress((truncated / "train-images-idx3-ubyte.gz").read_bytes())
    (truncated / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(content[:-10]))
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    subs = dict(tiny=tiny_folder, corrupt_npz=corrupt_npz, truncated=truncated, file=a_file)
    args = [a.format(**subs) for a in args]
    if not any(a.startswith("--config=") for a in args):
        args.insert(0, "--config=configs/fashion_mnist.py:random,ipc1")
    workdir = tmp_path / "wd"
    if not any(a.startswith("--workdir") for a in args):
        args.append(f"--workdir={workdir}")
    r = run(*args, *QUICK)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    assert not workdir.exists()  # nothing written
    assert a_file.read_text() == "keep me"


def test_console_entry_point_behaves_like_run_py():
    script = os.path.join(os.path.dirname(sys.executable), "mim4dd")
    if not os.path.exists(script):
        pytest.skip("package not installed with pip install -e . (make test installs it)")
    r = subprocess.run(
        [script, "--config=configs/fashion_mnist.py:bogus,ipc1", "--workdir=/nonexistent/x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.strip().startswith("error: unknown method 'bogus'")
