"""FlowRL in TRL: ``FlowRLTrainer`` / ``FlowRLConfig``, subclasses of TRL's ``GRPOTrainer`` / ``GRPOConfig``.

    from flowrl.trl_trainer import FlowRLConfig, FlowRLTrainer      # instead of GRPOConfig, GRPOTrainer
    args = FlowRLConfig(output_dir="out", num_generations=4, learning_rate=1e-5)   # preset="paper"
    # FlowRLConfig(preset="authors") / "verl-recipe": flowrl/presets.py; a FlowRL field set explicitly wins
    trainer = FlowRLTrainer(model="HuggingFaceTB/SmolLM2-135M-Instruct", reward_funcs=my_reward,
                            args=args, train_dataset=ds)
    trainer.train()

Everything TRL does around the loss stays TRL's (generation with transformers / vLLM, reward functions,
``num_generations``, ``num_iterations`` / ``steps_per_generation``, gradient accumulation, bf16, gradient
checkpointing, PEFT, accelerate DDP / FSDP, logging, the Hub). What changes, with one implementation
shared with ``flowrl/train.py`` (nothing here re-implements the math):

- the objective is FlowRL's trajectory balance, ``flowrl.algorithms.flowrl_objective`` (which calls
  ``flowrl_kernels.flowrl_loss``): ``mean_i w_i (log Z(x_i) + mean_t logp - beta r_hat_i - mean_t ref_logp)^2``
  with w_i the detached, clipped sequence-level importance weight (``flowrl_importance``);
- r_hat = ``flowrl_kernels.group_normalize`` of the weighted sum of the reward functions over each prompt's
  ``num_generations`` completions (TRL's own advantages are replaced);
- log Z(x) = ``flowrl.model.LogZHead`` (3-layer MLP, fp32, outside autocast) over the mean of the prompt's
  last hidden states (``flowrl.model.log_z_from_hidden``), one more AdamW param group (``log_z_lr``, no
  weight decay; or the policy's lr and decay with ``log_z_param_group="policy"``; same schedule); its
  gradient is averaged over processes, clipped together with the policy's (one global norm, as in
  flowrl/train.py) and zeroed after every optimizer step;
- reference log-probs always: a frozen copy of the initial policy (PEFT: the base model with adapters
  disabled, or a frozen "ref" copy of a pretrained adapter), computed by TRL's own reference pass;
- every log-prob through TRL's fused lm_head path with ``flowrl_kernels.integrations.trl`` patched in
  (``linear_token_logprobs``: no ``[B, T, V]`` logits). The patch is process-wide and is left on.

Docs, measured comparison with TRL's GRPO and flowrl/train.py: docs/trl.md. Example: examples/trl_flowrl.py.

Naming: FlowRL's beta (the reward scale, 15) is ``flowrl_beta``; TRL's ``beta`` (its KL coefficient) must
stay 0. Inside the trainer ``self.beta`` is FlowRL's beta (TRL reads it only as "compute reference
log-probs").

Refused with a ValueError (FlowRL defines these differently or not at all): ``beta != 0``,
``sync_ref_model``, ``scale_rewards != "group"``, ``multi_objective_aggregation != "sum_then_normalize"``,
``loss_type`` / ``importance_sampling_level`` / ``epsilon`` / ``epsilon_high`` / ``delta`` changed from their
defaults (use ``flowrl_importance`` / ``flowrl_clip``), ``top_entropy_quantile < 1``, an entropy bonus
(``entropy_coef`` / ``use_adaptive_entropy``), ``off_policy_mask_threshold``, ``use_vllm`` with
``vllm_importance_sampling_correction=True`` (set it False: FlowRL's own weight corrects old vs current
policy; TRL's vLLM ratio would multiply a GRPO loss that is not there), DeepSpeed (its engine owns the
optimizer and would not see the log Z head; use DDP or FSDP), and a PEFT adapter on ``lm_head`` together
with ``cast_lm_head_to_fp32`` (TRL's own rule).

Saving: ``save_model`` writes the policy exactly as GRPOTrainer does (a plain HF folder or adapter, no log
Z). Checkpoints (``save_steps``) also carry ``flowrl_log_z.safetensors``; the optimizer state in them holds
the log Z group, so ``train(resume_from_checkpoint=...)`` continues the same run.

FlowRL metrics in TRL's logs: ``flowrl/log_z``, ``flowrl/delta``, ``flowrl/delta_abs``, ``flowrl/is_weight``
(mean clipped weight), ``flowrl/is_clip_frac`` (+ ``_low`` / ``_high``), ``flowrl/is_log_w_abs``,
``flowrl/logp_mean``, ``flowrl/ref_logp_mean``, ``flowrl/r_hat_abs``, plus TRL's ``entropy``, ``reward``...
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from accelerate.utils import is_peft_model
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from trl.models import prepare_fsdp
from trl.trainer.utils import add_fused_lm_head

import flowrl_kernels
import flowrl_kernels.integrations.trl as fk_trl
from flowrl_kernels.hf import left_padded_position_ids
from flowrl import algorithms, presets
from flowrl.config import Algo
from flowrl.model import LogZHead, log_z_from_hidden

LOG_Z_FILE = "flowrl_log_z.safetensors"

# flowrl/presets.py's fields -> FlowRLConfig's; FlowRL fields no preset sets take _DEFAULTS
_PRESET_FIELDS = {"algo.importance": "flowrl_importance", "algo.clip": "flowrl_clip", "algo.empty": "flowrl_empty",
                  "logz.include_last_token": "log_z_include_last_prompt_token", "logz.param_group": "log_z_param_group"}
_DEFAULTS = dict(flowrl_beta=15.0, log_z_lr=1e-3, log_z_dropout=0.1, log_z_detach_input=False)
assert set(_PRESET_FIELDS) == set(presets.PRESET_FIELDS), "flowrl/presets.py gained a field FlowRLConfig lacks"


def preset_values(name: str) -> dict:
    """FlowRLConfig field -> value for a preset (flowrl/presets.py, docs/flowrl.md)."""
    presets.check_preset(name)
    return {**_DEFAULTS, **{_PRESET_FIELDS[k]: copy.deepcopy(v) for k, v in presets.PRESETS[name].items()}}


# GRPOConfig options FlowRL does not use: name -> (the only accepted value, why / what to use instead)
_FIXED = {
    "beta": (0.0, "TRL's `beta` is a KL coefficient; FlowRL's reward scale is `flowrl_beta` (15 by default) and "
                  "FlowRL already ties the policy to the reference through its objective"),
    "sync_ref_model": (False, "FlowRL's reference is the initial policy"),
    "scale_rewards": ("group", "FlowRL normalizes rewards within each prompt's group"),
    "multi_objective_aggregation": ("sum_then_normalize", "FlowRL normalizes the weighted sum of the rewards"),
    "loss_type": ("dapo", "the loss is FlowRL's trajectory balance"),
    "importance_sampling_level": ("token", "use `flowrl_importance` ('sequence', 'sequence_mean' or 'none')"),
    "epsilon": (0.2, "use `flowrl_clip` for the importance-weight clip"),
    "epsilon_high": (None, "use `flowrl_clip` for the importance-weight clip"),
    "delta": (None, "use `flowrl_clip` for the importance-weight clip"),
    "top_entropy_quantile": (1.0, "FlowRL weights whole sequences, not high-entropy tokens"),
    "entropy_coef": (0.0, "FlowRL has no entropy bonus (its objective keeps the policy's diversity)"),
    "use_adaptive_entropy": (False, "FlowRL has no entropy bonus"),
    "off_policy_mask_threshold": (None, "FlowRL's clipped sequence weight handles off-policy samples"),
}


@dataclass
class FlowRLConfig(GRPOConfig):
    """GRPOConfig plus FlowRL's fields. A FlowRL field left None takes its value from ``preset``.

    The TRL options FlowRL refuses are listed in this module's docstring (flowrl/trl_trainer.py)."""

    preset: str = field(default=presets.DEFAULT_PRESET, metadata={
        "help": "FlowRL variant (flowrl/presets.py, docs/flowrl.md): 'paper' (clip [0.8, 1.2], empty response "
                "weight 0, every prompt token pooled, log Z in its own group), 'authors' (their verl fork: raw "
                "weight, empty response weight 1, last prompt token left out, log Z in the policy's group) or "
                "'verl-recipe' (as 'authors', weight clamped at 10). A FlowRL field set explicitly wins."})
    flowrl_beta: Optional[float] = field(default=None, metadata={
        "help": "FlowRL reward scale beta in log Z + log pi - beta r_hat - log pi_ref (paper: 15). Not TRL's `beta` "
                "(a KL coefficient, which must stay 0)."})
    flowrl_importance: Optional[str] = field(default=None, metadata={
        "help": "Importance weight of each sequence: 'sequence' (exp of the token-sum log-ratio, the paper), "
                "'sequence_mean' (GSPO's length-normalized ratio) or 'none' (w = 1)."})
    flowrl_clip: Optional[list[float]] = field(default=None, metadata={
        "help": "[lo, hi] clip of the importance weight; a negative bound means none ([-1, 10] = clamp(max=10))."})
    flowrl_empty: Optional[str] = field(default=None, metadata={
        "help": "An empty response (no completion token in the mask): 'zero' (weight 0, the paper) or 'logz' "
                "(weight 1, residual log Z: adds log Z^2, the authors' code)."})
    log_z_param_group: Optional[str] = field(default=None, metadata={
        "help": "'own': the log Z head in its own AdamW group (log_z_lr, no weight decay); 'policy': with the "
                "policy's learning_rate and weight_decay (the authors' code). Same schedule either way."})
    log_z_lr: Optional[float] = field(default=None, metadata={
        "help": "Learning rate of the log Z head when log_z_param_group='own' (weight decay 0, same schedule)."})
    log_z_dropout: Optional[float] = field(default=None, metadata={"help": "Dropout inside the log Z MLP."})
    log_z_include_last_prompt_token: Optional[bool] = field(default=None, metadata={
        "help": "Pool log Z over every prompt token; False drops the last one (the authors' code)."})
    log_z_detach_input: Optional[bool] = field(default=None, metadata={
        "help": "Stop log Z's gradient at the pooled hidden states (the authors let it reach the backbone)."})

    def __post_init__(self):
        if self.preset not in presets.PRESETS:
            raise ValueError(f"FlowRLConfig.preset={self.preset!r} is unknown; use one of {sorted(presets.PRESETS)} "
                             "(docs/flowrl.md).")
        for name, value in preset_values(self.preset).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.flowrl_clip = [float(c) for c in self.flowrl_clip]
        self.flowrl_algo()  # flowrl's own checks of beta / importance / clip (ValueError naming the field)
        if self.log_z_param_group not in ("own", "policy"):
            raise ValueError(f"FlowRLConfig.log_z_param_group={self.log_z_param_group!r}: use 'own' or 'policy'.")
        if not self.log_z_lr > 0:
            raise ValueError(f"FlowRLConfig.log_z_lr={self.log_z_lr} must be > 0.")
        if not 0.0 <= self.log_z_dropout < 1.0:
            raise ValueError(f"FlowRLConfig.log_z_dropout={self.log_z_dropout} must be in [0, 1).")
        super().__post_init__()  # (turns scale_rewards=True into "group" before the check below)
        for name, (ok, why) in _FIXED.items():
            value = getattr(self, name)
            if value != ok:
                raise ValueError(f"FlowRLConfig.{name}={value!r} is not supported: {why}. Leave it at {ok!r}.")
        if self.use_vllm and self.vllm_importance_sampling_correction:
            raise ValueError("FlowRLConfig(use_vllm=True) needs vllm_importance_sampling_correction=False: FlowRL's "
                             "clipped sequence weight (flowrl_importance / flowrl_clip) is its off-policy correction; "
                             "TRL's vLLM ratio would multiply a GRPO loss that is not computed.")
        if self.deepspeed is not None:
            raise ValueError("FlowRLTrainer does not support DeepSpeed: the engine builds its own optimizer and would "
                             "not train the log Z head. Use DDP or FSDP (accelerate launch --use_fsdp).")

    def flowrl_algo(self) -> Algo:
        """flowrl's algorithm config for these fields (its checks raise ConfigError, a ValueError)."""
        try:
            return Algo(name="flowrl", preset=self.preset, beta=float(self.flowrl_beta),
                        importance=self.flowrl_importance, clip=list(self.flowrl_clip), empty=self.flowrl_empty)
        except ValueError as e:
            msg = str(e)
            for a, b in (("algo.beta", "flowrl_beta"), ("algo.importance", "flowrl_importance"),
                         ("algo.clip", "flowrl_clip"), ("algo.empty", "flowrl_empty")):
                msg = msg.replace(a, b)
            raise ValueError(f"FlowRLConfig.{msg}") from None


class FlowRLTrainer(GRPOTrainer):
    """GRPOTrainer with FlowRL's objective (see the module docstring). Same constructor as GRPOTrainer;
    ``args`` must be a FlowRLConfig (None: a default one)."""

    _tag_names = ["trl", "flowrl"]
    _name = "FlowRL"

    def __init__(self, model, reward_funcs=None, args: Optional[FlowRLConfig] = None, *a, peft_config=None, **kw):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = FlowRLConfig(f"{str(name).split('/')[-1]}-FlowRL")
        if not isinstance(args, FlowRLConfig):
            raise ValueError(f"FlowRLTrainer needs args=FlowRLConfig(...), got {type(args).__name__}; FlowRLConfig "
                             "takes every GRPOConfig field plus FlowRL's (flowrl_beta, log_z_lr, ...).")
        fk_trl.patch()  # every log-prob through flowrl_kernels (fused lm_head, no [B, T, V] logits)
        if peft_config is None and is_peft_model(model):
            _add_reference_adapter(model)
        super().__init__(model, reward_funcs, args, *a, peft_config=peft_config, **kw)
        self.algo = args.flowrl_algo()
        # TRL computes reference log-probs in _generate_and_score_completions iff self.beta != 0; in this
        # trainer self.beta is FlowRL's beta (> 0), TRL's KL beta is args.beta == 0
        self.beta = float(args.flowrl_beta)
        unwrapped = self.model
        if is_peft_model(unwrapped):
            self.ref_model = None  # TRL's reference pass disables the adapters (or uses the "ref" adapter)
        else:
            self.ref_model = self._build_reference(unwrapped)
        hidden = unwrapped.config.get_text_config().hidden_size
        # identical init on every process (TRL has re-seeded each process differently by now)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            self.log_z = LogZHead(hidden, args.log_z_dropout).to(self.accelerator.device, torch.float32)
        self._flowrl_rewards = None
        # the Trainer zeroes the model's gradients after each optimizer step (model.zero_grad()), not the
        # optimizer's: without this the head's gradients would accumulate across steps
        self.add_callback(_ZeroGradAfterStep(self.log_z))

    # ------------------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------------------
    def _build_reference(self, policy):
        """A frozen copy of the initial policy, with the fused lm_head, placed like TRL places its own."""
        ref = copy.deepcopy(policy)
        ref.__dict__.pop("forward", None)  # the copy of the policy's fused forward; re-added below
        ref.eval().requires_grad_(False)
        add_fused_lm_head(ref, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
        if self.is_fsdp_enabled:
            return prepare_fsdp(ref, self.accelerator)
        return self.accelerator.prepare_model(ref, evaluation_mode=True)

    def create_optimizer(self, model=None):
        """TRL's optimizer for the policy, plus the log Z head as one more group: log_z_lr and no weight decay
        (log_z_param_group='own'), or the policy's learning_rate and weight_decay ('policy', as the authors'
        single AdamW group). The scheduler, built afterwards, scales every group alike."""
        opt = super().create_optimizer(model)
        if not any(p is q for g in opt.param_groups for p in g["params"] for q in self.log_z.parameters()):
            own = self.args.log_z_param_group == "own"
            opt.add_param_group({"params": list(self.log_z.parameters()),
                                 "lr": self.args.log_z_lr if own else self.args.learning_rate,
                                 "weight_decay": 0.0 if own else self.args.weight_decay})
        return opt

    # ------------------------------------------------------------------------------------------------
    # rewards -> r_hat
    # ------------------------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._flowrl_rewards = rewards_per_func  # [all processes' samples, n_funcs], gathered
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        G = self.num_generations if mode == "train" else self.num_generations_eval
        rpf, self._flowrl_rewards = self._flowrl_rewards, None
        # the weighted sum of the reward functions; a completion no function could score counts as 0
        rewards = (rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(dim=1)
        r_hat = flowrl_kernels.group_normalize(rewards.float(), G)
        n = out["prompt_ids"].size(0)
        i = self.accelerator.process_index
        out["advantages"] = r_hat[i * n:(i + 1) * n].to(out["prompt_ids"].device)
        return out

    # ------------------------------------------------------------------------------------------------
    # loss
    # ------------------------------------------------------------------------------------------------
    def _backbone(self, model):
        lm = self.accelerator.unwrap_model(model)
        if is_peft_model(lm):
            lm = lm.get_base_model()
        return lm.base_model  # HF: the decoder stack (getattr(lm, lm.base_model_prefix)), as TRL's fused forward

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, *args, **kwargs):
        """TRL's own log-prob pass (fused lm_head), with position ids that skip the left padding, as
        ``generate`` numbers the tokens it samples and as flowrl/ scores them: TRL passes none, so a
        left-padded row is scored at shifted positions (the same values under RoPE up to rounding, wrong
        for absolute position embeddings). Text-only models (multimodal ones have their own position ids)."""
        if self._is_vlm:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, *args, **kwargs)

        def add_position_ids(module, a, kw):
            if kw.get("position_ids") is None and kw.get("attention_mask") is not None:
                kw["position_ids"] = left_padded_position_ids(kw["attention_mask"])
            return a, kw

        hook = self._backbone(model).register_forward_pre_hook(add_position_ids, with_kwargs=True)
        try:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, *args, **kwargs)
        finally:
            hook.remove()

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]

        # the backbone's last hidden states feed log Z; captured from the same forward that gives the
        # log-probs (TRL's fused lm_head path), so log Z's gradient reaches the backbone as in flowrl/
        captured = []
        hook = self._backbone(model).register_forward_hook(lambda m, a, o: captured.append(o.last_hidden_state))
        try:
            logp, entropy, aux_loss = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
                compute_aux_loss=self.aux_loss_enabled,
                **{k: inputs.get(k) for k in ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
                                              "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids",
                                              "mm_token_type_ids", "image_position_ids")})
        finally:
            hook.remove()
        hidden = captured[0] if len(captured) == 1 else torch.cat(captured)
        mode = "train" if model.training else "eval"
        self.log_z.train(mode == "train")
        log_z = log_z_from_hidden(self.log_z, hidden, prompt_mask,
                                  include_last_token=self.args.log_z_include_last_prompt_token,
                                  detach_input=self.args.log_z_detach_input)

        old = inputs.get("old_per_token_logps")
        old = logp.detach() if old is None else old
        # each micro-batch's share of the mean over the optimizer step's sequences (TRL turns HF's own
        # loss scaling off: the gradient accumulation factor is ours to apply)
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1
        loss, st = algorithms.flowrl_objective({"logp": logp, "log_z": log_z}, old, inputs["ref_per_token_logps"],
                                               inputs["advantages"].float(), mask, self.algo,
                                               n_seq=logp.size(0) * accum)
        if aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss / accum
        st["r_hat_abs"] = inputs["advantages"].float().abs().mean()
        m = mask.float()
        local = torch.stack([(entropy.detach().float() * m).sum(), m.sum()]
                            + [v.detach().float().reshape(()) for v in st.values()])
        total = self.accelerator.gather(local[None]).sum(0) if self.accelerator.num_processes > 1 else local
        n_proc = self.accelerator.num_processes
        vals = total.tolist()  # one host read per micro-batch for every metric
        self._metrics[mode]["entropy"].append(vals[0] / max(vals[1], 1.0))
        for k, v in zip(st, vals[2:]):
            self._metrics[mode][f"flowrl/{k}"].append(v / n_proc)
        return loss

    # ------------------------------------------------------------------------------------------------
    # optimizer step: log Z's gradient averaged over processes, one global clip
    # ------------------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.num_processes > 1 and self.accelerator.sync_gradients:
            # the policy's gradients are averaged by DDP / FSDP; the head is outside the wrapped model
            grads = [p.grad for p in self.log_z.parameters() if p.grad is not None]
            if grads:
                flat = torch.cat([g.reshape(-1) for g in grads])
                torch.distributed.all_reduce(flat)
                flat /= self.accelerator.num_processes
                chunks = flat.split([g.numel() for g in grads])
                torch._foreach_copy_(grads, [c.view_as(g) for c, g in zip(chunks, grads)])
        return loss

    def _clip_grad_norm(self, model):
        """Clip policy + log Z to one global norm (flowrl/train.py's rule); returns it before clipping."""
        policy_norm = self.accelerator.clip_grad_norm_(model.parameters(), float("inf"))
        policy_norm = policy_norm.full_tensor() if hasattr(policy_norm, "full_tensor") else policy_norm
        z_grads = [p.grad for p in self.log_z.parameters() if p.grad is not None]
        z_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in z_grads])) \
            if z_grads else torch.zeros((), device=self.accelerator.device)
        total = torch.sqrt(policy_norm.float().to(z_norm.device) ** 2 + z_norm.float() ** 2)
        coef = min(1.0, self.args.max_grad_norm / (float(total) + 1e-6))  # torch.nn.utils.clip_grad_norm_'s rule
        if coef < 1.0:  # two calls: under FSDP2 the policy's gradients are DTensors, the head's plain tensors
            torch._foreach_mul_([p.grad for p in model.parameters() if p.grad is not None], coef)
            torch._foreach_mul_(z_grads, coef)
        return total

    # ------------------------------------------------------------------------------------------------
    # checkpoints: log Z travels with them (never with save_model's export)
    # ------------------------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            from safetensors.torch import save_file
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            save_file({k: v.detach().cpu().contiguous() for k, v in self.log_z.state_dict().items()},
                      os.path.join(folder, LOG_Z_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is not None:
            path = os.path.join(checkpoint, LOG_Z_FILE)
            if not os.path.isfile(path):
                raise ValueError(f"{checkpoint} has no {LOG_Z_FILE}: it was not written by FlowRLTrainer, so the "
                                 "log Z head cannot be restored; resume from a FlowRLTrainer checkpoint.")
            from safetensors.torch import load_file
            state = load_file(path, device=str(self.accelerator.device))
            self.log_z.load_state_dict(state)  # strict: a head of another size is an error naming the keys
        super()._load_optimizer_and_scheduler(checkpoint)


class _ZeroGradAfterStep(TrainerCallback):
    def __init__(self, module: torch.nn.Module):
        self.module = module

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.module.zero_grad(set_to_none=True)


def _add_reference_adapter(model) -> None:
    """A PeftModel passed with a trained adapter: a frozen copy of it, "ref", is the reference (TRL does the
    same when its KL beta > 0). A new adapter needs none: disabling it gives the initial policy."""
    if "ref" in model.peft_config:
        return
    model.add_adapter("ref", model.peft_config["default"])
    for name, param in model.named_parameters():
        if ".default." in name:
            model.get_parameter(name.replace(".default.", ".ref.")).data.copy_(param.data)
