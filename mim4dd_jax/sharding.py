"""One device mesh for every mode, and the few sharding helpers the step and the loops use.

The plan (see ``distill.make_step``): batch-like work (DM/DC's real and synthetic batches by
class, MTT's (expert, start) pairs, the evaluation models) is split over *all* mesh axes
together; everything else (the synthetic state by default, the real train split, the expert
trajectories) is replicated. XLA's SPMD partitioner inserts the collectives (e.g. the
all-reduce of MTT's image gradient) inside jit, so there is no hand-written psum. With one
device every helper here is the identity, so a single-device run compiles the very program it
compiled before meshes existed.

``config.mesh``:

- ``shape``: () = all devices on one axis; else a tuple whose product is the device count.
- ``axes``: axis names, one per ``shape`` entry (() shape: exactly one name).
- ``distributed``: "auto" (call ``jax.distributed.initialize`` when the environment says this
  is one process of a multi-process launch, :func:`multiprocess_env`), "on" or "off".
- ``shard_synthetic``: shard the synthetic images (and their optimiser state) by class
  instead of replicating them (for sets too large to hold on every device).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mim4dd_jax.errors import ConfigError, check_choice

PyTree = Any
DISTRIBUTED = ("auto", "on", "off")
DEFAULTS = {"shape": (), "axes": ("data",), "distributed": "auto", "shard_synthetic": False}


def multiprocess_env(environ: Mapping[str, str] | None = None) -> bool:
    """True when the environment describes one process of a multi-process launch.

    JAX_COORDINATOR_ADDRESS set (a manual launch), an ``srun`` step with more than one task
    (SLURM_NTASKS > 1 with SLURM_PROCID and SLURM_STEP_NODELIST, the variables jax's own SLURM
    detection needs; a bare ``salloc`` shell has no step, so a plain ``python run.py`` there is
    one process), ``mpirun`` with OMPI_COMM_WORLD_SIZE > 1, or a multi-worker Cloud TPU slice
    (TPU_WORKER_HOSTNAMES lists several hosts).
    """
    env = os.environ if environ is None else environ
    count = lambda name: int(env.get(name, "1") or "1")
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if count("SLURM_NTASKS") > 1 and "SLURM_PROCID" in env and "SLURM_STEP_NODELIST" in env:
        return True
    if count("OMPI_COMM_WORLD_SIZE") > 1:
        return True
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize_distributed(setting: str = "auto", environ: Mapping[str, str] | None = None) -> bool:
    """Calls ``jax.distributed.initialize()`` once, before any computation, when ``setting`` is
    "on", or "auto" and :func:`multiprocess_env`; returns whether this is a multi-process run.

    JAX_NUM_PROCESSES and JAX_PROCESS_ID complete a manual JAX_COORDINATOR_ADDRESS launch
    (jax reads only the address itself); SLURM, Open MPI and Cloud TPU are detected by jax.
    """
    check_choice("mesh.distributed", setting, DISTRIBUTED)
    env = os.environ if environ is None else environ
    wanted = setting == "on" or (setting == "auto" and multiprocess_env(env))
    if not wanted:
        return jax.distributed.is_initialized()
    if not jax.distributed.is_initialized():
        kwargs = {}
        for name, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
            if env.get(name):
                kwargs[arg] = int(env[name])
        jax.distributed.initialize(**kwargs)
        logging.warning(
            "jax.distributed: process %d of %d, %d local / %d global devices",
            jax.process_index(),
            jax.process_count(),
            jax.local_device_count(),
            jax.device_count(),
        )
    return True


def is_main_process() -> bool:
    """True on the process that writes artifacts (process 0; the only one without multi-host)."""
    return jax.process_index() == 0


def options(config: Any) -> dict[str, Any]:
    """``config.mesh`` as a dict, with :data:`DEFAULTS` (also ``config.build``'s mesh block) for a
    config built without the block."""
    block = config.get("mesh") if hasattr(config, "get") else None
    return {**DEFAULTS, **(dict(block) if block else {})}


def check_mesh(shape: Sequence[int], axes: Sequence[str], device_count: int) -> tuple[int, ...]:
    """The mesh shape for ``device_count`` devices (() = all on one axis); ConfigError (one
    line: the shape, the device count, the valid choice) when it cannot be built."""
    axes = tuple(axes)
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise ConfigError(f"mesh.shape={tuple(shape)!r} is invalid; valid: () or positive ints")
    shape = tuple(shape)
    if not axes or not all(isinstance(a, str) and a for a in axes) or len(set(axes)) < len(axes):
        raise ConfigError(f"mesh.axes={axes!r} is invalid; valid: distinct names, e.g. ('data',)")
    if not shape:
        if len(axes) != 1:
            raise ConfigError(
                f"mesh.shape=() puts all devices on one axis but mesh.axes={axes!r} names "
                f"{len(axes)}; valid: one name, or a shape with {len(axes)} entries"
            )
        return (device_count,)
    if len(shape) != len(axes) or min(shape) < 1 or math.prod(shape) != device_count:
        raise ConfigError(
            f"mesh.shape={shape} with mesh.axes={axes} does not fit the {device_count} "
            f"device(s) of this run; valid: mesh.shape=() (all {device_count} on one axis) or "
            f"{len(axes)} positive size(s) whose product is {device_count}"
        )
    return shape


def make_mesh(
    shape: Sequence[int] = (),
    axes: Sequence[str] = ("data",),
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh over ``devices`` (default: all, across processes) checked by :func:`check_mesh`.

    Axes are "Auto" (sharding propagated by XLA), so ``with_sharding_constraint`` can name them.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = check_mesh(shape, axes, len(devices))
    return jax.make_mesh(
        shape, tuple(axes), axis_types=(AxisType.Auto,) * len(shape), devices=devices
    )


def mesh_from_config(config: Any) -> Mesh:
    """The run's mesh from ``config.mesh`` (all devices on one "data" axis by default)."""
    opts = options(config)
    return make_mesh(opts["shape"], opts["axes"])


def size(mesh: Mesh) -> int:
    """Number of devices the batch-like work is split over (all mesh axes together)."""
    return int(mesh.devices.size)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def split_along(mesh: Mesh, ndim: int, axis: int = 0) -> NamedSharding:
    """Dimension ``axis`` of a rank-``ndim`` array split over all mesh axes, the rest whole."""
    if not 0 <= axis < ndim:
        raise ValueError(f"axis {axis} of a rank-{ndim} array")
    # No trailing Nones: jit returns specs in this short form, and its cache compares specs as
    # written, so P("data", None) in and P("data") out would compile the step twice.
    return NamedSharding(mesh, PartitionSpec(*([None] * axis), tuple(mesh.axis_names)))


def constrain(x: PyTree, mesh: Mesh, axis: int | None) -> PyTree:
    """Inside jit: every leaf split along ``axis`` (None: replicated). Identity on one device.

    A size that the device count does not divide is padded by XLA's partitioner (devices past
    the end idle), so an odd batch costs balance, never correctness.
    """
    if size(mesh) == 1:
        return x

    def one(leaf: jax.Array) -> jax.Array:
        if axis is None or leaf.ndim == 0:
            return jax.lax.with_sharding_constraint(leaf, replicated(mesh))
        return jax.lax.with_sharding_constraint(leaf, split_along(mesh, leaf.ndim, axis))

    return jax.tree.map(one, x)


def constrain_like(tree: PyTree, shardings: PyTree) -> PyTree:
    """Inside jit: each leaf of ``tree`` given the matching sharding of ``shardings`` (a tree of
    the same structure). A one-device mesh is left alone."""

    def one(leaf: jax.Array, s: NamedSharding) -> jax.Array:
        return leaf if s.mesh.devices.size == 1 else jax.lax.with_sharding_constraint(leaf, s)

    return jax.tree.map(one, tree, shardings)


def put(tree: PyTree, shardings: PyTree) -> PyTree:
    """Places host data (numpy or jax arrays holding the same values on every process) on the
    mesh; ``shardings`` is one NamedSharding or a tree matching ``tree``. Works across hosts:
    each process fills only the shards of its own devices."""

    def one(leaf: Any, s: NamedSharding) -> jax.Array:
        if s.mesh.devices.size == 1:
            return jax.device_put(leaf)  # as before meshes: uncommitted, on the default device
        value = np.asarray(leaf)
        return jax.make_array_from_callback(value.shape, s, lambda index: value[index])

    if isinstance(shardings, NamedSharding):
        return jax.tree.map(lambda leaf: one(leaf, shardings), tree)
    return jax.tree.map(one, tree, shardings)


def to_host(x: jax.Array) -> np.ndarray:
    """A numpy copy of a (possibly multi-host, sharded) array, on every process."""
    if getattr(x, "is_fully_addressable", True) or getattr(x, "is_fully_replicated", False):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def pad_to_multiple(x: jax.Array, multiple: int) -> jax.Array:
    """``x`` [K, ...] with its last row repeated up to a multiple of ``multiple`` rows."""
    k = x.shape[0]
    if not k % multiple:
        return x
    # Indexing (not concatenate) so that typed PRNG key arrays pad too.
    return x[np.minimum(np.arange(k + (-k % multiple)), k - 1)]
