"""Sharded PEFT: ``Trainer(strategy="lora_fsdp" | "qlora_fsdp")`` over PyTorch's FSDP2.

FSDP2 (``torch.distributed.fsdp.fully_shard``, reached through Lightning's
``ModelParallelStrategy``) shards *each parameter* along its first dimension as a ``DTensor``.
That is what a PEFT model needs, where FSDP1's flat parameters are not: frozen base weights and
trainable adapters may share a unit (FSDP1 needs one ``requires_grad`` per flat parameter), it
runs on the CPU with gloo (so CI tests it), and a 4-bit base shards as its packed bytes.

At setup, in this order (docs/strategy.md, "Sharded training"):

1. every rank takes rank 0's float weights (a rank's shard is cut from its own full copy, so
   differently initialised ranks would otherwise assemble a model that none of them had);
2. the base is quantized (``qlora_fsdp``), its packed bytes stored in the float dtype
   (``quant_storage``) so they shard like any float tensor; the small quantization constants
   (absmax, code) are replicated on every rank as the layer's ``quant_state``;
3. adapters are injected, and their initial values broadcast from rank 0 as well;
4. each block (the classes a transformers model lists in ``_no_split_modules``, else each entry of
   a ``ModuleList``) becomes an FSDP unit, then the model under the LightningModule.

Checkpoints hold the adapters only, gathered to rank 0 in the PEFT key layout (the frozen base is
never gathered), with a full, unsharded optimizer state: a checkpoint from ``lora_fsdp`` resumes
under ``lora_fsdp`` with any number of processes, and loads with :func:`restore_adapters` into a
plain model.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping

import torch
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from .checkpoint import (CHECKPOINT_KEY, adapter_state_keys, check_checkpoint_adapters, check_checkpoint_structure,
                         check_resume_config, is_save_directory,
                         read_training_state,
                         restore_rng_states)
from .config import QuantConfig
from .inject import adapter_configs
from .quantize import is_quantized
from .strategy import _as_quant_config, _PEFTSetup, peft_target

# FSDP1 (FSDPStrategy) arguments that have no meaning under FSDP2: named in the error.
_FSDP1_ONLY = ("sharding_strategy", "auto_wrap_policy", "use_orig_params", "cpu_offload", "mixed_precision",
               "activation_checkpointing_policy", "state_dict_type", "device_mesh")


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The submodules that become FSDP units, innermost first: transformer blocks (the class names
    in any ``_no_split_modules``), else the entries of each ``nn.ModuleList``."""
    block_names = {name for m in module.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    units = [m for m in module.modules() if type(m).__name__ in block_names]
    if not units:
        units = [child for m in module.modules() if isinstance(m, nn.ModuleList) for child in m]
    return units


def _keep_quant_state_on_module(module: nn.Module) -> None:
    """FSDP2 replaces each bitsandbytes ``Params4bit`` by a plain ``DTensor`` shard, and the
    all-gathered weight it hands the layer at forward time has lost the ``quant_state`` attribute
    (bitsandbytes then raises "quant_state is required"). A ``Linear4bit`` recovers it from
    ``layer.quant_state`` when that is set, which is where it is put here."""
    for layer in module.modules():
        if is_quantized(layer) and getattr(layer.weight, "quant_state", None) is not None:
            layer.quant_state = layer.weight.quant_state


@contextmanager
def gathered_adapters(module: nn.Module):
    """Within the block, every sharded adapter tensor of ``module`` is a plain, full tensor, so
    that :func:`lightning_peft.save_adapter` (and anything else that reads adapters) works on rank 0
    as on one process. Enter it on every rank (gathering is a collective); no forward inside.
    Without FSDP it changes nothing."""
    keys = adapter_state_keys(module)
    swapped = []
    for name, param in list(module.named_parameters()):
        if name in keys and hasattr(param, "full_tensor"):
            owner_path, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_path)
            owner._parameters[attr] = nn.Parameter(param.full_tensor().detach(), requires_grad=param.requires_grad)
            swapped.append((owner, attr, param))
    try:
        yield module
    finally:
        for owner, attr, param in swapped:
            owner._parameters[attr] = param


def _broadcast_from_rank0(module: nn.Module) -> None:
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                torch.distributed.broadcast(tensor.data, src=0)


class PEFTFSDPStrategy(_PEFTSetup, ModelParallelStrategy):
    """Sharded PEFT over FSDP2 (``fully_shard``), on GPUs (NCCL) or CPUs (gloo).

    ``PEFTFSDPStrategy(peft_config=LoraConfig(...), quantization="nf4", reshard_after_forward=True)``;
    ``process_group_backend`` and ``timeout`` go to Lightning's ``ModelParallelStrategy``. The 4-bit
    bytes are stored in the compute dtype (``quant_storage``) so they shard like float tensors."""

    def __init__(self, peft_config=None, quantization: None | str | QuantConfig = None,
                 reshard_after_forward: bool = True, **kwargs: Any) -> None:
        fsdp1 = sorted(set(kwargs) & set(_FSDP1_ONLY))
        if fsdp1:
            raise TypeError(f"{', '.join(fsdp1)}: FSDP1 (FSDPStrategy) arguments, but lightning-peft shards with FSDP2 "
                            f"(fully_shard), which shards each parameter on its own. Drop them; "
                            f"reshard_after_forward=False is FSDP2's SHARD_GRAD_OP.")
        quant = _as_quant_config(quantization)
        if quant is not None and quant.is_4bit and quant.quant_storage != quant.compute_dtype:
            quant = dataclasses.replace(quant, quant_storage=quant.compute_dtype)
        kwargs.setdefault("save_distributed_checkpoint", False)  # adapter-only checkpoints: one small file
        self.reshard_after_forward = reshard_after_forward
        super().__init__(peft_config=peft_config, quantization=quant, **kwargs)

    # --------------------------------------------------------------------------- set-up
    def setup_environment(self) -> None:
        # one data-parallel dimension over every process of every node; no tensor parallelism
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        if self._tensor_parallel_size == "auto":
            self._tensor_parallel_size = 1
        super().setup_environment()

    def _sync_float_weights(self, module: nn.Module) -> None:
        _broadcast_from_rank0(module)

    def _prepare_module(self, module: nn.Module) -> None:
        if adapter_configs(module):  # setup runs again for validate/test/predict after fit
            return
        if self.quant_config is None:  # qlora: the mixin broadcasts before quantizing
            _broadcast_from_rank0(module)
        super()._prepare_module(module)
        _broadcast_from_rank0(module)  # adapter initialisations differ by rank
        _keep_quant_state_on_module(module)
        self._shard(module)

    def _shard(self, module: nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        target = peft_target(module)
        for unit in shard_units(target):
            fully_shard(unit, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        if target is not module:
            fully_shard(target, mesh=mesh, reshard_after_forward=self.reshard_after_forward)

    def setup(self, trainer) -> None:
        # ModelParallelStrategy.setup, less its demand that the user shard in configure_model:
        # the sharding happens here, after quantization and injection.
        self._prepare_module(self.lightning_module)
        self.accelerator.setup(trainer)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    # -------------------------------------------------------------------------- checkpoints
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The adapter tensors, gathered from their shards on every rank (a collective): the
        frozen base is never gathered."""
        keys = adapter_state_keys(self.lightning_module)
        state = {}
        for key, value in self.lightning_module.state_dict().items():
            if key in keys:
                full = value.full_tensor() if hasattr(value, "full_tensor") else value
                state[key] = full.detach().cpu()
        return state

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        from lightning.fabric.utilities.cloud_io import _load
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        path = Path(self.broadcast(checkpoint_path))
        checkpoint = (read_training_state(path, weights_only=weights_only) if is_save_directory(path)
                      else _load(path, map_location="cpu", weights_only=weights_only))
        module = self.lightning_module
        check_checkpoint_structure(checkpoint)
        check_resume_config(module, checkpoint)
        check_checkpoint_adapters(module, checkpoint)  # full (global) shapes against the file's
        self._load_adapter_tensors(checkpoint["state_dict"])
        for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", [])):
            if state:
                set_optimizer_state_dict(self.model, optimizer, optim_state_dict=_by_name(state, optimizer, module),
                                         options=StateDictOptions(full_state_dict=True))
        return checkpoint

    def _load_adapter_tensors(self, state: Mapping[str, torch.Tensor]) -> None:
        from torch.distributed.tensor import distribute_tensor

        own = self.lightning_module.state_dict()
        with torch.no_grad():
            for key, value in state.items():
                target = own[key]
                if hasattr(target, "device_mesh"):  # a sharded DTensor: copy this rank's piece
                    piece = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements)
                    target.to_local().copy_(piece.to_local())
                else:
                    target.copy_(value)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        # the tensors went in at load_checkpoint; what is left is the RNG state
        restore_rng_states(checkpoint.get(CHECKPOINT_KEY))


def _by_name(state: dict[str, Any], optimizer, module: nn.Module) -> dict[str, Any]:
    """Lightning writes FSDP2 optimizer state keyed by parameter name; a state saved by a
    non-sharded optimizer is keyed by position: re-key it by name for ``set_optimizer_state_dict``."""
    if not state.get("state") or not isinstance(next(iter(state["state"])), int):
        return state
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import OptimStateKeyType

    return FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_NAME, module)
