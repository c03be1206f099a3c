"""Rollouts: n sampled responses per prompt, from HF ``generate`` or from vLLM.

    sampler = build_sampler(cfg, env, tokenizer, model_path)      # HFRollout or VLLMRollout
    batch = sampler.generate(policy, messages, n=G, max_new_tokens=..., temperature=..., top_p=...,
                             top_k=..., version=step)             # -> Batch

The sampler's own scores are never used for training: the trainer recomputes old-policy log-probs
with the same forward it trains with (HF's sampling path applies logits processors and may run in a
different precision, so its numbers are not the policy's).

vLLM (``rollout.backend = "vllm"``; optional, GPU only, imported lazily): one engine per rank samples
that rank's prompts; before sampling with a policy ``version`` it has not seen, the policy's full
state dict (without the log Z head) is gathered on every rank and pushed into the engine
(``load_weights`` below). This path is tested against a fake engine only: it has NOT been run on a
real GPU with vllm installed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

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
    resp = out[:, enc["input_ids"].shape[1]:]
    return to_batch(tokenizer, enc, resp, response_mask(resp, tokenizer.eos_token_id), n)


def to_batch(tokenizer, enc: dict, resp: torch.Tensor, mask: torch.Tensor, n: int) -> Batch:
    """Batch from left-padded prompts ``enc`` [N, P] and right-padded responses ``resp`` [N * n, R]
    (``mask`` [N * n, R]: the response tokens, first EOS included)."""
    prompt_ids = enc["input_ids"].repeat_interleave(n, dim=0)
    prompt_attn = enc["attention_mask"].repeat_interleave(n, dim=0)
    labels = torch.where(mask, resp, torch.full_like(resp, IGNORE_INDEX))
    texts = tokenizer.batch_decode(torch.where(mask, resp, tokenizer.pad_token_id), skip_special_tokens=True)
    return Batch(torch.cat([prompt_ids, resp], dim=1), torch.cat([prompt_attn, mask.long()], dim=1), labels, mask,
                 prompt_ids.shape[1], texts)


class HFRollout:
    """transformers ``generate`` on the (gathered) FSDP policy itself."""

    def __init__(self, tokenizer, device):
        self.tokenizer, self.device = tokenizer, device

    def generate(self, policy, messages: List[list], *, n: int, max_new_tokens: int, temperature: float,
                 top_p: float, top_k: int, version: Optional[int] = None) -> Batch:
        return generate(policy, self.tokenizer, messages, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, top_k=top_k, device=self.device)


def policy_weights(policy) -> List[Tuple[str, torch.Tensor]]:
    """(HF name, full tensor) of the policy's language model, log Z head excluded. Collective under FSDP:
    every rank receives every full tensor (each rank's engine needs them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    return [(k[len("lm."):], v) for k, v in full.items() if k.startswith("lm.")]


def _load_on_worker(worker, weights):
    # runs inside the vLLM worker (collective_rpc passes the worker as the first argument)
    worker.model_runner.model.load_weights(weights=weights)


def load_weights(llm, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
    """Push HF-named weights into a vLLM ``LLM``: ``collective_rpc`` (vLLM >= 0.7, V1 engine) when the
    engine has it, else the V0 in-process model runner's ``load_weights``. The model's own
    ``load_weights`` maps HF names onto vLLM's fused layouts (qkv, gate_up) and skips tied heads."""
    weights = list(weights)
    if hasattr(llm, "collective_rpc"):
        llm.collective_rpc(_load_on_worker, args=(weights,))
    else:
        llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(weights=weights)


class VLLMRollout:
    """Samples with ``vllm.LLM.generate``; weights follow the FSDP policy (see the module docstring).

    ``engine``: an already built engine (tests pass a fake one); default: ``vllm.LLM`` on
    ``model_path`` in bf16, taking ``gpu_memory`` of the GPU.
    """

    def __init__(self, tokenizer, device, *, model_path=None, gpu_memory: float = 0.3, seed: int = 0,
                 max_model_len: Optional[int] = None, engine=None):
        self.tokenizer, self.device = tokenizer, device
        if engine is None:
            import vllm  # optional dependency: pip install vllm
            engine = vllm.LLM(model=str(model_path), dtype="bfloat16", gpu_memory_utilization=gpu_memory, seed=seed,
                              max_model_len=max_model_len, enable_prefix_caching=True)
        self.llm = engine
        self.version: Optional[int] = None

    def sync(self, policy, version: Optional[int]) -> None:
        """Push the policy's weights unless the engine already has this ``version`` (collective)."""
        if version is not None and version == self.version:
            return
        load_weights(self.llm, policy_weights(policy))
        self.version = version

    def generate(self, policy, messages: List[list], *, n: int, max_new_tokens: int, temperature: float,
                 top_p: float, top_k: int, version: Optional[int] = None) -> Batch:
        from vllm import SamplingParams
        self.sync(policy, version)
        enc = encode_prompts(self.tokenizer, messages, "cpu")
        prompts = [{"prompt_token_ids": ids[m.bool()].tolist()}  # vLLM takes unpadded token ids
                   for ids, m in zip(enc["input_ids"], enc["attention_mask"])]
        # one seed per prompt from the torch generator: checkpointed with it, so a resumed run samples the same
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1,
                                 max_tokens=max_new_tokens, seed=s) for s in seeds]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        responses = [list(c.token_ids) for o in outs for c in o.outputs]
        R = max(1, max(len(r) for r in responses))
        resp = torch.full((len(responses), R), self.tokenizer.pad_token_id, dtype=torch.long)
        lengths = torch.tensor([len(r) for r in responses])
        for i, r in enumerate(responses):
            resp[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask = response_mask(resp, self.tokenizer.eos_token_id) & (torch.arange(R) < lengths[:, None])
        enc = {k: v.to(self.device) for k, v in enc.items()}
        return to_batch(self.tokenizer, enc, resp.to(self.device), mask.to(self.device), n)


def build_sampler(cfg, env, tokenizer, model_path=None):
    """The configured rollout backend. vLLM needs CUDA and a model folder (not the in-code tiny models)."""
    if cfg.rollout.backend == "hf":
        return HFRollout(tokenizer, env.device)
    if env.device.type != "cuda":
        raise ValueError("rollout.backend='vllm' needs a CUDA GPU; use rollout.backend='hf' on CPU.")
    if model_path is None:
        raise ValueError("rollout.backend='vllm' needs a model folder; the in-code tiny models have none.")
    return VLLMRollout(tokenizer, env.device, model_path=model_path, gpu_memory=cfg.rollout.vllm_gpu_memory,
                       seed=cfg.run.seed + env.rank)
