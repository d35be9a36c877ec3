"""The command-line shell: parse flags, build the config, call one library function per mode.

A user mistake (unknown name, bad path, bad flag value, ...) prints one ``error: ...`` line and exits
with status 2; nothing is written to the workdir before the config has been checked.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from mim4dd_jax.errors import ConfigError, check_choice

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and argument, e.g. configs/fashion_mnist.py:random,ipc10."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for results, checkpoints and logs.")
_MODE = flags.DEFINE_string("mode", None, "Overrides config.mode.")


def _coreset(config: Any, workdir: str) -> Any:
    from mim4dd_jax import coreset

    return coreset.run(config, workdir)


def _distill(config: Any, workdir: str) -> Any:
    from mim4dd_jax import distill

    return distill.run(config, workdir)


def _experts(config: Any, workdir: str) -> Any:
    from mim4dd_jax import experts_run

    return experts_run.run(config, workdir)


def _evaluate(config: Any, workdir: str) -> Any:
    from mim4dd_jax import evaluate_run

    # The set's stored lr (MTT's learned lr) is used unless --config.eval.lr is given.
    lr = config.eval.lr if "eval.lr" in overridden_fields() else None
    return evaluate_run.run(config, workdir, lr=lr)


MODES: dict[str, Callable[[Any, str], Any]] = {
    "coreset": _coreset,
    "distill": _distill,
    "experts": _experts,
    "evaluate": _evaluate,
}


def overridden_fields() -> set[str]:
    """The dotted config fields given on the command line (``--config.eval.lr=...``)."""
    if not flags.FLAGS.is_parsed():
        return set()
    return set(config_flags.get_override_values(flags.FLAGS["config"]))


@contextlib.contextmanager
def matmul_precision(config: Any) -> Iterator[None]:
    """Runs the block under ``jax.default_matmul_precision(config.precision)`` (see
    ``config.PRECISIONS``): full float32 matmuls and convolutions unless the config says else."""
    import jax

    with jax.default_matmul_precision(config.precision):
        yield


def fail(message: str) -> None:
    """Prints one error line and exits with status 2 (a user mistake, not a crash)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _one_line(error: BaseException) -> str:
    """The most specific message in an exception chain, on one line."""
    chain, e = [], error
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, ConfigError):
            # config_flags re-raises get_config() errors with the traceback folded into the
            # message, whose last line is "module.ConfigError: <our message>".
            return str(e).strip().splitlines()[-1].split("ConfigError: ", 1)[-1]
    for e in chain:
        if isinstance(e, (KeyError, AttributeError)):
            field = str(e).strip("\"' ")
            return f"unknown config field {field!r}; check the spelling of the --config.* override"
        if isinstance(e, OSError) and e.filename:
            return f"cannot read {e.filename!r}: {e.strerror}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[-1]}"
    return " ".join(lines) or type(error).__name__


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl flag parsing; config-file and override errors become one line and exit code 2."""
    for arg in argv[1:]:
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1].split(":", 1)[0]
            if not os.path.isfile(path):
                fail(
                    f"cannot load config file {path!r}: no such file; configs live in configs/*.py"
                )
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - any parse failure is a user mistake in the flags
        fail(_one_line(e))
    return []


def main(argv: Sequence[str]) -> None:
    if not flags.FLAGS["verbosity"].present:
        # Libraries (tfds, orbax) log chatty INFO lines through absl; --verbosity=0 shows them.
        logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        fail(f"unexpected arguments {list(argv[1:])}; use --config=... --workdir=...")
    if _CONFIG.value is None:
        fail("--config is required, e.g. --config=configs/fashion_mnist.py:random,ipc10")
    config = _CONFIG.value
    try:
        from mim4dd_jax import artifacts, sharding
        from mim4dd_jax import config as config_lib

        mode = _MODE.value or config.mode
        check_choice("mode", mode, MODES)
        # Everything checkable is checked before the workdir is touched; modes create it only
        # once their data-dependent checks have passed.
        workdir = artifacts.check_workdir(_WORKDIR.value)
        # A multi-process launch must join jax.distributed before anything touches a device
        # (validate counts the devices for config.mesh).
        sharding.initialize_distributed(sharding.options(config)["distributed"])
        config_lib.validate(config)
        with matmul_precision(config):
            MODES[mode](config, workdir)
        print(f"results in {workdir}: " + ", ".join(sorted(os.listdir(workdir))))
    except ConfigError as e:
        fail(str(e))


def run() -> None:
    """Console entry point ``mim4dd`` (same as ``python run.py``)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    app.run(main, flags_parser=parse_flags)
