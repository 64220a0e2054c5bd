"""``Trainer(strategy="qlora")``: quantize and freeze the base, inject adapters, at setup.

One mixin, :class:`_PEFTSetup`, goes first in the MRO of Lightning's single-device, DDP and
FSDP strategies. Lightning's call order sets the constraints (docs/architecture.md, "Lightning's call order, and its
traps"):

- ``setup(trainer)`` is the one hook all three share: the LightningModule is modified there,
  *before* ``super().setup`` moves it to the device, wraps it (DDP/FSDP) and builds optimizers.
  ``setup`` runs again for validate/test/predict: adapters are injected once.
- A checkpoint is restored *after* setup (``restore_checkpoint_after_setup``): before it, the
  adapter tensors it holds would have nowhere to go.
- Checkpoints hold adapter tensors only (plus ``modules_to_save`` copies and trained biases), the
  adapter configs and the RNG states; loading is strict about adapter keys and shapes and
  ignores the frozen base, which comes from the model's own construction.
- DDP: ranks quantize identical float weights (broadcast from rank 0 first): DDP syncs the packed
  4-bit bytes but not their absmax constants, so differently initialised ranks would diverge.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Mapping

import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from .activation_checkpointing import enable_gradient_checkpointing
from .bigmodel import empty_init as _empty_init
from .bigmodel import load_quantized
from .checkpoint import (  # noqa: F401 (CHECKPOINT_KEY, rng_states, set_rng_states: also read from here)
    CHECKPOINT_KEY,
    adapter_state_keys,
    check_checkpoint_adapters,
    check_checkpoint_structure,
    check_resume_config,
    checkpoint_meta,
    is_save_directory,
    load_checkpoint_file,
    read_training_state,
    restore_rng_states,
    rng_states,
    set_rng_states,
)
from .config import CONFIG_TYPES, AdapterConfig, LoraConfig, QuantConfig, config_from_dict
from .inject import adapter_configs, adapter_modules, check_adapter_name, delete_adapter, inject_adapters, set_adapter
from .methods.base import DROPOUT_TYPES
from .quantize import logical_numel, quant_config, quantize_base

NONFINITE_MODES = ("raise", "skip")
# per-parameter optimizer state keys only bitsandbytes writes (its state_dict packs state1/state2/absmax
# into the quant-state entry)
_BNB_STATE_KEYS = {"state1", "state2", "__bnb_optimizer_quant_state__"}


def _as_quant_config(quantization: None | str | QuantConfig) -> QuantConfig | None:
    if quantization is None or isinstance(quantization, QuantConfig):
        return quantization
    if isinstance(quantization, str):
        return QuantConfig(quant_type=quantization)
    raise ValueError(f"quantization={quantization!r}: use None, 'nf4', 'fp4', 'int8' or a QuantConfig.")


def peft_target(module: nn.Module) -> nn.Module:
    """Where adapters go: the one direct child of a LightningModule that holds all its linear
    layers (``self.model``, typically a transformers model, whose paths the adapter files then use),
    or the module itself."""
    linear_paths = [path for path, m in module.named_modules() if isinstance(m, nn.Linear)]
    heads = {path.split(".", 1)[0] for path in linear_paths}
    if len(heads) == 1 and all("." in path for path in linear_paths):
        return module.get_submodule(heads.pop())
    return module


class _PEFTSetup:
    """The PEFT part of every lightning-peft strategy; put it first in the MRO."""

    def __init__(self, *args: Any, peft_config: AdapterConfig | None = None,
                 quantization: None | str | QuantConfig = None, adapter_name: str = "default",
                 checkpoint: str | os.PathLike | None = None, gradient_checkpointing: bool = False,
                 empty_init: bool = True, compile: bool | dict = False, nonfinite: str = "raise",
                 nonfinite_patience: int = 10, **kwargs: Any) -> None:
        if not isinstance(compile, (bool, dict)):
            raise TypeError(f"compile={compile!r}: use True (torch.compile's defaults), False, or a dict of "
                            f"torch.compile keyword arguments, e.g. {{'mode': 'max-autotune'}}.")
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite={nonfinite!r}: use 'raise' (stop at the first NaN/inf loss or adapter gradient, "
                             f"the default) or 'skip' (skip such steps, stop after nonfinite_patience in a row).")
        if isinstance(nonfinite_patience, bool) or not isinstance(nonfinite_patience, int) or nonfinite_patience < 1:
            raise ValueError(f"nonfinite_patience={nonfinite_patience!r}: give the number of non-finite steps in a row "
                             f"(>= 1) after which nonfinite='skip' stops training.")
        self.nonfinite = nonfinite
        self.nonfinite_patience = nonfinite_patience
        self.nonfinite_skipped = 0  # steps skipped so far (nonfinite="skip")
        self._nonfinite_run = 0  # ... of them in a row, up to the current step
        self._loss_not_finite: torch.Tensor | None = None  # on the device until the step: no sync per micro-batch
        if peft_config is not None and not isinstance(peft_config, AdapterConfig):
            names = ", ".join(cls.__name__ for cls in CONFIG_TYPES.values())
            raise TypeError(f"peft_config must be a lightning_peft adapter config ({names}), got "
                            f"{type(peft_config).__name__}.")
        self.peft_config = peft_config or LoraConfig()
        self.quant_config = _as_quant_config(quantization)
        self.adapter_name = check_adapter_name(adapter_name)
        self.base_checkpoint = checkpoint
        self.gradient_checkpointing = gradient_checkpointing
        self.empty_init = empty_init
        self.compile = compile
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------------------ set-up
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None):
        """Where ``configure_model`` (and ``trainer.init_module()``) builds: on the meta device
        (:func:`lightning_peft.empty_init`), unless the strategy or the caller says
        ``empty_init=False``. Weights come from ``checkpoint=`` at setup, or the module streams
        them in itself with :func:`lightning_peft.load_quantized`."""
        if not self.empty_init or empty_init is False:
            with super().tensor_init_context(empty_init):
                yield
            return
        with _empty_init(), self.precision_plugin.tensor_init_context():
            yield

    def setup(self, trainer) -> None:
        self._prepare_module(self.lightning_module)
        self._compile(self.lightning_module)
        super().setup(trainer)

    def _compile(self, module: nn.Module) -> None:
        """``compile=``: ``torch.compile`` the adapted model (the :func:`peft_target`) in place
        (``nn.Module.compile``: the module, its parameter names and checkpoints stay as they are).
        Once: setup runs again for validate/test/predict."""
        target = peft_target(module)
        if self.compile is False or getattr(target, "_compiled_call_impl", None) is not None:
            return
        target.compile(**({} if self.compile is True else self.compile))

    def _prepare_module(self, module: nn.Module) -> None:
        if adapter_configs(module):  # setup runs again for validate/test/predict after fit
            return
        target = peft_target(module)
        if self.base_checkpoint is not None and quant_config(module) is None:
            load_quantized(target, self.base_checkpoint, self.quant_config, device=self.root_device)
        _refuse_meta_tensors(module)
        if self.quant_config is not None and quant_config(module) is None:
            self._sync_float_weights(module)
            quantize_base(target, self.quant_config, device=self.root_device)
            for param in module.parameters():  # the LightningModule's own extras are base too
                param.requires_grad_(False)
        inject_adapters(target, self.peft_config, self.adapter_name)
        set_adapter(module, self.adapter_name)  # freezes what lies outside the target as well
        if self.gradient_checkpointing:
            enable_gradient_checkpointing(target)
        rank_zero_info(parameter_count_line(module, self.quant_config.quant_type if self.quant_config else None))

    def on_train_start(self) -> None:
        super().on_train_start()
        _warn_if_adapter_dropout_is_off(self.lightning_module)

    def teardown(self) -> None:
        module = self._lightning_module
        if module is None or not _meta_tensor_names(module):
            super().teardown()
            return
        # setup refused a model left on meta: Lightning's teardown would move it to the CPU, fail on
        # the meta tensors ("Cannot copy out of meta tensor") and hide the error that explains them
        self._lightning_module = None
        try:
            super().teardown()
        finally:
            self._lightning_module = module

    def _sync_float_weights(self, module: nn.Module) -> None:
        """Hook for multi-process strategies: make the float weights identical before quantizing."""

    def setup_optimizers(self, trainer) -> None:
        super().setup_optimizers(trainer)
        # A user's ``configure_optimizers`` usually passes ``self.parameters()``: keep only what
        # trains, so optimizer state (and its checkpoint) never covers the frozen base. Groups
        # stay in place (possibly empty) so that LR schedulers keep their per-group indices.
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if p.requires_grad]
            if not any(group["params"] for group in optimizer.param_groups):
                raise ValueError("configure_optimizers returned an optimizer with no trainable parameter after "
                                 "lightning-peft froze the base; pass self.parameters() (or the adapters) to it.")

    # ----------------------------------------------------------------- non-finite training
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        output = super().training_step(*args, **kwargs)
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if torch.is_tensor(loss) and loss.is_floating_point():
            bad = ~torch.isfinite(loss.detach()).all()  # a device tensor: read once per optimizer step
            self._loss_not_finite = bad if self._loss_not_finite is None else self._loss_not_finite | bad
        return output

    def optimizer_step(self, optimizer, closure, model=None, **kwargs: Any) -> Any:
        def checked_closure() -> Any:
            result = closure()  # forward and backward (gradients are all-reduced by now under DDP)
            self._check_finite(optimizer)
            return result

        return super().optimizer_step(optimizer, checked_closure, model, **kwargs)

    def _check_finite(self, optimizer) -> None:
        """Before the optimizer applies a step: is the loss (of every micro-batch since the last step)
        and every trainable gradient finite? One fused max-norm over the gradients, one read to the
        host, one all-reduce of the verdict across ranks (so all stop, or skip, together)."""
        loss_bad, self._loss_not_finite = self._loss_not_finite, None
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        flags = [] if loss_bad is None else [loss_bad.reshape(1).to(self.root_device)]
        # under fp16 AMP, inf gradients are the GradScaler's business: it skips those steps itself
        if params and getattr(self.precision_plugin, "scaler", None) is None:
            grads = [g.to_local() if hasattr(g, "to_local") else g for g in (p.grad for p in params)]
            norms = torch._foreach_norm(grads, float("inf"))
            flags.append(~torch.isfinite(torch.stack([n.float() for n in norms])).all().reshape(1).to(self.root_device))
        bad = bool(torch.cat(flags).any()) if flags else False
        if not self.reduce_boolean_decision(bad, all=False):
            self._nonfinite_run = 0
            return
        self._nonfinite_run += 1
        trainer = self.lightning_module.trainer
        what = _nonfinite_what(self.lightning_module, params, loss_bad)
        where = f"global step {trainer.global_step} (epoch {trainer.current_epoch})"
        if self.nonfinite == "skip" and self._nonfinite_run < self.nonfinite_patience:
            self.nonfinite_skipped += 1
            for p in params:  # no update this step: the optimizer skips parameters without a gradient
                p.grad = None
            rank_zero_warn(f"lightning-peft: non-finite {what} at {where}; step skipped (no optimizer update), "
                           f"{self._nonfinite_run} in a row, {self.nonfinite_skipped} in all (nonfinite='skip' stops "
                           f"after {self.nonfinite_patience} in a row).")
            return
        last = _last_checkpoint(trainer)
        resume = (f"The last checkpoint saved, with finite adapters, is {last}: resume from it with "
                  f"trainer.fit(..., ckpt_path={str(last)!r})." if last else
                  "No checkpoint was saved yet (add lightning_peft.AdapterCheckpoint to the callbacks to keep one).")
        cause = (f"{self._nonfinite_run} steps in a row were non-finite (nonfinite='skip', nonfinite_patience="
                 f"{self.nonfinite_patience})" if self.nonfinite == "skip" else "this step was not applied")
        raise NonFiniteTrainingError(
            f"lightning-peft: non-finite {what} at {where}; training stopped ({cause}, the adapters hold the last "
            f"finite values). {resume} Usual causes: a learning rate too high, fp16 overflow (train in bf16), a batch "
            f"whose loss is empty or infinite. PEFTStrategy(..., nonfinite='skip') skips such steps instead.")

    # -------------------------------------------------------------------------- checkpoints
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        check_optimizer_kind(self.optimizers, checkpoint)
        super().load_optimizer_state_dict(checkpoint)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        keys = adapter_state_keys(self.lightning_module)
        return {k: v for k, v in super().lightning_module_state_dict().items() if k in keys}

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        checkpoint[CHECKPOINT_KEY] = checkpoint_meta(self.lightning_module)
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """``torch.load(weights_only=True)`` unless the caller passes ``weights_only=False``
        (``trainer.fit(..., weights_only=False)`` for a file you trust): a checkpoint whose pickle
        would run code is refused with an error that says so."""
        if is_save_directory(checkpoint_path):  # an AdapterCheckpoint save directory
            return read_training_state(checkpoint_path, weights_only=weights_only)
        parent = super()
        return load_checkpoint_file(checkpoint_path, weights_only=weights_only,
                                    load=lambda path, _, safe: parent.load_checkpoint(path, weights_only=safe))

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        module = self.lightning_module
        try:
            check_checkpoint_structure(checkpoint)
            check_resume_config(module, checkpoint)
            check_checkpoint_adapters(module, checkpoint)
        except ValueError as err:  # name the file: the user passed it as ckpt_path
            path = getattr(module._trainer, "ckpt_path", None) if module._trainer is not None else None
            raise ValueError(f"{path}: {err}" if path else str(err)) from None
        module.load_state_dict(checkpoint["state_dict"], strict=False)
        # resume draws the same dropout masks as an uninterrupted run
        restore_rng_states(checkpoint.get(CHECKPOINT_KEY))


def check_optimizer_kind(optimizers: list, checkpoint: Mapping[str, Any]) -> None:
    """Refuse, with the fix, a resume whose optimizer cannot read the saved optimizer state: a
    bitsandbytes state (``__bnb_optimizer_quant_state__``, written under the ``PagedOptimizer`` callback) loaded
    into torch's AdamW fails at its first step with ``KeyError: 'exp_avg'``. (The reverse, torch's
    state into a bitsandbytes optimizer, is refused by ``PagedOptimizer`` itself.)"""
    states = checkpoint.get("optimizer_states") or []
    paged = [v.get("optimizer") for k, v in (checkpoint.get("callbacks") or {}).items()
             if str(k).startswith("PagedOptimizer") and isinstance(v, Mapping)]
    for index, (optimizer, state) in enumerate(zip(optimizers, states)):
        per_param = state.get("state", {}) if isinstance(state, Mapping) else {}
        saved_bnb = any(isinstance(s, Mapping) and bool(_BNB_STATE_KEYS & s.keys()) for s in per_param.values())
        if saved_bnb and not type(optimizer).__module__.startswith("bitsandbytes"):
            name = paged[0] if paged else "paged_adamw_8bit"
            raise ValueError(f"cannot resume optimizer {index}: the checkpoint holds bitsandbytes optimizer state "
                             f"(written with the PagedOptimizer callback{f', optimizer={name!r}' if paged else ''}), and "
                             f"this run's optimizer is {type(optimizer).__module__}.{type(optimizer).__name__}, which "
                             f"cannot read it. Resume with callbacks=[lightning_peft.callbacks.PagedOptimizer("
                             f"optimizer={name!r})] as in the run that wrote it, or start a new run from its adapters "
                             f"(fit without ckpt_path).")


class NonFiniteTrainingError(FloatingPointError):
    """Training stopped at a NaN/inf loss or adapter gradient (``nonfinite="raise"``, or too many
    skipped steps in a row with ``"skip"``); the message names the step and the last checkpoint."""


def _nonfinite_what(module: nn.Module, params: list[torch.Tensor], loss_bad: torch.Tensor | None) -> str:
    """Which values were not finite (computed only once a step is known to be bad)."""
    parts = []
    if loss_bad is not None and bool(loss_bad):
        parts.append("loss")
    names = {id(p): n for n, p in module.named_parameters()}
    bad = [names.get(id(p), "?") for p in params
           if not bool(torch.isfinite(p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).all())]
    if bad:
        parts.append(f"gradient in {len(bad)} adapter tensors ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})")
    return " and ".join(parts) or "loss or gradient on another rank"


def _last_checkpoint(trainer) -> str | None:
    """The newest checkpoint a checkpoint callback of ``trainer`` wrote that still exists."""
    paths = set()
    for callback in trainer.checkpoint_callbacks:
        for attr in ("_last_checkpoint_saved", "last_model_path", "best_model_path"):
            path = getattr(callback, attr, None)
            if path and os.path.exists(path):
                paths.add(path)
    return max(paths, key=os.path.getmtime) if paths else None


def _warn_if_adapter_dropout_is_off(module: nn.Module) -> None:
    """Say so when adapters start training with their dropout switched off by eval mode: a model from
    transformers' ``from_pretrained`` starts in eval mode, and Lightning (2.2+) keeps the mode it
    finds, so the configured ``lora_dropout`` would silently not apply."""
    off = [m for _, layer in adapter_modules(module) for m in layer.modules()
           if isinstance(m, DROPOUT_TYPES) and m.p > 0 and not m.training]
    if off:
        rates = ", ".join(f"{p:g}" for p in sorted({m.p for m in off}))
        rank_zero_warn(f"lightning-peft: {len(off)} adapter dropout modules (p={rates}) are in eval mode as training "
                       f"starts, so the adapters train without their dropout. A model from transformers' "
                       f"from_pretrained starts in eval mode and Lightning keeps the mode it finds. Call "
                       f"model.train() before trainer.fit (or self.train() in your LightningModule's on_fit_start), "
                       f"or set lora_dropout=0 to train without dropout on purpose.")


def _meta_tensor_names(module: nn.Module) -> list[str]:
    return [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]


def _refuse_meta_tensors(module: nn.Module) -> None:
    on_meta = _meta_tensor_names(module)
    if on_meta:
        raise RuntimeError(f"{len(on_meta)} tensors of {type(module).__name__} are on the meta device "
                           f"({', '.join(on_meta[:4])}{' ...' if len(on_meta) > 4 else ''}): configure_model builds "
                           f"without storage under lightning-peft, and no weights were loaded. Pass "
                           f"PEFTStrategy(checkpoint='model dir or .safetensors'), or call lp.load_quantized(self.model, "
                           f"path, self.trainer.strategy.quant_config, device=self.trainer.strategy.root_device) in "
                           f"configure_model, or build real random weights with PEFTStrategy(empty_init=False).")


def restore_adapters(module: nn.Module, checkpoint_path, quantize: bool = True) -> nn.Module:
    """Put the adapters of a lightning-peft ``.ckpt`` (or of an AdapterCheckpoint save directory)
    into a freshly built module, in place.

    The documented way back from a checkpoint (it holds no base weights)::

        model = MyModule.load_from_checkpoint(path, strict=False)  # hyper-parameters + base
        lp.restore_adapters(model, path)                          # quantize as trained, adapters

    With ``quantize`` (default) the base is quantized as it was in training, so the model computes
    what was trained; ``quantize=False`` keeps the float base. Adapter keys and shapes are checked
    strictly, as on resume. The file is read with ``torch.load(weights_only=True)``: one whose
    pickle would run code is refused."""
    if is_save_directory(checkpoint_path):
        checkpoint = read_training_state(checkpoint_path)
    else:
        from lightning.fabric.utilities.cloud_io import _load

        checkpoint = load_checkpoint_file(checkpoint_path, load=lambda path, _, safe: _load(
            path, map_location="cpu", weights_only=safe))
    meta = checkpoint.get(CHECKPOINT_KEY)
    if meta is None:
        raise ValueError(f"{checkpoint_path} was not written by a lightning-peft strategy (no "
                         f"'{CHECKPOINT_KEY}' entry); load it with LightningModule.load_from_checkpoint alone.")
    try:
        check_checkpoint_structure(checkpoint)
    except ValueError as err:
        raise ValueError(f"{checkpoint_path}: {err}") from None
    if adapter_configs(module):
        raise RuntimeError("the module already has adapters; build a fresh one before restore_adapters.")
    target = peft_target(module)  # chosen before injecting, as at setup
    configs = {name: config_from_dict(config, source=str(checkpoint_path)) for name, config in meta["adapters"].items()}
    quant = QuantConfig.from_dict(meta["quantization"]) if quantize and meta.get("quantization") else None
    if quant is not None and quant_config(module) is None:
        quantize_base(target, quant)
    try:
        for name, config in configs.items():
            inject_adapters(target, config, name)
        check_checkpoint_adapters(module, checkpoint)
    except ValueError as err:
        for name in list(adapter_configs(target)):  # the module is left without adapters, as it came
            delete_adapter(target, name)
        raise ValueError(f"{checkpoint_path}: {err}") from None
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    set_adapter(module, next(iter(meta["adapters"])))
    return module


# ---------------------------------------------------------------------------------- strategies
def parameter_count_line(module, quantization: str | None) -> str:
    """``lightning-peft: T trainable of N parameters (...)``. ``N`` counts a 4-bit weight as the
    ``out * in`` weights it stands for; Lightning's ModelSummary counts ``numel()`` of the packed
    storage (two 4-bit weights per byte), so it shows fewer: when they differ, the line says both."""
    params = list(module.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(logical_numel(p) for p in params)
    stored = sum(p.numel() for p in params)
    line = (f"lightning-peft: {trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.3f} %), "
            f"quantization={quantization}")
    if stored != total:
        line += (f"; a 4-bit weight counts as the weights it stands for here, while Lightning's model summary "
                 f"counts its packed storage (two per byte): {stored:,} in all there")
    return line


class PEFTStrategy(_PEFTSetup, SingleDeviceStrategy):
    """Single-device PEFT: ``PEFTStrategy(peft_config=LoraConfig(...), quantization="nf4")``.

    The device comes from the Trainer's ``accelerator``/``devices`` (or ``device=`` here); more
    than one device is refused with a pointer to the ``_ddp`` strategies.
    """

    strategy_name = "lightning_peft"

    def __init__(self, peft_config: LoraConfig | None = None, quantization: None | str | QuantConfig = None,
                 device: str | torch.device | None = None, registered_name: str | None = None, **kwargs: Any) -> None:
        super().__init__(peft_config=peft_config, quantization=quantization, device=device or "cpu", **kwargs)
        self._parallel_devices = [torch.device(device)] if device is not None else None
        self.registered_name = registered_name  # "qlora" etc. when made from a string: named in errors

    # The accelerator connector fills ``parallel_devices`` from accelerator=/devices= when a
    # strategy has the attribute and it is empty; root_device then follows it.
    @property
    def parallel_devices(self) -> list[torch.device] | None:
        return self._parallel_devices

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        if devices is not None and len(devices) > 1:
            name = self.registered_name or "PEFTStrategy"
            hint = f"strategy='{name}_ddp'" if self.registered_name else "PEFTDDPStrategy"
            raise ValueError(f"strategy {name!r} runs on one device, but devices={len(devices)} were requested. "
                             f"Use {hint} for several devices, or devices=1.")
        self._parallel_devices = devices

    @property
    def root_device(self) -> torch.device:
        return self._parallel_devices[0] if self._parallel_devices else self._root_device


class PEFTDDPStrategy(_PEFTSetup, DDPStrategy):
    """Data-parallel PEFT (``popen`` launch, one process per device; ``num_nodes`` for many machines)."""

    def __init__(self, peft_config: LoraConfig | None = None, quantization: None | str | QuantConfig = None,
                 **kwargs: Any) -> None:
        start_method = kwargs.get("start_method", "popen")
        if start_method != "popen":
            raise ValueError(f"start_method={start_method!r} is not supported: with spawn/fork the main process "
                             f"reloads the trained weights into its un-adapted model and the adapters are lost. "
                             f"Use the default start_method='popen' (strategy='lora_ddp' / 'qlora_ddp'), which runs "
                             f"your script once per device.")
        super().__init__(peft_config=peft_config, quantization=quantization, **kwargs)

    def _sync_float_weights(self, module: nn.Module) -> None:
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                if tensor.is_floating_point():
                    torch.distributed.broadcast(tensor.data, src=0)


def _recipe(use_dora: bool = False) -> LoraConfig:
    """The practical recipe: r=16, alpha=32, dropout 0.05, all linear layers."""
    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", use_dora=use_dora)


NF4 = QuantConfig(quant_type="nf4", double_quant=True, compute_dtype=torch.bfloat16)

REGISTERED = {
    "lora": (PEFTStrategy, dict(peft_config=_recipe(), quantization=None)),
    "qlora": (PEFTStrategy, dict(peft_config=_recipe(), quantization=NF4)),
    "dora": (PEFTStrategy, dict(peft_config=_recipe(use_dora=True), quantization=None)),
    "qdora": (PEFTStrategy, dict(peft_config=_recipe(use_dora=True), quantization=NF4)),
    "lora_ddp": (PEFTDDPStrategy, dict(peft_config=_recipe(), quantization=None)),
    "qlora_ddp": (PEFTDDPStrategy, dict(peft_config=_recipe(), quantization=NF4)),
}


def register_strategies() -> None:
    """Register the names above and the sharded ones (``lora_fsdp``, ``qlora_fsdp``, from
    :mod:`lightning_peft.fsdp`) with Lightning (done on ``import lightning_peft``)."""
    from .fsdp import PEFTFSDPStrategy  # it builds on this module

    registered = {**REGISTERED,
                  "lora_fsdp": (PEFTFSDPStrategy, dict(peft_config=_recipe(), quantization=None)),
                  "qlora_fsdp": (PEFTFSDPStrategy, dict(peft_config=_recipe(), quantization=NF4))}
    for name, (cls, params) in registered.items():
        if cls is PEFTStrategy:
            params = {**params, "registered_name": name}
        StrategyRegistry.register(name, cls, description=f"lightning-peft: {name}", override=True, **params)
