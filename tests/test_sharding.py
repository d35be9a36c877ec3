"""Sharding over a device mesh: 1 device and 4 simulated CPU devices give the same DM, DC and
MTT steps and the same run.py result; a mesh that does not fit the devices is one error line;
the multi-process launch is recognised from the environment.

The 4-device side runs in subprocesses with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
set before jax is imported; they all start at once (the first test that needs one starts them)
while this process, which has one CPU device, computes the references.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import sharding_worker
from helpers import ROOT, TINY, write_fake_npz

from mim4dd_jax import config as config_lib
from mim4dd_jax import sharding
from mim4dd_jax.errors import ConfigError

FOUR = "--xla_force_host_platform_device_count=4"
# run.py on 4 classes (one per device), ipc 3 with the synthetic set sharded (12 images, one
# class per device) and checkpointed by orbax after steps 2 and 3; 2 evaluation models spread
# over the 4 devices (padded to 4). Both runs get the same configs/default.py fields besides.
E2E = [
    "--config=configs/default.py:dm,ipc3",
    *[f"--config.{k}={v}" for k, v in TINY.items()],
    "--config.mi.weight=0.0",
    "--config.data.source=npz",
    "--config.distill.iterations=3",
    "--config.distill.checkpoint_every=2",
    "--config.distill.log_every=1",
    "--config.distill.eval_every=0",
    "--config.eval.epochs=1",
    "--config.eval.num_models=2",
    "--config.mesh.shard_synthetic=True",
]


def env(devices: int) -> dict[str, str]:
    e = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    # The children run at the same time (and compile programs of their own): no shared cache.
    e.pop("JAX_COMPILATION_CACHE_DIR", None)
    flags = e.get("XLA_FLAGS", "").replace(FOUR, "")
    e["XLA_FLAGS"] = f"{flags} {FOUR}".strip() if devices == 4 else flags
    return e


def start(args: list[str], devices: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env(devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=900)
    return proc.returncode, err


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """All subprocesses, started together: {name: (Popen, path)}."""
    tmp = tmp_path_factory.mktemp("sharding")
    data = write_fake_npz(tmp / "fake.npz", num_classes=4)
    run = [os.path.join(ROOT, "run.py"), *E2E, f"--config.data.path={data}"]
    procs = {
        "steps": (
            start([sharding_worker.__file__, str(tmp / "steps.npz")], 4),
            tmp / "steps.npz",
        ),
        "run4": (start([*run, f"--workdir={tmp / 'run4'}"], 4), tmp / "run4"),
        "run1": (start([*run, f"--workdir={tmp / 'run1'}"], 1), tmp / "run1"),
        "bad": (
            start([*run, f"--workdir={tmp / 'bad'}", "--config.mesh.shape=(2,)"], 1),
            tmp / "bad",
        ),
    }
    yield procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def four_device_steps(launched):
    proc, path = launched["steps"]
    code, err = finish(proc)
    assert code == 0, err[-3000:]
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def one_device_steps(launched):
    """The references, in this process (one CPU device) while the subprocesses run."""
    return {name: sharding_worker.run_case(name) for name in sharding_worker.CASES}


@pytest.mark.parametrize("method", list(sharding_worker.CASES))
def test_steps_on_1_and_4_devices_agree(one_device_steps, four_device_steps, method):
    one = one_device_steps[method]
    four = {
        k.split("/", 1)[1]: v for k, v in four_device_steps.items() if k.startswith(method + "/")
    }
    assert int(one["devices"]) == 1 and int(four["devices"]) == 4
    assert "spec=P()" in str(four["image_sharding"])  # the state came back replicated
    assert int(one["skipped"]) == int(four["skipped"]) == 0
    np.testing.assert_allclose(four["loss"], one["loss"], rtol=1e-5)
    np.testing.assert_allclose(four["base_loss"], one["base_loss"], rtol=1e-5)
    if "mi" in one:
        # The MI estimate is a small difference of O(loss) log-sum-exps: relative to the loss.
        np.testing.assert_allclose(four["mi"], one["mi"], rtol=1e-5, atol=1e-5 * one["loss"])
    scale = np.max(np.abs(one["grad"]))
    assert scale > 0
    np.testing.assert_allclose(four["grad"], one["grad"], rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(four["syn_lr"], one["syn_lr"], rtol=1e-5)


def test_shard_synthetic_that_does_not_divide_is_a_config_error(four_device_steps):
    message = str(four_device_steps["plan_error"])
    assert "mesh.shard_synthetic=True" in message and "4 devices" in message, message
    assert "multiple of 4" in message and "\n" not in message


def test_run_py_on_4_devices_writes_the_same_distilled_npz(launched):
    results = {}
    for name in ("run1", "run4"):
        proc, workdir = launched[name]
        code, err = finish(proc)
        assert code == 0, err[-3000:]
        results[name] = workdir
    one, four = results["run1"], results["run4"]
    with np.load(one / "distilled.npz") as a, np.load(four / "distilled.npz") as b:
        assert a["images"].shape == (12, 8, 8, 1) and a["images"].std() > 0
        np.testing.assert_array_equal(a["labels"], b["labels"])
        np.testing.assert_allclose(b["images"], a["images"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(b["lr"], a["lr"], rtol=1e-6)
    # Two evaluation models (spread over 4 devices): the same accuracies up to a test image.
    acc = [json.loads((w / "results.json").read_text())["accuracy"] for w in (one, four)]
    np.testing.assert_allclose(acc[1]["convnet"]["all"], acc[0]["convnet"]["all"], atol=1 / 48)
    assert sorted(os.listdir(four / "checkpoints")) == ["2", "3"]
    rows = [json.loads(line) for line in (four / "metrics.jsonl").read_text().splitlines()]
    assert [r["compiles"] for r in rows if "loss" in r] == [1, 1, 1]  # stable shardings


def test_mesh_that_does_not_fit_the_devices_is_one_line_and_exit_code_2(launched):
    proc, workdir = launched["bad"]
    code, err = finish(proc)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "mesh.shape=(2,)" in lines[0] and "1 device(s)" in lines[0], lines[0]
    assert "valid: mesh.shape=()" in lines[0]
    assert not workdir.exists()


def test_check_mesh():
    assert sharding.check_mesh((), ("data",), 4) == (4,)
    assert sharding.check_mesh((2, 2), ("host", "data"), 4) == (2, 2)
    for shape, axes, match in [
        ((3,), ("data",), "mesh.shape=\\(3,\\).*4 device"),
        ((2, 2), ("data",), "product is 4"),
        ((), ("a", "b"), "one name"),
        ((4,), ("data", "data"), "distinct"),
        ((True,), ("data",), "positive ints"),
    ]:
        with pytest.raises(ConfigError, match=match):
            sharding.check_mesh(shape, axes, 4)
    c = config_lib.build({"name": "fake"}, "dm,ipc1")
    config_lib.validate(c)  # the default mesh fits any device count
    c.mesh.distributed = "maybe"
    with pytest.raises(ConfigError, match="'auto', 'on', 'off'"):
        config_lib.validate(c)


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, False),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
        ({"SLURM_NTASKS": "4", "SLURM_PROCID": "1", "SLURM_STEP_NODELIST": "n[1-2]"}, True),
        ({"SLURM_NTASKS": "4"}, False),  # an salloc shell, no srun step: one process
        ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "n1"}, False),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
        ({"OMPI_COMM_WORLD_SIZE": "1"}, False),
        ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, True),
        ({"TPU_WORKER_HOSTNAMES": "w0"}, False),
    ],
)
def test_multiprocess_launch_is_recognised(environ, expected):
    assert sharding.multiprocess_env(environ) is expected
    if not expected:  # "auto" then never calls jax.distributed.initialize
        assert sharding.initialize_distributed("auto", environ) is False
