"""Resume for MTT (learned lr, soft labels) and DC, not just DM (issue 12): a run interrupted
mid-way and started again ends, bit for bit, where an uninterrupted run ends.

Two interruptions: a crash (as kill -9: the iterations after the last checkpoint are lost and
redone) and SIGTERM (the loop checkpoints the iteration it finished and exits). The step is
compiled once per test and shared by its runs, and the evaluation's training is replaced by a
stub (this is about the distillation state; ``tests/test_evaluate.py`` covers evaluation)."""

import os
import signal
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY_MTT, tiny_config
from jax.flatten_util import ravel_pytree

from mim4dd_jax import checkpoint, data, distill, inner, models
from mim4dd_jax import state as state_lib
from mim4dd_jax import steps as steps_lib

C, PER_CLASS, HW, IPC = 3, 12, 8, 2
ITERATIONS, EVERY = 4, 2
SMALL = {
    "model.depth": 1,
    "conv_impl": "xla",  # the same math as im2col, compiles faster
    "distill.iterations": ITERATIONS,
    "distill.checkpoint_every": EVERY,
    "distill.eval_every": 0,
    "distill.log_every": 1,
    "eval.num_models": 1,
}
MTT = TINY_MTT


class Crash(Exception):
    """Stands for a kill: the run stops without its usual checkpoint."""


def fake_trajectories(config, image_shape, num=2, epochs=2):
    """[num, epochs + 1, P] expert trajectories: random inits drifting a little per epoch
    (training and loading real experts is tests/test_experts.py's)."""
    model = models.build_model(config, C)
    out = []
    for e in range(num):
        flat, _ = ravel_pytree(
            inner.init_variables(model, jax.random.key(e), image_shape)["params"]
        )
        drift = 0.05 * jax.random.normal(jax.random.key(20 + e), flat.shape)
        out.append(np.stack([flat + t * drift for t in range(epochs + 1)]))
    return np.stack(out).astype(np.float32)


def run_config(arg, fake_npz, **overrides):
    return tiny_config(arg, **{"data.source": "npz", "data.path": fake_npz, **SMALL, **overrides})


class Runs:
    """distill.run with one shared step and a stubbed evaluation; counts the steps each run
    takes and can interrupt a run before its step number ``stop_at`` (0-based, counted over
    that run's own steps)."""

    def __init__(self, monkeypatch):
        self.step = None
        self.calls = 0
        self.stop_at = None
        self.how = None
        make_step = steps_lib.make_step

        def shared_step(config, dataset, *args, **kwargs):
            if self.step is None:
                self.step = make_step(config, dataset, *args, **kwargs)

            def step(*step_args):
                if self.calls == self.stop_at and self.how == "crash":
                    raise Crash
                if self.calls == self.stop_at and self.how == "sigterm":
                    os.kill(os.getpid(), signal.SIGTERM)  # handled after this step
                self.calls += 1
                # Committed, as a restored state is: one compilation serves all the runs.
                state, *rest = step_args
                return self.step(jax.device_put(state, jax.devices()[0]), *rest)

            step._cache_size = self.step._cache_size
            return step

        self.eval_lrs = []

        def evaluation_stub(keys, images, labels, lr, *args, **kwargs):
            self.eval_lrs.append(float(lr))
            return jnp.zeros(keys.shape[0])

        monkeypatch.setattr(steps_lib, "make_step", shared_step)
        monkeypatch.setattr(inner, "train_and_test_many", evaluation_stub)

    def run(self, config, workdir, stop_at=None, how=None):
        """Runs; returns the number of steps this run took."""
        self.calls, self.stop_at, self.how = 0, stop_at, how
        try:
            distill.run(config, str(workdir))
        finally:
            self.stop_at = None
        return self.calls


def final_state(config, workdir):
    """The state in the workdir's last checkpoint (step ITERATIONS)."""
    dataset = data.load_from_config(config.data)
    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"))
    try:
        assert ckpt.steps()[-1] == ITERATIONS
        step, state = ckpt.restore(state_lib.init_state(jax.random.key(0), dataset, config))
    finally:
        ckpt.close()
    assert step == ITERATIONS
    return jax.tree.map(np.asarray, state)


def assert_same_bits(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def check_resume(runs, config, tmp_path, how):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert runs.run(config, straight) == ITERATIONS
    if how == "crash":
        # Killed at the 4th step: checkpoint 2 is the newest, the 3rd step is lost and redone.
        with pytest.raises(Crash):
            runs.run(config, interrupted, stop_at=3, how="crash")
        resumed_from = EVERY
    else:
        # SIGTERM during the 3rd step: it finishes, is checkpointed (3) and the run exits.
        with pytest.raises(SystemExit) as exit_info:
            runs.run(config, interrupted, stop_at=2, how="sigterm")
        assert exit_info.value.code == 128 + signal.SIGTERM
        resumed_from = 3
    assert not (interrupted / "distilled.npz").exists()
    assert runs.run(config, interrupted) == ITERATIONS - resumed_from  # it resumed
    saved, resumed = read_npz(straight / "distilled.npz"), read_npz(interrupted / "distilled.npz")
    assert sorted(saved) == sorted(resumed)
    for name in saved:  # a readable message first, then every byte of the file
        np.testing.assert_array_equal(resumed[name], saved[name], err_msg=name)
    assert (interrupted / "distilled.npz").read_bytes() == (straight / "distilled.npz").read_bytes()
    assert_same_bits(final_state(config, interrupted), final_state(config, straight))
    return saved


def read_npz(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_mtt_with_learned_lr_and_soft_labels_resumes_exactly(fake_npz, tmp_path, monkeypatch):
    config = run_config(f"mtt,ipc{IPC}", fake_npz, **MTT, **{"mtt.experts_dir": "patched in"})
    trajectories = fake_trajectories(config, (HW, HW, 1))
    monkeypatch.setattr(
        distill, "_load_experts", lambda *a: types.SimpleNamespace(trajectories=trajectories)
    )
    runs = Runs(monkeypatch)
    saved = check_resume(runs, config, tmp_path, "crash")
    # The learned parts moved, so restoring them (and their optimiser states) is under test.
    learned = float(saved["lr"])
    assert learned != pytest.approx(config.mtt.lr_teacher, rel=1e-7)
    assert saved["labels"].shape == (C * IPC, C)
    initial = jax.nn.softmax(config.mtt.label_logit * np.eye(C)[np.repeat(np.arange(C), IPC)])
    assert np.max(np.abs(saved["labels"] - np.asarray(initial))) > 0
    # And the run's final evaluation trained its models with the learned lr.
    assert runs.eval_lrs[-1] == pytest.approx(learned, rel=1e-6)


def test_dc_resumes_exactly_after_sigterm(fake_npz, tmp_path, monkeypatch):
    # One outer step per iteration: the inner training (tested in test_reference_steps) would
    # only make the program bigger; the image momentum carries over between iterations.
    config = run_config(f"dc,ipc{IPC}", fake_npz, **{"distill.outer_loop": 1})
    assert config.distill.init == "noise" and config.distill.momentum > 0
    check_resume(Runs(monkeypatch), config, tmp_path, "sigterm")


def test_a_workdir_from_before_a_field_was_added_is_the_same_run(tmp_path):
    # Runs made before a field existed lack it in config.json; with the value that reproduces
    # them they resume, with any other value they are another run.
    import json

    config = tiny_config("dm,ipc1")
    fingerprint = distill._config_fingerprint(config)
    for name, value in distill._ADDED_FIELDS.items():
        assert fingerprint[name] == value, name  # the defaults still reproduce the old runs
    old = {k: v for k, v in fingerprint.items() if k not in distill._ADDED_FIELDS}
    (tmp_path / "config.json").write_text(json.dumps(old))
    distill.check_same_run(str(tmp_path), config)
    with config.unlocked():
        config.mi.objective = "cmidd"
    with pytest.raises(
        distill.ConfigError, match="holds a run with mi.objective=None, not 'cmidd'"
    ):
        distill.check_same_run(str(tmp_path), config)
