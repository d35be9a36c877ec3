"""Test defaults: CPU only, deterministic, quiet; one compilation cache per session; fixtures
shared by several test files."""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# JAX's persistent compilation cache in a fresh folder per session (set before jax is imported;
# the run.py children inherit it through helpers.cli_env): a program compiled by one test (or
# one run.py child) is read back, not compiled again, by the next that builds the same program,
# e.g. the straight and the resumed run of a resume test, or the seeds of a study. The
# executable is the same, so every number is too; jit's in-memory cache (the "compiles" metric,
# ``_cache_size``) is not affected. Only programs that took >= 0.5 s to compile are stored
# (steps, training loops), not the many tiny ones every process shares. jax writes an entry
# without a lock, so children that run at the same time and might compile the same program
# leave the cache out (tests/test_sharding.py). Nothing outlives the session.
# Under pytest-xdist (``make test`` runs two workers) each worker process gets its own folder:
# the controller's, which the workers inherit, is replaced, since two workers could write the
# same entry at once.
_OURS = "MIM4DD_TEST_JAX_CACHE"
if "JAX_COMPILATION_CACHE_DIR" not in os.environ or _OURS in os.environ:
    _cache = tempfile.mkdtemp(prefix="mim4dd_test_jax_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ[_OURS] = "1"
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


@pytest.fixture(scope="session")
def fake_npz(tmp_path_factory):
    """``helpers.fake_dataset(3, 12, 8)`` as an npz in [0, 255] pixels (``data.source=npz``),
    written once per session: tests only read it (and tests/test_split_bytes.py pins hashes of
    runs on it)."""
    from helpers import write_fake_npz

    return write_fake_npz(tmp_path_factory.mktemp("data") / "fake.npz")
