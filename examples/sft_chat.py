"""Instruction tuning end to end: JSONL chat data -> ChatDataModule -> Trainer(strategy="qlora") with the
guards -> adapter -> merged export. See docs/sft.md.

    python examples/sft_chat.py --out runs/sft                     # a tiny Llama and tokenizer built here
    python examples/sft_chat.py --base ./my-llama --train chat.jsonl --out runs/sft

Without --base it builds what a download would give (no network needed): a 2-layer Llama and a
byte-level BPE tokenizer with a ChatML template, saved to OUT/base; without --train it writes
OUT/chat.jsonl, conversations of a toy task (the assistant repeats the user's words in reverse order)
with a shared system prompt, and OUT/eval.jsonl, a benchmark of the same task, three of whose
conversations leaked into the training file (ChatDataModule drops them before training).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import lightning as L
import torch

import lightning_peft as lp
from lightning_peft.callbacks import AdapterCheckpoint, ChatTemplateGuard, ContaminationGuard
from lightning_peft.data import ChatDataModule

CHATML = ("{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SYSTEM = "You are a careful assistant. Answer with the words of the request in reverse order."
WORDS = ("apple river stone cloud green quiet seven paper window garden music orange silver winter forest candle "
         "bridge yellow ocean violet tiger maple copper desert island lantern meadow pepper rocket shadow spring "
         "thunder valley whisper anchor basket castle dragon feather harbor jungle kettle ladder marble needle "
         "pillow rabbit saddle temple umbrella velvet wagon zebra").split()


def toy_conversation(rng: random.Random) -> list[dict]:
    words = rng.sample(WORDS, rng.randint(3, 7))
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": " ".join(words)},
            {"role": "assistant", "content": " ".join(reversed(words))}]


def write_toy_data(out: Path, n: int = 400, seed: int = 0) -> tuple[Path, Path]:
    rng = random.Random(seed)
    evals = [toy_conversation(rng) for _ in range(40)]
    train = [toy_conversation(rng) for _ in range(n)] + evals[:3]  # three benchmark items leaked
    paths = out / "chat.jsonl", out / "eval.jsonl"
    for path, convs in zip(paths, (train, evals)):
        path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return paths


def build_base(out: Path) -> Path:
    """A tiny Llama and a ChatML BPE tokenizer, saved as a model directory (stands in for a download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([SYSTEM, " ".join(WORDS), "system user assistant"] * 4,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                        pad_token="<pad>", additional_special_tokens=["</s>", "<|im_start|>"],
                                        chat_template=CHATML)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                         max_position_embeddings=256, tie_word_embeddings=False))
    base = out / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    return base


class LossHistory(L.Callback):
    """The per-token training loss of each micro-batch (CausalLMModule logs it as train_loss)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["train_loss"]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=None, help="a local transformers causal LM directory")
    parser.add_argument("--train", type=Path, default=None, help="chat JSONL: {'messages': [...]} a line")
    parser.add_argument("--eval", type=Path, nargs="*", default=None, help="benchmark JSONL files to decontaminate against")
    parser.add_argument("--out", type=Path, default=Path("runs/sft"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--examples", type=int, default=400, help="toy conversations to write (without --train)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3, help="the recipe's 1e-4 is for real models; the toy "
                                                                "learns in a few steps at 2e-3")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.base or build_base(args.out)
    train, evals = args.train, args.eval
    if train is None:
        train, toy_eval = write_toy_data(args.out, args.examples)
        evals = [toy_eval] if evals is None else evals

    L.seed_everything(0)
    module = lp.CausalLMModule(base, lr=args.lr)  # loads the model and the tokenizer saved with it
    data = ChatDataModule(train, eval_sets=evals, tokenizer=module.tokenizer, batch_size=args.batch_size,
                          max_length=512)
    trainer = L.Trainer(strategy="qlora", max_steps=args.steps, accumulate_grad_batches=2, precision="32-true",
                        default_root_dir=args.out, log_every_n_steps=1, enable_progress_bar=False,
                        enable_model_summary=False,
                        val_check_interval=args.steps, check_val_every_n_epoch=None,
                        callbacks=[ChatTemplateGuard(), ContaminationGuard(tokenizer=module.tokenizer),
                                   AdapterCheckpoint(dirpath=args.out / "adapters", save_top_k=0),
                                   history := LossHistory()])
    trainer.fit(module, datamodule=data)

    losses = history.losses
    adapter = args.out / "adapters" / "last"
    merged = args.out / "merged"
    lp.export_merged(module.model, merged)
    result = {"first_loss": losses[0], "last_loss": losses[-1], "val_loss": float(trainer.callback_metrics["val_loss"]),
              "adapter": str(adapter), "merged": str(merged), "review": str(data.review_path), "stats": data.stats}
    print(json.dumps({k: v for k, v in result.items() if k != "stats"}, indent=2))
    return result


if __name__ == "__main__":
    main()
