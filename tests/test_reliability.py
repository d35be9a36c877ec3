"""Reliability (issue 7): a run killed by SIGKILL resumes onto the same bytes, a non-finite step
is skipped and too many in a row stop the run with the last good artifacts intact, the MTT lr
stays positive, and every user mistake is one line, exit code 2 and an untouched workdir."""

import importlib.util
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    ROOT,
    SMALL_NET,
    cli_command,
    cli_env,
    fake_dataset,
    fake_experts,
    tiny_config,
    write_mnist_folder,
)
from helpers import run_cli as run

from mim4dd_jax import artifacts, checkpoint, data, distill
from mim4dd_jax import config as config_lib
from mim4dd_jax import state as state_lib
from mim4dd_jax import steps as steps_lib
from mim4dd_jax.errors import ConfigError

KEY = jax.random.key(0)


def host(tree):
    """A host copy (the step donates the device buffers)."""
    return jax.tree.map(lambda a: np.array(a, copy=True), tree)


def assert_same_bits(a, b):
    """Every leaf equal bit for bit (NaN-safe, dtype and shape included)."""
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def snapshot(folder):
    """{relative path: bytes (None for a folder)} of everything under ``folder``."""
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
        for p in sorted(folder.rglob("*"))
    }


# ----------------------------------------------------------------------------------------------
# Deterministic resume after SIGKILL.
# ----------------------------------------------------------------------------------------------

ITERATIONS = 12
SHRINK = [
    "--config=configs/fashion_mnist.py:dm,ipc1,local",
    "--config.model.width=8",
    "--config.model.depth=2",
    "--config.data.train_per_class=20",
    "--config.data.test_per_class=10",
    "--config.distill.batch_real=8",
    "--config.eval.epochs=2",
    "--config.dsa.strategy=crop_flip",
    # A checkpoint every 3 steps, a metrics row every step: a kill between two checkpoints
    # leaves rows of steps the resumed run redoes.
    "--config.distill.checkpoint_every=3",
    f"--config.distill.iterations={ITERATIONS}",
    "--config.distill.log_every=1",
]


def _tiny_mnist_folder(folder):
    """10 classes of 20 random 28x28 train images (10 test): start-up in a fraction of the time
    Fashion-MNIST's 70k images take to decode and subset."""
    folder.mkdir()
    write_mnist_folder(folder, train_per_class=20, test_per_class=10)
    return [
        "--config.data.source=mnist_folder",
        f"--config.data.path={folder}",
    ]


def _start(workdir, log, data_args):
    # Its own process group (session), which the test kills whole, as a scheduler or an OOM
    # killer of a job does.
    return subprocess.Popen(
        cli_command(*SHRINK, *data_args, f"--workdir={workdir}"),
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),  # noqa: SIM115 - closed with the process
        start_new_session=True,
    )


def _steps_on_disk(folder):
    """Completed checkpoints (orbax renames a finished one to its step number)."""
    return [int(n) for n in os.listdir(folder) if n.isdigit()] if folder.is_dir() else []


def _logged_steps(workdir):
    """The steps of the training rows of metrics.jsonl (those with a loss), in file order."""
    path = workdir / "metrics.jsonl"
    rows = artifacts.read_metrics(str(path)) if path.is_file() else []
    return [r["step"] for r in rows if "loss" in r]


def _tensorboard_steps(workdir, tag="loss"):
    """The steps of a scalar as TensorBoard shows it (orphaned events purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(workdir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


@pytest.mark.slow
def test_sigkill_of_the_process_group_then_the_same_command_gives_identical_bytes(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    data_args = _tiny_mnist_folder(tmp_path / "data")
    # The uninterrupted run and the one to kill share the two start-ups (imports, data, compile).
    reference = _start(straight, tmp_path / "straight.log", data_args)
    victim = _start(killed, tmp_path / "killed.log", data_args)
    deadline = time.monotonic() + 300
    # Killed once checkpoint 3 exists and a later step has been logged (before checkpoint 6).
    while not (
        max(_steps_on_disk(killed / "checkpoints"), default=0) >= 3
        and max(_logged_steps(killed), default=0) > max(_steps_on_disk(killed / "checkpoints"))
    ):
        assert victim.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint 3 within 300 s"
        time.sleep(0.005)
    os.killpg(victim.pid, signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert reference.wait(timeout=300) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    # Killed mid-distillation: checkpoints, but not the last one, and no results yet; rows of
    # steps after the last checkpoint, which the resumed run does again.
    saved = max(_steps_on_disk(killed / "checkpoints"))
    assert 3 <= saved < ITERATIONS
    assert max(_logged_steps(killed)) > saved
    assert not (killed / "distilled.npz").exists()

    r = run(*SHRINK, *data_args, f"--workdir={killed}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"from iteration {saved}" in r.stderr
    assert (killed / "distilled.npz").read_bytes() == (straight / "distilled.npz").read_bytes()
    # Every step once, in order, in the trace and in TensorBoard.
    assert _logged_steps(killed) == list(range(1, ITERATIONS + 1)) == _logged_steps(straight)
    assert _tensorboard_steps(killed) == list(range(1, ITERATIONS + 1))
    # The final evaluation once.
    rows = artifacts.read_metrics(str(killed / "metrics.jsonl"))
    assert [r["step"] for r in rows if "accuracy" in r] == [ITERATIONS]


# ----------------------------------------------------------------------------------------------
# Numerical guard.
# ----------------------------------------------------------------------------------------------


# How step k is poisoned: a non-finite input (an expert trajectory holding inf makes the MTT
# loss and every gradient non-finite), or finite gradients whose update overflows (an infinite
# image lr). Non-finite *real images* are no test: on XLA:CPU, jit(avg_pool(relu(x))) can turn
# NaN into finite numbers for some shapes, so the DM features may come out finite.
GUARD_CASES = {
    "mtt: inf in an expert trajectory": (
        "mtt,ipc2",
        {
            **SMALL_NET,
            "mtt.syn_steps": 2,
            "mtt.expert_epochs": 1,
            "mtt.max_start_epoch": 2,
            "distill.lr": 10.0,
        },
    ),
    "dm + mi: an update that overflows": ("dm,ipc2", {**SMALL_NET, "mi.weight": 0.5}),
}


@pytest.mark.parametrize("case", sorted(GUARD_CASES))
def test_non_finite_step_leaves_the_state_unchanged_and_is_counted(case):
    arg, overrides = GUARD_CASES[case]
    dataset = fake_dataset(3, 12, 8)
    config = tiny_config(arg, **overrides)
    step = steps_lib.make_step(config, dataset)
    real = jnp.asarray(dataset.train_images)
    index = data.class_index(dataset.train_labels, 3)
    experts = fake_experts(config, dataset) if config.method == "mtt" else None
    if config.method == "mtt":
        bad_step, bad_experts = step, jnp.full_like(experts, jnp.inf)
    else:
        bad_step = steps_lib.make_step(
            tiny_config(arg, **overrides, **{"distill.lr": np.inf}), dataset
        )
        bad_experts = None
    state = state_lib.init_state(jax.random.fold_in(KEY, 0), dataset, config)

    def one(step, state, it, experts):
        state, metrics = step(state, jax.random.fold_in(KEY, it), real, index, experts)
        return state, jax.device_get(metrics)

    for it in range(2):
        state, metrics = one(step, state, it, experts)
        assert metrics["skipped"] == 0
    before = host(state)
    state, metrics = one(bad_step, state, 2, bad_experts)  # step k = 2
    assert metrics["skipped"] == 1
    # Images, heads, syn_lr, labels and every optimiser state: bit for bit.
    assert_same_bits(host(state), before)

    state, metrics = one(step, state, 3, experts)
    assert metrics["skipped"] == 0 and np.isfinite(metrics["loss"])
    assert np.max(np.abs(np.asarray(state["images"]) - before["images"])) > 0
    assert step._cache_size() == 1


def test_bound_watch_warns_once_when_the_mi_estimate_stays_dead(capsys):
    watch = distill._BoundWatch(
        tiny_config("dm,ipc1", **{"mi.weight": 0.1, "guard.mi_alive_by": 20})
    )
    # Below 0.1 nats summed (0.09), but before iteration 20: no warning yet.
    assert not watch.see(10, 0.02 + 0.03 + 0.04)
    assert watch.see(20, 0.01)  # best 0.09 < 0.1 at iteration 20
    assert not watch.see(30, 0.0)  # once
    out = capsys.readouterr().out
    assert out.count("guard.mi_alive_nats=0.1 nats (best 0.09") == 1
    assert "mi.heads=per_side: 3e-4" in out
    alive = distill._BoundWatch(
        tiny_config("dm,ipc1", **{"mi.weight": 0.1, "guard.mi_alive_by": 20})
    )
    assert not alive.see(10, 0.05 + 0.03 + 0.04)  # 0.12: a live bound, even if it dips later
    assert not alive.see(20, 0.0) and not alive.see(30, 0.0)
    for off in (
        {"mi.weight": 0.1, "guard.mi_alive_by": 0},
        {"mi.weight": 0.0, "guard.mi_alive_by": 20},
        {
            "mi.weight": 0.1,
            "guard.mi_alive_by": 20,
            "mi.objective": "cmidd",  # a conditional MI that is minimised: small is the goal
            "mi.head": "none",
        },
    ):
        assert not distill._BoundWatch(tiny_config("dm,ipc1", **off)).see(50, 0.0)
    assert capsys.readouterr().out == ""


def test_a_run_whose_mi_bound_stays_dead_says_so(fake_npz, tmp_path, capsys):
    overrides = {
        **SMALL_NET,
        "data.source": "npz",
        "data.path": fake_npz,
        "distill.iterations": 3,
        "distill.log_every": 1,
        "distill.eval_every": 0,
        "eval.epochs": 1,
        "eval.num_models": 1,
        "mi.weight": 0.1,
        "guard.mi_alive_by": 2,
    }
    # No real bound reaches 1e9 nats: the check must fire at iteration 2, once.
    distill.run(
        tiny_config("dm,ipc1", **overrides, **{"guard.mi_alive_nats": 1e9}),
        str(tmp_path / "dead"),
    )
    assert capsys.readouterr().out.count("at iteration 2: the heads are not learning") == 1
    distill.run(
        tiny_config("dm,ipc1", **overrides, **{"guard.mi_alive_nats": -1e9}),
        str(tmp_path / "alive"),
    )
    assert "not learning" not in capsys.readouterr().out


def test_guard_stops_the_run_and_keeps_the_last_good_artifacts(fake_npz, tmp_path, monkeypatch):
    config = tiny_config(
        "dm,ipc1",
        **{
            **SMALL_NET,
            "data.source": "npz",
            "data.path": fake_npz,
            "distill.iterations": 10,
            "distill.checkpoint_every": 2,
            "distill.eval_every": 2,
            "distill.log_every": 1,
            "eval.epochs": 1,
            "eval.num_models": 1,
            "guard.max_consecutive": 2,
        },
    )
    good_calls, last_good = 3, {}
    make_step = steps_lib.make_step

    def poisoned_after(config, dataset, *args, **kwargs):
        # From iteration 3 on, the same step with an infinite image lr: every update overflows.
        overflowing = config.copy_and_resolve_references()
        overflowing.distill.lr = float("inf")
        step, calls = make_step(config, dataset, *args, **kwargs), [0]
        bad_step = make_step(overflowing, dataset, *args, **kwargs)

        def wrapped(*step_args):
            state, metrics = (step if calls[0] < good_calls else bad_step)(*step_args)
            if calls[0] < good_calls:
                last_good.update(host(state))
            calls[0] += 1
            return state, metrics

        wrapped._cache_size = step._cache_size
        return wrapped

    monkeypatch.setattr(steps_lib, "make_step", poisoned_after)
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"guard\.max_consecutive=2"):
        distill.run(config, str(workdir))

    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows if "loss" in r] == [0, 0, 0, 1, 1]  # stopped after 2
    # The evaluation at iteration 4 and checkpoint 4 came after a skip: both hold the last
    # good state (the one after iteration 2), bit for bit.
    with np.load(workdir / "distilled.npz") as f:
        assert int(f["iteration"]) == 4
        assert f["model_images"].tobytes() == last_good["images"].tobytes()
    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"))
    dataset = data.load_from_config(config.data)
    step, restored = ckpt.restore(state_lib.init_state(KEY, dataset, config))
    ckpt.close()
    assert step == 4
    assert_same_bits(host(restored), last_good)


def test_mtt_lr_is_learned_from_lr_teacher():
    # Learned as the lr itself, as the reference does; the guard keeps it positive
    # (tests/test_protocol.py).
    dataset = fake_dataset(3, 12, 8)
    config = tiny_config("mtt,ipc1")
    state = state_lib.init_state(KEY, dataset, config)
    assert "syn_lr" in state_lib.learned_parts(config)
    np.testing.assert_allclose(state["syn_lr"], config.mtt.lr_teacher, rtol=1e-7)


# ----------------------------------------------------------------------------------------------
# Bad inputs (the rows tests/test_cli.py does not have): one line, exit code 2, workdir untouched.
# ----------------------------------------------------------------------------------------------

# case: (config argument, extra flags, expected text in the error line)
BAD_INPUTS = {
    "unknown optimizer": (
        "dm,ipc1",
        ["--config.distill.optimizer=sgdd"],
        "unknown distill.optimizer 'sgdd'; valid choices: 'sgd', 'adam'",
    ),
    "unknown MI estimator": (
        "dm,ipc1",
        ["--config.mi.estimator=bogus"],
        "unknown MI estimator 'bogus'; valid choices: 'infonce', 'nce', 'nwj', 'js'",
    ),
    "init_from with the wrong image shape": (
        "dm,ipc1",
        ["--config.distill.init_from={shape_npz}"],
        "holds images of shape (32, 32, 3); fashion_mnist needs (28, 28, 1)",
    ),
    "init_from with the wrong classes": (
        "dm,ipc1",
        ["--config.distill.init_from={classes_npz}"],
        "has labels outside 0..9 or not one per image; fashion_mnist has 10 classes",
    ),
    "MTT without experts_dir": ("mtt,ipc1", [], "set --config.mtt.experts_dir"),
    "MTT experts folder missing": (
        "mtt,ipc1",
        ["--config.mtt.experts_dir=/nonexistent/experts"],
        "expert folder '/nonexistent/experts' does not exist; train them first: python run.py",
    ),
    "MTT experts folder empty": (
        "mtt,ipc1",
        ["--config.mtt.experts_dir={empty}"],
        "has no meta.json, so no experts; train them first: python run.py",
    ),
    "non-positive image lr": ("dm,ipc1", ["--config.distill.lr=0"], "distill.lr must be > 0"),
    "negative MTT lr": (
        "mtt,ipc1",
        ["--config.mtt.lr_teacher=-0.01"],
        "mtt.lr_teacher must be > 0, got -0.01",
    ),
    "non-positive temperature": (
        "dm,ipc1",
        ["--config.mi.temperature=0"],
        "mi.temperature must be > 0",
    ),
    "guard disabled": (
        "dm,ipc1",
        ["--config.guard.max_consecutive=0"],
        "guard.max_consecutive must be an integer >= 1, got 0",
    ),
    "negative MI check iteration": (
        "dm,ipc1",
        ["--config.guard.mi_alive_by=-1"],
        "guard.mi_alive_by must be an integer >= 0, got -1",
    ),
    "infinite MI check threshold": (
        "dm,ipc1",
        ["--config.guard.mi_alive_nats=inf"],
        "guard.mi_alive_nats must be a finite number, got inf",
    ),
}
# Checked only after the data is loaded (inside the mode's run): also run with a workdir that
# holds earlier results, which must survive byte for byte.
AFTER_DATA = [case for case in BAD_INPUTS if "init_from" in case or "experts" in case]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny MNIST-format folder (3 train, 2 test images per class), bad init files and an
    empty experts folder."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "tiny").mkdir()
    tiny = write_mnist_folder(root / "tiny", 3, 2)
    np.savez(root / "shape.npz", images=np.zeros((10, 32, 32, 3)), labels=np.arange(10))
    np.savez(root / "classes.npz", images=np.zeros((12, 28, 28, 1)), labels=np.arange(12))
    (root / "empty").mkdir()
    return dict(
        tiny=tiny,
        shape_npz=root / "shape.npz",
        classes_npz=root / "classes.npz",
        empty=root / "empty",
    )


def check_one_line(r, expected):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert expected in lines[0], lines[0]


def previous_results(workdir):
    workdir.mkdir()
    (workdir / "distilled.npz").write_bytes(b"earlier results")
    (workdir / "notes.txt").write_text("keep me")
    return snapshot(workdir)


@pytest.mark.parametrize(
    "case, existing",
    [(case, False) for case in sorted(BAD_INPUTS)] + [(case, True) for case in AFTER_DATA],
)
def test_bad_input_gives_one_line_and_leaves_the_workdir_alone(tmp_path, inputs, case, existing):
    arg, flags, expected = BAD_INPUTS[case]
    workdir = tmp_path / "wd"
    before = previous_results(workdir) if existing else None
    r = run(
        f"--config=configs/fashion_mnist.py:{arg}",
        f"--config.data.path={inputs['tiny']}",
        *(f.format(**inputs) for f in flags),
        f"--workdir={workdir}",
    )
    check_one_line(r, expected)
    assert snapshot(workdir) == before if existing else not workdir.exists()


def test_a_workdir_another_run_holds_is_one_line_and_left_alone(tmp_path, inputs):
    # Another process's run (here: a holder of the same flock, in its own process) is still in
    # the workdir, e.g. saving its checkpoint after a SIGTERM: a second run on it stops at once.
    workdir = tmp_path / "wd"
    before = previous_results(workdir)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)",
            str(workdir),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        r = run(
            "--config=configs/fashion_mnist.py:dm,ipc1",
            f"--config.data.path={inputs['tiny']}",
            f"--workdir={workdir}",
        )
        check_one_line(r, f"workdir '{workdir}' is in use by another run (still running, or")
        assert snapshot(workdir) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_run_holds_its_workdir_until_it_ends(tmp_path):
    from mim4dd_jax import errors, runner

    workdir = tmp_path / "wd"
    workdir.mkdir()
    probe = [
        sys.executable,
        "-c",
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY)\n"
        "try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "except BlockingIOError: sys.exit(3)",
        str(workdir),
    ]
    runner.lock(str(workdir))
    try:
        runner.lock(str(workdir))  # again by the same process: a no-op
        assert subprocess.run(probe).returncode == 3  # another process is refused
    finally:
        runner.unlock(str(workdir))
    assert subprocess.run(probe).returncode == 0  # released

    # A mode's run releases it however it ends, a refusal included.
    @runner.holds_workdir
    def refused(config, workdir):
        runner.lock(workdir)
        assert subprocess.run(probe).returncode == 3
        raise errors.ConfigError("refused")

    with pytest.raises(errors.ConfigError, match="refused"):
        refused(None, str(workdir))
    assert subprocess.run(probe).returncode == 0
    # And the other way round: this process is refused while another holds it.
    fd = os.open(workdir, os.O_RDONLY)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(errors.ConfigError, match="is in use by another run"):
            runner.lock(str(workdir))
    finally:
        os.close(fd)


# Root ignores file permissions through CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH. setpriv drops
# both from the bounding and inheritable sets, so the child (still uid 0, so it can run an
# interpreter installed under /root) is refused as any user would be.
_DROP_DAC = "-dac_override,-dac_read_search"
SETPRIV = ("setpriv", f"--bounding-set={_DROP_DAC}", f"--inh-caps={_DROP_DAC}", "--")


def _without_root():
    """``run_cli`` arguments under which permissions apply: none for a normal user; as root,
    the setpriv prefix above, else (no setpriv, or no CAP_SETPCAP to drop a capability) the
    user "nobody". Skips only where neither can be had, saying why."""
    if os.geteuid() != 0:
        return {}
    probe_dir = pathlib.Path(tempfile.mkdtemp(prefix="setpriv_probe_"))
    try:
        probe_dir.chmod(0o555)
        write = f"open({str(probe_dir / 'x')!r}, 'w')"
        try:
            probe = subprocess.run([*SETPRIV, sys.executable, "-c", write], capture_output=True)
            setpriv_why = probe.stderr.decode(errors="replace").strip().splitlines()[-1:]
            if probe.returncode and b"PermissionError" in probe.stderr:
                return {"prefix": SETPRIV}  # the capability is gone: permissions apply
            setpriv_why = setpriv_why or ["the write was allowed"]
        except OSError as e:
            setpriv_why = [e.strerror]
    finally:
        probe_dir.chmod(0o755)
        shutil.rmtree(probe_dir)
    user = dict(user=65534, group=65534, extra_groups=[])
    try:
        probe = subprocess.run([sys.executable, "-c", ""], capture_output=True, **user)
        nobody_why = f"exit code {probe.returncode}"
    except OSError as e:
        probe, nobody_why = None, e.strerror
    if probe is not None and probe.returncode == 0:
        return user
    pytest.skip(
        f"running as root: setpriv cannot drop CAP_DAC_OVERRIDE ({setpriv_why[0]}) and "
        f"'nobody' cannot run {sys.executable} ({nobody_why})"
    )


@pytest.mark.parametrize("existing", [False, True])
def test_workdir_that_is_not_writable(inputs, existing):
    user = _without_root()
    parent = pathlib.Path(tempfile.mkdtemp(prefix="readonly_"))  # "nobody" can reach /tmp
    workdir = parent / "wd"
    try:
        before = previous_results(workdir) if existing else None
        for folder in (workdir, parent) if existing else (parent,):
            folder.chmod(0o555)
        r = run(
            "--config=configs/fashion_mnist.py:dm,ipc1",
            f"--config.data.path={inputs['tiny']}",
            f"--workdir={workdir}",
            **user,
        )
        check_one_line(r, f"workdir {str(workdir)!r} is not writable")
        assert snapshot(workdir) == before if existing else not workdir.exists()
    finally:
        for folder in (parent, workdir):
            if folder.is_dir():
                folder.chmod(0o755)
        shutil.rmtree(parent)


def _file_config(arg, overrides):
    """``configs/fashion_mnist.py:get_config(arg)`` with dotted overrides, as run.py builds it."""
    spec = importlib.util.spec_from_file_location(
        "fashion_mnist_config", os.path.join(ROOT, "configs", "fashion_mnist.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    for dotted, value in overrides.items():
        config_lib.set_dotted(config, dotted, value)
    return config


def test_finished_workdir_refuses_a_different_config(tmp_path, inputs):
    overrides = {
        "data.path": str(inputs["tiny"]),
        "model.width": 8,
        "model.depth": 1,
        "distill.iterations": 2,
        "distill.batch_real": 2,
        "distill.eval_every": 0,
        "distill.dsa": False,  # the refusal is about the stored config, not about the run
        "eval.dsa": False,
        "eval.epochs": 1,
        "eval.num_models": 1,
    }
    workdir = tmp_path / "finished"
    distill.run(_file_config("dm,ipc1", overrides), str(workdir))
    assert (workdir / "distilled.npz").is_file() and (workdir / "results.json").is_file()
    before = snapshot(workdir)

    flags = [f"--config.{k}={v}" for k, v in overrides.items()]
    r = run(
        "--config=configs/fashion_mnist.py:dm,ipc1",
        *flags,
        "--config.distill.lr=0.5",
        f"--workdir={workdir}",
    )
    check_one_line(r, "holds a run with distill.lr=1.0, not 0.5; it has finished")
    assert snapshot(workdir) == before
