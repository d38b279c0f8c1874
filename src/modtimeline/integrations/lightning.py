"""``TimelineCallback`` for ``lightning.Trainer`` (``lightning.pytorch``).

::

    from modtimeline.integrations.lightning import TimelineCallback

    trainer = lightning.Trainer(callbacks=[TimelineCallback("traces/run.json")])
    trainer.fit(model, data)   # writes traces/run.json (rank N of several: traces/run.rankN.json)
"""

from __future__ import annotations

import os
from typing import Any

from . import CallbackTimeline, require
from ..schedule import Schedule

_lightning = require("lightning.pytorch", "lightning", "modtimeline.integrations.lightning")

__all__ = ["TimelineCallback"]


class TimelineCallback(_lightning.Callback):  # type: ignore[name-defined]
    """Record every optimizer step of ``Trainer.fit()`` into a trace at ``path``.

    One step span per optimizer step: it begins at the first training batch after the
    last optimizer step and ends at the end of the batch whose optimizer stepped, so
    with ``accumulate_grad_batches=N`` the N micro-batches are inside one step.
    **Validation is left out**: modules are recorded inside steps only (the sanity check
    and validation loops run between steps). ``schedule`` (a ``Schedule``) counts
    optimizer steps; other keyword arguments go to ``Timeline``.

    Names: modules are named from the LightningModule, as its ``state_dict`` names them
    (``LitModel.model.layers.0.mlp``), not from the model its ``training_step`` calls:
    what a LightningModule holds outside that model (a loss module, a second network)
    is then named too, under one root, and the names match the checkpoint's keys. (A
    module the process had named before, under another root, keeps that name.)

    The Timeline starts at ``on_train_start`` (after the strategy has set up the process
    group: every rank writes its own file) and is written at ``on_train_end``; when fit
    raises, ``on_exception`` writes it with ``metadata.exception`` and removes every
    hook, and Lightning re-raises the exception unchanged.
    """

    def __init__(self, path: str | os.PathLike[str], schedule: Schedule | None = None, **timeline_kwargs: Any) -> None:
        super().__init__()
        self._run = CallbackTimeline(path, schedule, timeline_kwargs)
        self._stepped = False

    @property
    def timeline(self) -> Any:
        """The Timeline of the current (or last) ``fit()``; None before the first."""
        return self._run.timeline

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        from ..capture.registry import fqn_of

        fqn_of(pl_module)  # name the tree from the LightningModule (see the docstring)
        self._run.start()
        self._stepped = False

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._run.begin_step()  # (a no-op inside a step: a micro-batch of the open one)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._stepped = True

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._stepped:
            self._stepped = False
            self._run.end_step()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._run.stop()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._run.stop(exception)
