"""``EpochGuard``: stop a LoRA fine-tune after a few epochs, and say why.

The practical recipe for LoRA / QLoRA fine-tunes is 1-3 epochs over the data. Past that, the
classic failure is overfitting: the training loss keeps going down while the quality of the
model (validation loss, downstream evals) goes down too. The guard speaks only past its bound: at
the end of epoch ``max_epochs`` (default 3, the recipe's upper bound), if the Trainer would go on,
it sets ``trainer.should_stop`` (epoch ``max_epochs + 1`` never starts) and says why. A run that
ends within the bound by itself (``Trainer(max_epochs=3)``) hears nothing. ``warn_at`` adds an
early warning when that epoch starts (off by default). Epochs are counted as ``Trainer(max_epochs=...)`` counts
them: epoch ``n`` is ``trainer.current_epoch == n - 1``.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

RECIPE = ("the practical recipe for LoRA fine-tunes is 1-3 epochs; from epoch 3 on they commonly overfit (the "
          "training loss keeps falling while quality drops), one of the four classic fine-tuning failures")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class EpochGuard(Callback):
    """Warn when epoch ``warn_at`` starts, stop the fit after epoch ``max_epochs``.

    Args:
        max_epochs: the number of epochs after which the fit stops (if the Trainer would go on).
            Raise it explicitly to train longer: ``EpochGuard(max_epochs=5)``.
        warn_at: an epoch at whose start the guard warns, once per run (a resumed run that
            already warned does not warn again); ``None`` (default): no early warning, only the
            stop past ``max_epochs``.

    Epoch counts are the same on every rank, so the decision needs no reduction across processes.
    """

    def __init__(self, max_epochs: int = 3, warn_at: int | None = None) -> None:
        super().__init__()
        if not _positive_int(max_epochs):
            raise ValueError(f"EpochGuard(max_epochs={max_epochs!r}): pass a whole number of epochs >= 1, e.g. "
                             f"EpochGuard(max_epochs=3) ({RECIPE}).")
        if warn_at is not None and not _positive_int(warn_at):
            raise ValueError(f"EpochGuard(warn_at={warn_at!r}): pass the epoch (>= 1) whose start should warn, "
                             f"e.g. warn_at=2, or warn_at=None for no warning.")
        if warn_at is not None and warn_at > max_epochs:
            raise ValueError(f"EpochGuard(max_epochs={max_epochs}, warn_at={warn_at}): the warning would come after "
                             f"the stop and never show; pass warn_at <= {max_epochs} (e.g. "
                             f"warn_at={max_epochs}) or warn_at=None.")
        self.max_epochs = max_epochs
        self.warn_at = warn_at
        self.warned = False

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.warned or self.warn_at is None or trainer.current_epoch + 1 < self.warn_at:
            return
        self._warn(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 < self.max_epochs or _ends_here_anyway(trainer):
            return
        self._stop(trainer)

    def _warn(self, trainer) -> None:
        epoch = trainer.current_epoch + 1
        rank_zero_warn(f"EpochGuard: starting epoch {epoch} (trainer.current_epoch={epoch - 1}); {RECIPE}. This run "
                       f"stops after epoch {self.max_epochs}; watch the validation loss (OverfittingGuard stops on "
                       f"it and restores the best adapters).")
        self.warned = True

    def _stop(self, trainer) -> None:
        trainer.should_stop = True
        rank_zero_warn(f"EpochGuard: stopping after epoch {trainer.current_epoch + 1} (Trainer "
                       f"{_planned(trainer)}): {RECIPE}. To train longer, raise the limit explicitly: "
                       f"EpochGuard(max_epochs={self.max_epochs + 2}).")

    def state_dict(self) -> dict[str, Any]:
        return {"warned": self.warned}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.warned = state_dict["warned"]


def _ends_here_anyway(trainer) -> bool:
    """Whether the Trainer's own ``max_epochs`` ends the fit after this epoch (then there is
    nothing to stop and nothing to say)."""
    return trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs


def _planned(trainer) -> str:
    if trainer.max_epochs in (None, -1):
        return "with no epoch limit"
    return f"max_epochs={trainer.max_epochs}"
