"""``OverfittingGuard``: stop when the validation loss rises while the training loss falls, and
put the adapters of the best evaluation back.

Overfitting shows as diverging curves: the training loss keeps falling while the validation loss
no longer improves. ``patience`` works as in Lightning's ``EarlyStopping``: at each evaluation ``i``
(each validation end during fit)::

    improved_i = val_i < best_{i-1} - min_delta        best = the lowest val so far
    count_i    = 0 if improved_i else count_{i-1} + 1
    fell_i     = train_i < train_at_best               (always true with train_monitor=None)
    stop when count_i >= patience and fell_i

so the guard fires ``patience`` evaluations after the best one at the earliest, however the
validation loss wanders meanwhile (a rise, a small fall, a rise: all count).

``val_i`` is ``trainer.callback_metrics[monitor]`` at that validation end; ``train_i`` is the mean
of the values of ``trainer.callback_metrics[train_monitor]`` seen after each training batch since
the previous evaluation (the training loss over that stretch: the last step's value alone is one
batch, too noisy to compare, and an epoch-level value is only updated after the epoch's
validation). A validation loss that stops improving while the training loss has not fallen below
its value at the best evaluation is divergence or a plateau, not overfitting: the guard waits.

Whenever ``val_i`` is the lowest so far, the tensors that train with each adapter are copied to the
CPU (an adapter is a small fraction of the model): :func:`lightning_peft.inject.adapter_parameters`,
keyed by state-dict name. Those are not always the tensors of the adapter file: a prefix trained
through its MLP (``PrefixTuningConfig(projection=True)``) is saved as ``P = MLP(E)``, a value
computed on each call, so writing into it would change nothing; ``E`` and the MLP are what is
copied and restored. When training ends after the guard asked to stop, the copies are written back
into the live tensors in place, so the LightningModule leaves ``fit`` holding the adapters of the
best evaluation. A fit that ends for another reason is left as it is.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ..checkpoint import adapter_tensors, check_tensors_fit
from ..inject import adapter_configs, adapter_parameters

# What the best copy is keyed by: state-dict names of the training tensors. Checkpoints of earlier
# versions hold adapter-file keys ("file"); those still restore (the same tensors, except a prefix MLP).
COPY_KEYS = "parameters"


class OverfittingGuard(Callback):
    """Stop the fit when ``monitor`` has not improved on its best for ``patience`` evaluations while
    ``train_monitor`` fell below its value at the best one, and restore the adapters of the
    evaluation with the lowest ``monitor``.

    Args:
        monitor: the validation loss, a key of ``trainer.callback_metrics`` at validation end.
        train_monitor: the training loss, logged in ``training_step`` with ``on_step=True`` (the
            default there); ``None`` to stop on the validation loss alone.
        patience: how many evaluations without an improvement of the best ``monitor`` (as
            ``EarlyStopping(patience=...)``; default 3, as there).
        min_delta: an improvement of ``min_delta`` or less does not reset the count. The best
            evaluation (whose adapters are restored) is the plain minimum of ``monitor``.

    Attributes:
        best_score / best_epoch: the lowest ``monitor`` seen and its ``trainer.current_epoch``.
        stopped_epoch: the ``trainer.current_epoch`` at which the guard asked to stop (None if not).
        restored: whether the best adapters were written back.

    All state (best score, count, recent values, the best adapter tensors) goes into the checkpoint,
    so a resumed fit goes on where it was. Metrics are averaged over processes before the decision,
    so that every rank keeps the same best copy and stops at the same evaluation.
    """

    def __init__(self, monitor: str = "val_loss", train_monitor: str | None = "train_loss", patience: int = 3,
                 min_delta: float = 0.0) -> None:
        super().__init__()
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"OverfittingGuard(monitor={monitor!r}): pass the name your validation_step logs its "
                             f"loss under, e.g. monitor='val_loss'.")
        if train_monitor is not None and (not isinstance(train_monitor, str) or not train_monitor):
            raise ValueError(f"OverfittingGuard(train_monitor={train_monitor!r}): pass the name your training_step "
                             f"logs its loss under, e.g. train_monitor='train_loss', or None to watch {monitor!r} "
                             f"alone.")
        if train_monitor == monitor:
            raise ValueError(f"OverfittingGuard(monitor={monitor!r}, train_monitor={train_monitor!r}): the two must "
                             f"differ: monitor is the validation loss, train_monitor the training loss (or None).")
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ValueError(f"OverfittingGuard(patience={patience!r}): pass a whole number of evaluations >= 1, "
                             f"e.g. patience=3.")
        if not isinstance(min_delta, (int, float)) or isinstance(min_delta, bool) or not 0 <= min_delta < math.inf:
            raise ValueError(f"OverfittingGuard(min_delta={min_delta!r}): pass a finite number >= 0, the rise of "
                             f"{monitor!r} that counts, e.g. min_delta=0.0 or 0.01.")
        self.monitor = monitor
        self.train_monitor = train_monitor
        self.patience = patience
        self.min_delta = float(min_delta)
        self.best_score = math.inf
        self.best_epoch: int | None = None
        self.best_train: float | None = None  # train_monitor over the stretch that ended at the best evaluation
        self.wait_count = 0
        self.history: list[dict[str, Any]] = []  # the last patience + 1 evaluations: epoch, monitor, train_monitor
        self.stopped_epoch: int | None = None
        self.restored = False
        self._best_adapters: dict[str, dict[str, torch.Tensor]] = {}  # adapter name -> {key: CPU copy}
        self._copy_keys = COPY_KEYS
        self._train_sum: torch.Tensor | float = 0.0  # train_monitor values since the last evaluation
        self._train_count = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, train_monitor=self.train_monitor)

    def on_fit_start(self, trainer, pl_module) -> None:
        if not adapter_configs(pl_module):  # strategies inject in their setup, which has run by now
            raise RuntimeError("OverfittingGuard found no adapters to restore in the LightningModule; use a "
                               "lightning-peft strategy (e.g. strategy='lora') or call lightning_peft.inject_adapters "
                               "on its model, or use Lightning's EarlyStopping for a model without adapters.")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.train_monitor is None or self.train_monitor not in trainer.callback_metrics:
            return
        self._add_train_value(trainer.callback_metrics[self.train_monitor])

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or trainer.fast_dev_run:
            return
        self._run_overfitting_check(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.stopped_epoch is None or self.restored:
            return
        self._restore_best(pl_module)

    def _add_train_value(self, value: torch.Tensor) -> None:
        self._train_sum = self._train_sum + value.detach().float()  # on its device: no sync per step
        self._train_count += 1

    def _run_overfitting_check(self, trainer, pl_module) -> None:
        val, train = self._current_values(trainer)
        improved = val < self.best_score - self.min_delta
        self.wait_count = 0 if improved else self.wait_count + 1
        if val < self.best_score:
            self.best_score, self.best_epoch, self.best_train = val, trainer.current_epoch, train
            self._best_adapters, self._copy_keys = _copy_adapters(pl_module), COPY_KEYS
        fell = train is None or self.best_train is None or train < self.best_train
        entry = {"epoch": trainer.current_epoch, "monitor": val, "train_monitor": train}
        self.history = (self.history + [entry])[-(self.patience + 1):]

        # stop every process if any process decides to stop (as EarlyStopping does)
        should_stop = trainer.strategy.reduce_boolean_decision(self.wait_count >= self.patience and fell, all=False)
        trainer.should_stop = trainer.should_stop or should_stop
        if should_stop and self.stopped_epoch is None:
            self.stopped_epoch = trainer.current_epoch

    def _current_values(self, trainer) -> tuple[float, float | None]:
        """This evaluation's ``monitor`` and mean ``train_monitor`` since the last one, averaged over
        processes; resets the running training sum."""
        logs = trainer.callback_metrics
        if self.monitor not in logs:
            raise RuntimeError(f"OverfittingGuard monitors {self.monitor!r}, which is not in the metrics at "
                               f"validation end. Available: {_keys(logs)}. Log it in validation_step "
                               f"(self.log({self.monitor!r}, loss)) or pass monitor=<one of these>.")
        values = [logs[self.monitor].detach().float().reshape(())]
        if self.train_monitor is not None:
            if self._train_count == 0:
                raise RuntimeError(f"OverfittingGuard compares {self.train_monitor!r} between evaluations, but no "
                                   f"training batch since the last evaluation had it in the metrics. Available at "
                                   f"validation end: {_keys(logs)}. Log it in training_step with on_step=True (the "
                                   f"default there; an epoch-only value is updated after the validation), pass "
                                   f"train_monitor=<one of these>, or train_monitor=None to watch {self.monitor!r} "
                                   f"alone.")
            mean = torch.as_tensor(self._train_sum / self._train_count, dtype=torch.float32)  # float after a resume
            values.append(mean.reshape(()).to(values[0].device))
            self._train_sum, self._train_count = 0.0, 0
        reduced = trainer.strategy.reduce(torch.stack(values).to(trainer.strategy.root_device), reduce_op="mean")
        val, *train = reduced.tolist()
        return val, (train[0] if train else None)

    def _restore_best(self, pl_module) -> None:
        tensors = adapter_parameters if self._copy_keys == COPY_KEYS else adapter_tensors
        live = {name: tensors(pl_module, name) for name in adapter_configs(pl_module)}
        if live.keys() != self._best_adapters.keys():
            raise RuntimeError(f"OverfittingGuard kept adapters {sorted(self._best_adapters)} but the model has "
                               f"{sorted(live)}; restore the adapter set the run was trained with.")
        for name, saved in self._best_adapters.items():
            check_tensors_fit(live[name], saved, f"OverfittingGuard's best copy of adapter {name!r}", what="copy",
                              fix="Resume with the adapter config of the run that wrote the checkpoint.")
        with torch.no_grad():
            for name, saved in self._best_adapters.items():
                for key, tensor in saved.items():
                    live[name][key].copy_(tensor)
        self.restored = True
        rank_zero_warn(self._stop_message())

    def _stop_message(self) -> str:
        def trail(key: str) -> str:
            return " -> ".join(f"{entry[key]:.4f}" for entry in self.history[-(self.wait_count + 1):])

        what = (f"{self.monitor} has not improved on its best for {self.wait_count} evaluations (patience "
                f"{self.patience}; {self.monitor} {trail('monitor')})")
        if self.train_monitor is not None:
            what += f" while {self.train_monitor} fell ({trail('train_monitor')})"
        return (f"OverfittingGuard: {what}: stopping at epoch {self.stopped_epoch}, adapters restored to epoch "
                f"{self.best_epoch} ({self.monitor} {self.best_score:.4f}). Epochs are trainer.current_epoch, as in "
                f"checkpoint names.")

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "best_train": self.best_train,
                "wait_count": self.wait_count,
                "history": [dict(entry) for entry in self.history], "stopped_epoch": self.stopped_epoch,
                "best_adapters": self._best_adapters, "keys": self._copy_keys, "train_sum": float(self._train_sum),
                "train_count": self._train_count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score = state_dict["best_score"]
        self.best_epoch = state_dict["best_epoch"]
        self.best_train = state_dict.get("best_train")  # absent in checkpoints of earlier versions
        self.wait_count = state_dict["wait_count"]
        self.history = [dict(entry) for entry in state_dict["history"]]
        self.stopped_epoch = state_dict["stopped_epoch"]
        self._best_adapters = {name: {key: tensor.cpu() for key, tensor in tensors.items()}
                               for name, tensors in state_dict["best_adapters"].items()}
        self._copy_keys = state_dict.get("keys", "file")
        self._train_sum = state_dict["train_sum"]
        self._train_count = state_dict["train_count"]


def _copy_adapters(pl_module) -> dict[str, dict[str, torch.Tensor]]:
    """A CPU copy of the tensors that train with each adapter: ``{adapter name: {state-dict name:
    tensor}}`` (LoRA factors, DoRA magnitudes, ``modules_to_save`` copies, freed biases, (IA)^3
    vectors, BitFit shifts, bottleneck layers, prompt embeddings, a prefix's embedding and MLP)."""
    return {name: {key: t.detach().to("cpu", copy=True) for key, t in adapter_parameters(pl_module, name).items()}
            for name in adapter_configs(pl_module)}


def _keys(logs) -> str:
    return ", ".join(repr(key) for key in logs) or "none (nothing was logged)"
