"""The distillation methods: one :class:`Method` record each, in one registry.

Every ``steps_<method>`` module registers its record when it is imported (``steps`` imports the
built-in ones); user code registers its own the same way, e.g. from a config file, before the
config is built. Everything that differs between methods is a field of the record, so nothing
outside a method's module lists methods by hand: ``config`` derives its method names and
defaults from here, ``state`` the learned parts and the initial lr, ``steps`` the builder and
the conv choice, ``distill`` whether to read expert trajectories.

This module sits on the bottom floor (it imports only ``errors``): ``state`` and ``config``
read the registry without importing the step code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from mim4dd_jax.errors import check_choice

# Options a method may implement; config.validate refuses them for the methods that do not.
THROUGH_UNROLL = "mi.through_unroll"  # the MI gradient through the method's own unroll
LEARN_LABELS = "mtt.learn_labels"  # learned soft labels
EXPERT_FEATURES = "mi.feature_nets=experts"  # MI features from a drawn expert checkpoint


def _no_parts(config: Any) -> tuple[str, ...]:
    return ()


def _one_epoch(config: Any) -> int:
    return 1


def _eval_lr(config: Any) -> float:
    return config.eval.lr


def _no_check(config: Any) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Method:
    """One distillation method.

    build: ``steps_core.Builder``, ``StepContext -> BaseStep`` (see ``steps``).
    defaults: dotted config overrides over ``config.build``'s defaults (the published,
      dataset-independent choices); config files override them per (method, ipc).
    learned: the state entries the method learns beyond "images" and "heads" ("syn_lr",
      "labels"), each with its own optimiser (``state.optimizers``).
    lr: the initial student lr, ``state["syn_lr"]``; when "syn_lr" is learned, the evaluation
      trains with the learned value, else with ``eval.lr``.
    needs_experts: the method itself matches expert trajectories (``mtt.experts_dir``).
    expert_epochs: the epochs an expert must have for this method (as an MI feature network,
      any method needs only one).
    conv: the convolution the step prefers on CPU under ``conv_impl="auto"``
      (``models.prefer_conv``), or None for the config's.
    supports: the optional options above (THROUGH_UNROLL, ...) that the method implements.
    check: the method's own config checks; raises ConfigError.
    """

    name: str
    build: Callable[[Any], Callable[..., Any]]
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    learned: Callable[[Any], tuple[str, ...]] = _no_parts
    lr: Callable[[Any], float] = _eval_lr
    needs_experts: bool = False
    expert_epochs: Callable[[Any], int] = _one_epoch
    conv: str | None = None
    supports: frozenset[str] = frozenset()
    check: Callable[[Any], None] = _no_check


# name -> record, filled by register() at import time (the one accepted piece of module state).
_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Makes ``method`` the step of ``config.method == method.name``; a later record of the same
    name replaces it (a config file loaded twice registers twice). Returns the record."""
    _REGISTRY[method.name] = method
    return method


def names() -> tuple[str, ...]:
    """The registered methods, in registration order."""
    return tuple(_REGISTRY)


def get(name: str) -> Method:
    """The record registered as ``name``; ConfigError listing the valid names otherwise."""
    check_choice("distillation method", name, names())
    return _REGISTRY[name]


def supporting(option: str) -> tuple[str, ...]:
    """The registered methods that implement ``option`` (for error messages)."""
    return tuple(name for name, m in _REGISTRY.items() if option in m.supports)
