"""Rollouts: n sampled responses per prompt with HF ``generate``.

The sampler's own scores are never used for training: the trainer recomputes old-policy log-probs
with the same forward it trains with (HF's sampling path applies logits processors and may run in a
different precision, so its numbers are not the policy's).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from flowrl import distributed
from flowrl.model import IGNORE_INDEX


@dataclass
class Batch:
    """One rollout batch; rows of the same prompt are adjacent (row = prompt_index * G + sample)."""
    input_ids: torch.Tensor        # [B, P+R] left-padded prompt | right-padded response
    attention_mask: torch.Tensor   # [B, P+R]
    labels: torch.Tensor           # [B, R] response tokens, IGNORE_INDEX after the first EOS
    response_mask: torch.Tensor    # [B, R] bool, True up to and including the first EOS
    prompt_len: int                # P
    texts: List[str]               # decoded responses (special tokens stripped)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def slice(self, lo: int, hi: int) -> "Batch":
        return Batch(self.input_ids[lo:hi], self.attention_mask[lo:hi], self.labels[lo:hi],
                     self.response_mask[lo:hi], self.prompt_len, self.texts[lo:hi])


def encode_prompts(tokenizer, messages: List[list], device) -> dict:
    """Chat-template and left-pad a list of conversations -> input_ids, attention_mask [N, P]."""
    texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def response_mask(responses: torch.Tensor, eos_id: int) -> torch.Tensor:
    """True up to and including the first EOS of each row (generate pads after it, often with EOS)."""
    is_eos = responses == eos_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return ~after_eos


@torch.no_grad()
def generate(policy, tokenizer, messages: List[list], *, n: int, max_new_tokens: int, temperature: float,
             top_p: float, top_k: int, device) -> Batch:
    """Sample ``n`` responses for each conversation in ``messages``."""
    enc = encode_prompts(tokenizer, messages, device)
    lm = policy.lm
    was_training = lm.training
    lm.eval()
    with distributed.gathered(policy):
        out = policy(enc["input_ids"], enc["attention_mask"], generate=dict(
            do_sample=True, num_return_sequences=n, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            # a model's generation_config may ship penalties (Qwen2.5-Instruct: repetition_penalty 1.05):
            # they would make the samples off-policy w.r.t. the log-probs we train on
            repetition_penalty=1.0, no_repeat_ngram_size=0,
            synced_gpus=False))  # params are gathered: no collective inside, ranks may stop at different lengths
    lm.train(was_training)
    P = enc["input_ids"].shape[1]
    resp = out[:, P:]
    mask = response_mask(resp, tokenizer.eos_token_id)
    prompt_attn = enc["attention_mask"].repeat_interleave(n, dim=0)
    labels = torch.where(mask, resp, torch.full_like(resp, IGNORE_INDEX))
    texts = tokenizer.batch_decode(torch.where(mask, resp, tokenizer.pad_token_id), skip_special_tokens=True)
    return Batch(out, torch.cat([prompt_attn, mask.long()], dim=1), labels, mask, P, texts)
