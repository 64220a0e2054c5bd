"""What the user reads: the parameter count line agrees with Lightning's model summary or says
what each counts."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities.model_summary import ModelSummary

from lightning_peft.report import adapter_report
from lightning_peft.strategy import parameter_count_line
from plain_module import CausalLM, sequences


def test_parameter_count_names_what_lightnings_summary_counts(caplog):
    module = CausalLM(layers=1)
    trainer = L.Trainer(strategy="qlora", accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    with caplog.at_level("INFO"):
        trainer.fit(module, sequences(n=8))
    summary = ModelSummary(module)
    report = adapter_report(module, show=False)
    packed = sum(p.numel() for p in module.parameters())
    assert summary.total_parameters == packed < report.total_params  # NF4: two weights per stored byte
    assert summary.trainable_parameters == report.trainable_params
    line = parameter_count_line(module, "nf4")
    assert f"{report.trainable_params:,} trainable of {report.total_params:,} parameters" in line
    assert f"Lightning's model summary counts its packed storage (two per byte): {packed:,} in all there" in line
    assert line in caplog.text
    float_line = parameter_count_line(CausalLM(layers=1), None)  # nothing packed: one number, nothing to explain
    assert "packed" not in float_line


def test_tables_fit_80_columns_and_keep_what_tells_rows_apart(tmp_path):
    import io

    from rich.console import Console
    from torch import nn

    import lightning_peft as lp
    from lightning_peft.callbacks import RankMonitor
    from lightning_peft.cli import inspect_adapters, print_summaries
    from lightning_peft.tables import elide_middle

    assert elide_middle("model.model.layers.0.self_attn.q_proj", 24) == "model.mo…elf_attn.q_proj"
    assert elide_middle("short", 24) == "short"
    from lightning_peft.tables import shorten_names

    names = [f"model.model.layers.{i}.self_attn.{p}_proj" for i in (0, 1, 10) for p in "qkv"]
    shown = shorten_names(names, 28)
    assert len(set(shown.values())) == len(names) and max(map(len, shown.values())) <= 28  # layer numbers stay
    assert shown[names[0]] == "…layers.0.self_attn.q_proj"

    class Deep(nn.Module):  # long module paths, as a real model's
        def __init__(self):
            super().__init__()
            self.model = nn.ModuleDict({"decoder_layers_block": nn.ModuleDict({
                "attention_projection": nn.ModuleDict({n: nn.Linear(64, 64) for n in ("q_proj", "k_proj", "v_proj")})})})

    model = lp.inject_adapters(Deep(), lp.LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj"],
                                                     init_lora_weights=False))
    lp.save_adapter(model, tmp_path / "adapter")
    out = io.StringIO()
    print_summaries(inspect_adapters(tmp_path / "adapter"), Console(file=out, width=80))
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    for name in ("q_proj", "k_proj", "v_proj"):  # each row keeps its distinguishing end
        assert any(line.count(name) for line in text.splitlines() if "…" in line or "decoder" in line), name
    assert "…" in text and "...," not in text

    monitor = RankMonitor(every_n_steps=1, plot=False)
    monitor.steps = [1]
    monitor.ranks = {f"model.decoder_layers_block.attention_projection.{n}": 8 for n in ("q_proj", "k_proj")}
    monitor.effective_ranks = {k: [3] for k in monitor.ranks}
    monitor.spectra = {k: [[12345.678, 2345.6789, 345.67891, 45.678912, 5.6789123]] for k in monitor.ranks}
    import lightning_peft.callbacks.rank_monitor as rm

    out = io.StringIO()
    original = rm.Console
    rm.Console = lambda: Console(file=out, width=80)
    try:
        monitor._print_table()
    finally:
        rm.Console = original
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "q_proj" in text and "k_proj" in text and "1.23e+04" in text and "5.68" in text  # no number cut
