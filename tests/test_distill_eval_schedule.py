"""The evaluation schedule of a distillation run: the initial set is evaluated (iteration 0),
results.json labels the final and the best evaluation, accuracy.png starts at 0, and a resumed
run does not evaluate again an iteration it has already logged."""

import json

import pytest
from helpers import SMALL_NET, tiny_config

from mim4dd_jax import artifacts, distill, evaluate

C, HW = 3, 8


def config_for(fake_npz, **overrides):
    fields = {
        "data.source": "npz",
        "data.path": fake_npz,
        "distill.iterations": 3,
        "distill.eval_every": 2,
        "distill.checkpoint_every": 1,
        "eval.epochs": 1,
        "eval.num_models": 2,
        "eval.dsa": False,
        **SMALL_NET,
        "distill.dsa": False,
        **overrides,
    }
    return tiny_config("dm,ipc1", **fields)


def test_iteration_zero_is_evaluated_plotted_and_final_and_best_are_labelled(
    fake_npz, tmp_path, monkeypatch
):
    plotted = []
    import matplotlib.axes

    real_errorbar = matplotlib.axes.Axes.errorbar

    def spy(self, x, y, *args, **kwargs):
        plotted.append(list(x))
        return real_errorbar(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", spy)
    workdir = tmp_path / "run"
    summary = distill.run(config_for(fake_npz), str(workdir))

    history = artifacts.accuracy_history(str(workdir))
    assert sorted(history["convnet"]) == [0, 2, 3]
    assert plotted[-1] == [0, 2, 3]  # accuracy.png's curve starts at the initial set
    for it in (0, 2, 3):
        assert (workdir / f"grid_{it:06d}.png").is_file()
    results = json.loads((workdir / "results.json").read_text())
    assert results == json.loads(json.dumps(summary))
    assert results["final"]["convnet"]["iteration"] == 3
    assert results["final"]["convnet"]["mean"] == results["accuracy"]["convnet"]["mean"]
    best_it = max(sorted(history["convnet"]), key=lambda it: history["convnet"][it]["mean"])
    assert results["best"]["convnet"]["iteration"] == best_it
    assert results["best"]["convnet"]["mean"] == history["convnet"][best_it]["mean"]
    assert results["num_models"] == 2 and len(results["final"]["convnet"]["all"]) == 2

    # TensorBoard has the image grid of every evaluation next to the scalars.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workdir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    grids = events.Images("synthetic/grid")
    assert [g.step for g in grids] == [0, 2, 3]
    assert grids[-1].encoded_image_string == (workdir / "grid.png").read_bytes()


def test_final_and_best_pick_the_last_and_the_highest_evaluation():
    curves = {
        "convnet": {
            0: {"mean": 0.5, "std": 0.0, "all": [0.5]},
            10: {"mean": 0.8, "std": 0.1, "all": [0.8]},
            20: {"mean": 0.7, "std": 0.0, "all": [0.7]},
        }
    }
    out = artifacts.final_and_best(curves)
    assert out["final"]["convnet"] == {"mean": 0.7, "std": 0.0, "all": [0.7], "iteration": 20}
    assert out["best"]["convnet"] == {"mean": 0.8, "std": 0.1, "all": [0.8], "iteration": 10}


def test_a_resumed_run_does_not_evaluate_a_logged_iteration_again(fake_npz, tmp_path, monkeypatch):
    config = config_for(fake_npz, **{"distill.iterations": 2, "distill.eval_every": 2})
    workdir = str(tmp_path / "run")
    distill.run(config, workdir)  # evaluates 0 and 2
    calls = []
    real = evaluate.evaluate_from_config

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_from_config", counting)
    # Continue the finished run to 4 iterations: it resumes at 2 (evaluated already, at the
    # end of the first run), so only iteration 4 is evaluated.
    distill.run(config_for(fake_npz, **{"distill.iterations": 4}), workdir)
    assert len(calls) == 1
    assert sorted(artifacts.accuracy_history(workdir)["convnet"]) == [0, 2, 4]


def test_eval_at_adds_the_listed_iterations(fake_npz, tmp_path):
    """distill.eval_at: a convergence curve at chosen iterations, beside eval_every (off here)
    and the final evaluation; an iteration beyond the run is refused by the config check."""
    config = config_for(fake_npz, **{"distill.eval_every": 0, "distill.eval_at": (0, 2)})
    workdir = tmp_path / "run"
    distill.run(config, str(workdir))
    assert sorted(artifacts.accuracy_history(str(workdir))["convnet"]) == [0, 2, 3]
    from mim4dd_jax import config as config_lib
    from mim4dd_jax.errors import ConfigError

    with pytest.raises(ConfigError, match=r"distill.eval_at entry 5 .* 0..distill.iterations=3"):
        config_lib.validate(config_for(fake_npz, **{"distill.eval_at": (1, 5)}))


@pytest.mark.parametrize("mi_weight", [0.0, 0.3])
def test_a_shorter_run_is_the_prefix_of_a_longer_one(fake_npz, tmp_path, mi_weight):
    """What a study's prefix cell (benchmarks/study.py derive_prefix) relies on: the evaluation
    at iteration k of a longer run is the one a run of k iterations ends with (no schedule
    spans the run's length; the MI heads and their optimiser included)."""
    fields = {
        "distill.eval_every": 0,
        "mi.weight": mi_weight,
        "mi.weight_mode": "relative",
        "mi.head": "linear",
    }
    short, long = tmp_path / "short", tmp_path / "long"
    distill.run(config_for(fake_npz, **fields, **{"distill.iterations": 2}), str(short))
    distill.run(
        config_for(fake_npz, **fields, **{"distill.iterations": 4, "distill.eval_at": (2,)}),
        str(long),
    )
    at_short = artifacts.accuracy_history(str(short))["convnet"]
    at_long = artifacts.accuracy_history(str(long))["convnet"]
    assert sorted(at_short) == [2] and sorted(at_long) == [2, 4]
    assert at_short[2]["all"] == at_long[2]["all"]
    # The synthetic sets themselves (rendered at each evaluation) agree at 2, and move after.
    grid = lambda run, it: (run / f"grid_{it:06d}.png").read_bytes()  # noqa: E731
    assert grid(short, 2) == grid(long, 2) != grid(long, 4)
