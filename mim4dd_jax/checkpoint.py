"""orbax checkpoints of the distillation state, with fallback to an older one when the latest is bad.

Checkpoints live in ``<workdir>/checkpoints/<step>`` (orbax writes each into a temporary folder and
renames it when complete, so a crash mid-save never leaves a half-written "latest"). Saving is
synchronous: the next jitted step donates the state buffers, so they must be on disk first.
"""

from __future__ import annotations

import logging
import os
from typing import Any

PyTree = Any


class Checkpointer:
    """Saves and restores a state pytree under ``directory``, keeping the last ``keep`` steps."""

    def __init__(self, directory: str, keep: int = 3):
        import orbax.checkpoint as ocp  # late: importing orbax costs about a second

        self._ocp = ocp
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """The steps on disk, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: PyTree) -> None:
        """Writes ``state`` as checkpoint ``step`` (overwriting nothing: a step is saved once)."""
        if step in self._manager.all_steps():
            return
        self._manager.save(step, args=self._ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()

    def restore(self, template: PyTree) -> tuple[int, PyTree] | None:
        """(step, state) of the newest readable checkpoint, shaped like ``template``; None if
        there is none. An unreadable checkpoint is skipped with a warning."""
        for step in reversed(self.steps()):
            try:
                state = self._manager.restore(step, args=self._ocp.args.StandardRestore(template))
            except Exception as e:  # noqa: BLE001 - any failure means "this one is unusable"
                logging.warning(
                    "checkpoint %d in %s is unreadable (%s: %s); falling back to an older one",
                    step,
                    self.directory,
                    type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "",
                )
                continue
            return step, state
        return None

    def close(self) -> None:
        self._manager.close()
