"""Default target modules per model architecture (transformers' ``config.model_type``), the same
facts as HF PEFT's ``TRANSFORMERS_MODELS_TO_*_TARGET_MODULES_MAPPING`` tables, so that a config
built without ``target_modules`` adapts the modules PEFT would.

Used by ``LoraConfig(target_modules=None)`` and ``IA3Config()`` (whose default is per
architecture); ``feedforward_modules`` of (IA)^3 likewise.
"""

from __future__ import annotations

from torch import nn

# attention projections PEFT's LoRA adapts by default
LORA_TARGETS: dict[str, list[str]] = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "blip-2": ["q", "v", "q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"],
    "layoutlm": ["query", "value"], "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"], "gpt_bigcode": ["c_attn"], "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"], "RefinedWeb": ["query_key_value"], "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"], "codegen": ["qkv_proj"], "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"], "stablelm": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
}

# (IA)^3: (targets, the feed-forward subset scaled on the input side)
IA3_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "t5": (["k", "v", "wo"], ["wo"]), "mt5": (["k", "v", "wi_1"], []),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]), "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "gpt_neo": (["q_proj", "v_proj", "c_proj"], ["c_proj"]), "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gpt_bigcode": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "llama4": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]), "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
    "deberta": (["in_proj", "output.dense"], ["output.dense"]),
    "RefinedWebModel": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "RefinedWeb": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]), "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma3_text": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]), "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
}


def model_type(model: nn.Module) -> str | None:
    """``model.config.model_type`` of a transformers model (of the first submodule that has one),
    else None."""
    for module in model.modules():
        config = getattr(module, "config", None)
        kind = getattr(config, "model_type", None)
        if isinstance(kind, str) and kind:
            return kind
    return None


def default_targets(table: dict, model: nn.Module, method: str, example: str):
    """``table[model_type(model)]``, or a ValueError that says how to name the targets."""
    kind = model_type(model)
    if kind not in table:
        what = f"model type {kind!r}" if kind else f"{type(model).__name__} (not a transformers model)"
        raise ValueError(f"{method} has no default target modules for {what}; the defaults follow PEFT's table "
                         f"per architecture ({', '.join(sorted(table)[:12])}, ...). Name the layers yourself: "
                         f"{example}.")
    return table[kind]
