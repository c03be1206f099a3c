"""Peak extra CPU memory of ONE trainer step (policy forward with entropy, FlowRL loss, backward, AdamW
step) with model.logprob_impl = "logits" vs "fused", at Qwen2.5's vocabulary V=151936.

Run: ``PYTHONPATH=. python bench/bench_trainer_logprob_memory.py [--batch 8 --prompt 32 --response 96]``

Model: a random tiny Qwen2 (2 layers, hidden 64, tied embeddings, vocab 151936) inside flowrl's
Policy with its log Z head; batch B=8 sequences of a 32-token prompt + 96-token response (768
response rows), float32, 1 thread.
  logits: lm_head on the 768 response rows -> [768, V] fp32 logits (467 MB), token_logprobs over them,
          autograd keeps them and their gradient.
  fused:  flowrl_kernels.hf.response_logprobs -> linear_token_logprobs (chunked torch path on CPU:
          64 MiB of logits at a time, never [N, V]).
Each impl runs in a fresh subprocess: one warm-up step (creates the AdamW state, the same for both),
then the Linux peak-RSS high-water mark is reset (``5 > /proc/self/clear_refs``) and the second step
is measured: peak VmHWM minus the RSS before the step. Same inputs, so the losses printed must agree.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r'''
import json, sys
import torch
torch.set_num_threads(1)
from flowrl import algorithms, config, model

impl, B, P, R, V, H = sys.argv[1], *map(int, sys.argv[2:7])

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

torch.manual_seed(0)
ids = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)
lm = model.tiny_lm("tiny-qwen2", V, 2, H, ids, "sdpa")
policy = model.Policy(lm, model.LogZHead(H, 0.0), logprob_impl=impl)
opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)
input_ids = torch.randint(3, V, (B, P + R))
attn = torch.ones(B, P + R, dtype=torch.long)
labels = input_ids[:, P:].clone()
mask = torch.ones(B, R, dtype=torch.bool)
r_hat = algorithms.normalized_rewards(torch.randint(0, 2, (B,)).float(), 4)
algo = config.Algo()

def step():
    out = policy(input_ids, attn, labels, P, temperature=1.0, entropy=True)
    old = out["logp"].detach()
    loss, _ = algorithms.objective(out, old, old - 0.1, r_hat, mask, algo, n_seq=B, n_tok=B * R)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)

step()
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
loss = step()
print(json.dumps({"impl": impl, "peak_extra_mb": (status("VmHWM") - before) / 2**20, "loss": loss,
                  "rss_before_mb": before / 2**20}))
'''


def measure(impl, batch, prompt, response, vocab, hidden):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _CHILD, impl, str(batch), str(prompt), str(response), str(vocab),
                          str(hidden)], env=env, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--response", type=int, default=96)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=64)
    a = ap.parse_args(argv)
    rows = [measure(impl, a.batch, a.prompt, a.response, a.vocab, a.hidden) for impl in ("logits", "fused")]
    n = a.batch * a.response
    print(f"one trainer step, B={a.batch} P={a.prompt} R={a.response} ({n} response rows), V={a.vocab}, H={a.hidden}, "
          f"fp32 CPU; one [N, V] fp32 tensor = {n * a.vocab * 4 / 2**20:.0f} MiB")
    for r in rows:
        print(f"  {r['impl']:>6}: peak extra {r['peak_extra_mb']:8.1f} MiB  (RSS before {r['rss_before_mb']:.0f} MiB, "
              f"loss {r['loss']:.6f})")
    print(f"  fused / logits = {rows[1]['peak_extra_mb'] / rows[0]['peak_extra_mb']:.3f}")
    return rows


if __name__ == "__main__":
    main()
