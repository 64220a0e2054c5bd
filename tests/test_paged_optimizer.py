"""PagedOptimizer: configure_optimizers' AdamW rebuilt as bitsandbytes' 8-bit / paged AdamW at fit start."""

from __future__ import annotations

import copy
import os
import warnings

import bitsandbytes as bnb
import lightning as L
import pytest
import torch

import lightning_peft as lp
from lightning_peft.callbacks.paged_optimizer import OPTIMIZERS, PagedOptimizer, page_restored_state
from plain_module import CausalLM, sequences


def _trainer(strategy="auto", callbacks=(), **kwargs):
    defaults = dict(accelerator=os.environ.get("LP_TEST_ACCELERATOR", "cpu"), devices=1, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0)
    return L.Trainer(strategy=strategy, callbacks=list(callbacks), **{**defaults, **kwargs})


def _state_bytes(optimizer) -> int:
    """Bytes of the tensors in ``optimizer.state``, each storage counted once (bitsandbytes shares
    its two 256-entry quantization maps between all parameters)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)}
    return sum(storages.values())


def _trainable_ids(module) -> set[int]:
    return {id(p) for p in module.parameters() if p.requires_grad}


def _optimizer_ids(optimizer) -> list[int]:
    return [id(p) for group in optimizer.param_groups for p in group["params"]]


# ------------------------------------------------------------------------------- state bytes
@pytest.mark.parametrize("hidden, min_8bit_size, state_dtype", [
    (512, 4096, torch.uint8),   # LoRA r=16 at hidden 512: every adapter tensor has >= 4096 elements
    (64, 0, torch.uint8),       # at hidden 64 they have 512-2048: 8-bit only with a lower threshold
    (64, 4096, torch.float32),  # ... and none at bitsandbytes' default
])
def test_8bit_state_bytes_against_torch_adamw(hidden, min_8bit_size, state_dtype):
    module = CausalLM(hidden=hidden)
    trainer = _trainer("lora", [PagedOptimizer("adamw_8bit", min_8bit_size=min_8bit_size)], max_steps=2)
    trainer.fit(module, sequences(n=8))
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    assert len(optimizer.state) == len(_trainable_ids(module))  # every adapter tensor has state
    assert all(state["state1"].dtype == state_dtype for state in optimizer.state.values())

    # torch's AdamW on the same tensors, after a step
    params = [p for group in optimizer.param_groups for p in group["params"]]
    reference = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.ones_like(p)
    reference.step()
    ratio = _state_bytes(optimizer) / _state_bytes(reference)
    print(f"hidden={hidden} min_8bit_size={min_8bit_size}: {_state_bytes(optimizer)} vs "
          f"{_state_bytes(reference)} bytes, ratio {ratio:.3f}")
    assert ratio <= 0.3 if state_dtype == torch.uint8 else ratio > 0.99


# --------------------------------------------------------------------------------- LR schedule
class ScheduledLM(CausalLM):
    """Two param groups with their own lr / weight decay, a per-step scheduler, the LRs recorded
    at every training step."""

    def __init__(self, schedule: str, **kwargs):
        super().__init__(**kwargs)
        self.schedule = schedule
        self.lrs: list[list[float]] = []

    def training_step(self, batch, batch_idx):
        self.lrs.append([group["lr"] for group in self.trainer.optimizers[0].param_groups])
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        matrices = [p for p in self.parameters() if p.ndim >= 2]
        vectors = [p for p in self.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": matrices, "lr": 1e-2, "weight_decay": 0.1},
                                       {"params": vectors, "lr": 3e-3, "weight_decay": 0.0}])
        S = torch.optim.lr_scheduler
        if self.schedule == "lambda":
            scheduler = S.LambdaLR(optimizer, [lambda s: min(1.0, (s + 1) / 4), lambda s: 0.8 ** s])
        else:  # SequentialLR steps its children directly; at the milestone it sets their LR itself
            scheduler = S.SequentialLR(optimizer, [S.LinearLR(optimizer, 0.1, 1.0, total_iters=3),
                                                   S.CosineAnnealingLR(optimizer, T_max=5)], milestones=[3])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@pytest.mark.parametrize("schedule", ["lambda", "sequential"])
def test_learning_rate_at_every_step_equals_the_unswapped_run(schedule):
    lrs = {}
    for name, callbacks in [("torch", []), ("paged", [PagedOptimizer("paged_adamw")])]:
        module = ScheduledLM(schedule, hidden=32, layers=1)
        trainer = _trainer("auto", callbacks, max_steps=6)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, sequences(n=8))
        lrs[name] = module.lrs
    assert isinstance(trainer.optimizers[0], bnb.optim.PagedAdamW)
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is trainer.optimizers[0]
    assert [g["weight_decay"] for g in trainer.optimizers[0].param_groups] == [0.1, 0.0]
    assert len(lrs["paged"]) == 6 and len({tuple(lr) for lr in lrs["paged"]}) == 6  # a new LR at every step
    assert lrs["paged"] == lrs["torch"]
    # the new optimizer's step is tracked as torch's schedulers expect: no "optimizer.step() has
    # been overridden" warning from the first scheduler step
    assert not [w for w in caught if "overridden" in str(w.message)]


# -------------------------------------------------------------------------------------- resume
class Snapshot(L.Callback):
    """The optimizer right after Lightning restored it (on_train_start follows the restore)."""

    def on_train_start(self, trainer, pl_module):
        self.optimizer = trainer.optimizers[0]
        self.state_dict = copy.deepcopy(trainer.optimizers[0].state_dict())


def _flat(state: dict) -> dict:
    """A bitsandbytes ``state_dict()`` entry with its quantization tensors (wrapped for FSDP) unwrapped."""
    return {**state, **state.get("__bnb_optimizer_quant_state__", {})}


def _assert_same_state(restored: dict, saved: dict) -> None:
    assert restored["state"].keys() == saved["state"].keys() and saved["state"]
    for index, state in saved["state"].items():
        assert restored["state"][index]["step"] == state["step"]
        for key, tensor in _flat(state).items():
            if torch.is_tensor(tensor):
                assert torch.equal(_flat(restored["state"][index])[key], tensor), (index, key)


class StopAtStart(L.Callback):
    """The optimizer's state tensors right after the restore (and PagedOptimizer's re-paging, which
    runs before this callback's hook); stops the run before its first step."""

    def on_train_start(self, trainer, pl_module):
        self.optimizer = trainer.optimizers[0]
        self.tensors = {(id(p), key): t for p, state in self.optimizer.state.items()
                        for key, t in state.items() if key in ("state1", "state2")}
        trainer.should_stop = True


def _checkpoint_after_two_steps(tmp_path, module, optimizer="paged_adamw_8bit", strategy="lora"):
    trainer = _trainer(strategy, [PagedOptimizer(optimizer, min_8bit_size=0)], max_steps=2)
    trainer.fit(module, sequences(n=8))
    trainer.save_checkpoint(tmp_path / "step2.ckpt")
    return tmp_path / "step2.ckpt", copy.deepcopy(trainer.optimizers[0].state_dict())


def test_resume_restores_the_bitsandbytes_state(tmp_path):
    """Train 2 steps with 8-bit state, save, resume for 2 more: the restored state equals the saved
    one and the resumed run's losses equal those of an uninterrupted 4-step run."""
    L.seed_everything(0)
    straight = CausalLM()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer("lora", [PagedOptimizer(min_8bit_size=0)], max_steps=4).fit(straight, sequences(n=8))
    paged_warnings = [str(w.message) for w in caught if "paged" in str(w.message).lower()]
    assert len(paged_warnings) == 1 and "on the CPU" in paged_warnings[0]  # ours; bitsandbytes' is muted

    L.seed_everything(0)
    ckpt, saved = _checkpoint_after_two_steps(tmp_path, CausalLM())
    assert any(_flat(state)["state1"].dtype == torch.uint8 for state in saved["state"].values())

    L.seed_everything(0)
    resumed, snapshot = CausalLM(), Snapshot()
    _trainer("lora", [PagedOptimizer(min_8bit_size=0), snapshot], max_steps=4).fit(
        resumed, sequences(n=8), ckpt_path=ckpt)
    assert isinstance(snapshot.optimizer, bnb.optim.PagedAdamW8bit)
    assert snapshot.state_dict["state"][0]["step"] == 2
    _assert_same_state(snapshot.state_dict, saved)
    assert len(resumed.losses) == 2
    assert max(abs(a - b) for a, b in zip(resumed.losses, straight.losses[2:])) <= 1e-6


@pytest.mark.parametrize("optimizer", ["paged_adamw_8bit", "paged_adamw"])
def test_resume_puts_the_moments_back_in_paged_buffers(tmp_path, monkeypatch, optimizer):
    """bitsandbytes' load_state_dict leaves a resumed paged optimizer's moments in ordinary memory
    (its first step moves them to the GPU as plain tensors); the callback copies each moment into the
    buffer bitsandbytes' get_state_buffer allocates for its parameter when that buffer is paged. The
    CPU has no paged memory, so a stand-in allocator flags its buffers as paged ones."""
    ckpt, saved = _checkpoint_after_two_steps(tmp_path, CausalLM(), optimizer)
    allocated = []

    def paged_buffer(self, p, dtype=torch.float32):
        buffer = torch.full_like(p, 7, dtype=dtype)  # not zeros: the copy must overwrite it
        buffer.is_paged = True
        allocated.append(buffer)
        return buffer

    monkeypatch.setattr(OPTIMIZERS[optimizer], "get_state_buffer", paged_buffer)
    check = StopAtStart()
    _trainer("lora", [PagedOptimizer(optimizer, min_8bit_size=0), check], max_steps=4).fit(
        CausalLM(), sequences(n=8), ckpt_path=ckpt)
    assert check.tensors and len(allocated) == len(check.tensors) == 2 * len(saved["state"])
    assert all(getattr(t, "is_paged", False) for t in check.tensors.values())
    assert {id(t) for t in check.tensors.values()} == {id(t) for t in allocated}
    _assert_same_state(check.optimizer.state_dict(), saved)  # the saved moments, not the 7s


def test_state_that_bitsandbytes_would_not_page_stays_as_restored(tmp_path):
    """On the CPU (and for tensors under 1e5 elements on a GPU) bitsandbytes allocates plain buffers:
    the restored tensors are kept, not copied."""
    ckpt, saved = _checkpoint_after_two_steps(tmp_path, CausalLM())
    check = StopAtStart()
    _trainer("lora", [PagedOptimizer(min_8bit_size=0), check], max_steps=4).fit(
        CausalLM(), sequences(n=8), ckpt_path=ckpt)
    assert check.tensors and not any(getattr(t, "is_paged", False) for t in check.tensors.values())
    _assert_same_state(check.optimizer.state_dict(), saved)
    assert page_restored_state(check.optimizer) == 0


@pytest.mark.skipif(os.environ.get("LP_TEST_ACCELERATOR") != "cuda", reason="paged memory needs a CUDA GPU "
                    "(scripts/gpu_check.sh runs this with LP_TEST_ACCELERATOR=cuda)")
def test_resumed_state_is_paged_on_cuda(tmp_path):
    """On a GPU: LoRA r=256 on hidden 512 gives 131,072-element factors, above bitsandbytes' 1e5
    paging threshold; after a resume their moments are paged again and hold the saved values."""
    strategy = lambda: lp.PEFTStrategy(peft_config=lp.LoraConfig(r=256))  # noqa: E731
    ckpt, saved = _checkpoint_after_two_steps(tmp_path, CausalLM(hidden=512), strategy=strategy())
    check = StopAtStart()
    _trainer(strategy(), [PagedOptimizer(min_8bit_size=0), check], max_steps=4).fit(
        CausalLM(hidden=512), sequences(n=8), ckpt_path=ckpt)
    large = [t for (pid, key), t in check.tensors.items() if t.numel() >= 1e5]
    assert large and all(getattr(t, "is_paged", False) for t in large)
    _assert_same_state(check.optimizer.state_dict(), saved)


def test_resume_needs_the_optimizer_that_wrote_the_checkpoint(tmp_path):
    # with strategy "lora" the checkpoint is read after on_fit_start, with the default one before it
    for name, strategy, callbacks in [("torch", "lora", []), ("adamw_8bit", "auto", [PagedOptimizer("adamw_8bit")])]:
        trainer = _trainer(strategy, callbacks, max_steps=1)
        trainer.fit(CausalLM(), sequences(n=8))
        trainer.save_checkpoint(tmp_path / f"{name}.ckpt")
    with pytest.raises(ValueError, match="written without PagedOptimizer.*Resume it without the callback"):
        _trainer("lora", [PagedOptimizer()], max_steps=2).fit(CausalLM(), sequences(n=8),
                                                              ckpt_path=tmp_path / "torch.ckpt")
    with pytest.raises(ValueError, match=r"Resume with PagedOptimizer\(optimizer='adamw_8bit'\)"):
        _trainer("auto", [PagedOptimizer("paged_adamw")], max_steps=2).fit(CausalLM(), sequences(n=8),
                                                                          ckpt_path=tmp_path / "adamw_8bit.ckpt")


# ------------------------------------------------------------------------ with and without our strategy
class SelfInjected(CausalLM):
    """Adapters injected in __init__, no lightning-peft strategy; the optimizer gets every
    parameter, the frozen base included, in two groups (the first one all frozen)."""

    def __init__(self):
        super().__init__()
        lp.inject_adapters(self.model, lp.LoraConfig(r=8))

    def configure_optimizers(self):
        embeddings = list(self.model.model.embed_tokens.parameters())
        rest = [p for p in self.parameters() if all(p is not e for e in embeddings)]
        return torch.optim.AdamW([{"params": embeddings, "lr": 1e-3}, {"params": rest}], lr=1e-2)


@pytest.mark.parametrize("strategy, module_class", [("lora", CausalLM), ("auto", SelfInjected)])
def test_only_trainable_parameters_reach_the_new_optimizer(strategy, module_class):
    module = module_class()
    trainer = _trainer(strategy, [PagedOptimizer("adamw_8bit")], max_steps=4)
    trainer.fit(module, sequences(n=8))

    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    ids = _optimizer_ids(optimizer)
    frozen = [p for p in module.parameters() if not p.requires_grad]
    assert frozen and len(ids) == len(set(ids)) and set(ids) == _trainable_ids(module)
    if module_class is SelfInjected:
        assert optimizer.param_groups[0]["params"] == []  # the all-frozen group stays, empty
        assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-2]
    assert module.losses[-1] < module.losses[0]


# ------------------------------------------------------------------------------------ bad input
def test_unknown_optimizer_name_lists_the_choices():
    with pytest.raises(ValueError, match="'adam8'.*'paged_adamw_8bit', 'paged_adamw', 'adamw_8bit'"):
        PagedOptimizer("adam8")
    with pytest.raises(ValueError, match="min_8bit_size=-1"):
        PagedOptimizer(min_8bit_size=-1)


@pytest.mark.parametrize("make, error, message", [
    (lambda params: torch.optim.SGD(params, lr=0.1), TypeError,
     "returned SGD.*Return torch.optim.AdamW.*or remove the PagedOptimizer callback"),
    (lambda params: torch.optim.Adam(params, weight_decay=0.1), ValueError, "L2.*Use torch.optim.AdamW"),
    (lambda params: torch.optim.AdamW(params, amsgrad=True), ValueError, "amsgrad=True.*Use amsgrad=False"),
])
def test_optimizers_that_do_not_map_are_refused_with_the_fix(make, error, message):
    class Module(CausalLM):
        def configure_optimizers(self):
            return make(self.parameters())

    with pytest.raises(error, match=message):
        _trainer("auto", [PagedOptimizer()], max_steps=1).fit(Module(), sequences(n=8))
