"""Regenerate bench/RESULTS.md and its charts from pytest-benchmark JSON files.

    python -m bench.report                       # every bench/results/*.json -> bench/RESULTS.md + PNGs
    python -m bench.report run.json --compact    # a short table on stdout (what gpu.sh prints)

One section per JSON file (one run on one machine; GPU runs first): the machine, its measured
ceilings, date and commit, hand-written notes kept beside the JSON (``<name>.notes.md``: what the run
left out and why), then one table per op with every number (host-clocked median, p20-p80, GB/s, % of
the byte floor, TFLOP/s; on a GPU also the device time, the host overhead per call and the device %
of floor / matmul; peak memory, speed-up over the reference), the skipped providers with their
reasons, the cases the run planned but did not measure (GPU runs by bench/gpu.sh, which also records
each part's status), and a PNG: GB/s vs V per provider (logits op), peak memory vs N per provider,
TFLOP/s vs V (fused linear).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
from collections import OrderedDict, defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
OPS = ("token_logprobs", "linear_token_logprobs", "flowrl_loss", "train_step")
MODES = ("forward", "backward", "full")


def load(path):
    with open(path) as f:
        d = json.load(f)
    rows = []
    for b in d["benchmarks"]:
        e = dict(b.get("extra_info") or {})
        if "op" not in e:
            continue
        e.setdefault("median_ms", b["stats"]["median"] * 1e3)
        e["name"] = b["name"]
        rows.append(e)
    mi = d.get("machine_info", {}).get("flowrl_bench", {})
    ci = d.get("commit_info", {})
    return d, mi, ci, rows


def _fmt(x, nd=2):
    if x is None:
        return ""
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        return f"{x:.{nd}f}" if abs(x) >= 0.01 else f"{x:.2g}"
    return str(x)


def _mib(b):
    return None if b is None else b / 2**20


def _shape(e, run_dtype=None):
    dt = f" {e['dtype']}" if run_dtype and e.get("dtype") and e["dtype"] != run_dtype else ""
    return _shape0(e) + dt


def _shape0(e):
    if e["op"] == "flowrl_loss":
        return e["model"]
    if e["op"] == "linear_token_logprobs":
        return f"{e['model']} N={e['N']} H={e['H']} V={e['V']}"
    if e["op"] == "train_step":
        return e.get("model", "")
    return f"{e['model']} N={e['N']} V={e['V']}"


def _groups(rows, op):
    # the run's dtype = the most common one; other dtypes are named in the shape
    counts = defaultdict(int)
    for e in rows:
        counts[e.get("dtype")] += 1
    run_dtype = max(counts, key=counts.get) if counts else None
    g = OrderedDict()
    for e in rows:
        if e["op"] == op:
            g.setdefault((_shape(e, run_dtype), e.get("mode", "full")), []).append(e)
    order = {m: i for i, m in enumerate(MODES)}
    return sorted(g.items(), key=lambda kv: (kv[1][0].get("V", 0), kv[1][0].get("N", 0), order.get(kv[0][1], 9)))


def op_table(rows, op):
    """Markdown table: one row per (shape, mode, provider), fastest first inside each group."""
    lin = op == "linear_token_logprobs"
    dev = any(e.get("device_ms") is not None for e in rows if e["op"] == op)
    hdr = ["shape", "mode", "provider", "median ms", "p20-p80 ms"]
    if dev:
        hdr += ["device ms", "host overhead ms"]
    hdr += ["GB/s", "% floor"] + (["device % floor"] if dev else [])
    if lin:
        hdr += ["TFLOP/s", "% matmul"] + (["device % matmul"] if dev else [])
    ops = any(e.get("aten_ops") is not None for e in rows if e["op"] == op)
    if ops:
        hdr += ["ATen ops"]
    rss = any(e.get("peak_rss_bytes") is not None for e in rows if e["op"] == op)
    hdr += ["peak MiB"] + (["RSS MiB"] if rss else []) + ["x ref", "note"]
    out = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for (shape, mode), es in _groups(rows, op):
        ref = next((e["median_ms"] for e in es if e["provider"] == "reference"), None)
        first = True
        for e in sorted(es, key=lambda e: e["median_ms"]):
            cells = [shape if first else "", mode if first else "", e["provider"], _fmt(e["median_ms"], 3),
                     f"{_fmt(e.get('p20_ms'), 3)}-{_fmt(e.get('p80_ms'), 3)}"]
            if dev:
                cells += [_fmt(e.get("device_ms"), 3), _fmt(e.get("overhead_ms"), 3)]
            cells += [_fmt(e.get("GBps")), _fmt(e.get("pct_floor"), 1)]
            if dev:
                cells += [_fmt(e.get("device_pct_floor"), 1)]
            if lin:
                cells += [_fmt(e.get("TFLOPs"), 3), _fmt(e.get("pct_matmul"), 1)]
                if dev:
                    cells += [_fmt(e.get("device_pct_matmul"), 1)]
            if ops:
                cells += [_fmt(e.get("aten_ops"))]
            cells += [_fmt(_mib(e.get("peak_mem_bytes")), 1)]
            if rss:
                cells += [_fmt(_mib(e.get("peak_rss_bytes")), 1)]
            cells += [_fmt(ref / e["median_ms"]) if ref else "", e.get("note", "")]
            out.append("| " + " | ".join(cells) + " |")
            first = False
    return "\n".join(out)


def skipped_lines(mi, op):
    reasons = defaultdict(set)
    for test_id, reason in (mi.get("skipped") or {}).items():
        if not test_id.startswith(f"test_{op}["):
            continue
        # ids are [<shape>-<mode>-<provider>] (providers may hold '-', e.g. flash-attn)
        inner = test_id[test_id.index("[") + 1:-1]
        prov = next((inner.split(f"-{m}-", 1)[1] for m in MODES if f"-{m}-" in inner), inner)
        reasons[prov].add(reason)
    return [f"- {p}: {'; '.join(sorted(r))}" for p, r in sorted(reasons.items())]


def _case_key(test_id):
    """test_<op>[<shape>-<mode>-<provider>] -> (op, shape, mode, provider), or None."""
    if "[" not in test_id or not test_id.startswith("test_"):
        return None
    op = test_id[len("test_"):test_id.index("[")]
    inner = test_id[test_id.index("[") + 1:-1]
    for m in MODES + ("step",):
        if f"-{m}-" in inner:
            shape, prov = inner.split(f"-{m}-", 1)
            return op, shape, m, prov
    return op, inner, "", ""


def coverage_lines(mi, rows, op):
    """Cases the run planned (every id its bench files collected) but did not measure, grouped by
    (shape, mode): skipped with a reason, or never run (a part that ran out of time, or was left out)."""
    planned = [k for k in map(_case_key, mi.get("planned") or []) if k and k[0] == op]
    if not planned:
        return []
    done = {_case_key(e["name"]) for e in rows if e["op"] == op}
    skipped = {_case_key(t) for t in (mi.get("skipped") or {})}
    missing = OrderedDict()
    for k in planned:
        if k in done:
            continue
        missing.setdefault((k[1], k[2]), []).append(k[3] + (" (skipped)" if k in skipped else ""))
    n_done = sum(1 for k in planned if k in done)
    out = [f"Measured {n_done} of the {len(planned)} cases the run planned for {op}."]
    if missing:
        out += ["Not measured (by shape and mode; \"skipped\" has its reason above, the rest never ran):", ""]
        out += [f"- {shape} {mode}: {', '.join(provs)}" for (shape, mode), provs in missing.items()]
    return out


def parts_table(mi):
    """bench/gpu.sh's parts: what each ran, its time limit, how long it took, and how it ended."""
    parts = mi.get("parts") or []
    if not parts:
        return []
    out = [f"bench/gpu.sh parts (total budget {mi.get('total_budget_s', '?')} s):", "",
           "| part | filter | limit s | took s | status |", "|---|---|---|---|---|"]
    for p in parts:
        out.append(f"| {p.get('name')} | `{p.get('filter') or ''}` | {p.get('limit_s', '')} | {p.get('took_s', '')} | "
                   f"{p.get('status')} |")
    return out


# ----------------------------------------------------------------------------------------------------
# charts
# ----------------------------------------------------------------------------------------------------
def chart(rows, mi, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    dt = mi.get("dtype")
    tlp = [e for e in rows if e["op"] == "token_logprobs" and (not dt or e.get("dtype") == dt)]
    lin = [e for e in rows if e["op"] == "linear_token_logprobs" and (not dt or e.get("dtype") == dt)]
    provs = sorted({e["provider"] for e in tlp + lin})
    # one color per implementation, dashed when it also returns the entropy ("+H")
    bases = sorted({p.removesuffix("+H") for p in provs})
    cmap = plt.get_cmap("tab10")
    color = {p: cmap(bases.index(p.removesuffix("+H")) % 10) for p in provs}

    def lines(ax, es, x, y, xlabel, ylabel, title, logx=False, logy=False, hline=None):
        by = defaultdict(list)
        for e in es:
            if e.get(y) is not None:
                by[e["provider"]].append((e[x], e[y]))
        for p, pts in sorted(by.items()):
            pts.sort()
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=p, color=color.get(p),
                    ls="--" if p.endswith("+H") else "-")
        if hline:
            ax.axhline(hline[0], ls="--", color="k", lw=1)
            ax.text(ax.get_xlim()[0], hline[0], " " + hline[1], va="bottom", fontsize=8)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        if logx:
            ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if by:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", transform=ax.transAxes)

    # GB/s vs V at the common N (the one every model ran at)
    ns = defaultdict(set)
    for e in tlp:
        ns[e["N"]].add(e["model"])
    n0 = max(ns, key=lambda n: (len(ns[n]), n)) if ns else None
    bw = mi.get("copy_GBps")
    for ax, mode in zip(axes[0], MODES):
        es = [e for e in tlp if e["N"] == n0 and e["mode"] == mode]
        lines(ax, es, "V", "GBps", "vocab V", "GB/s (byte floor / time)", f"token_logprobs {mode}, N={n0}",
              hline=(bw, f"copy {_fmt(bw)} GB/s") if bw else None)
    # peak memory vs N (full mode, the swept model)
    for ax, es, title in ((axes[1][0], tlp, "token_logprobs"), (axes[1][1], lin, "linear_token_logprobs")):
        full = [e for e in es if e["mode"] == "full"]
        models = defaultdict(set)
        for e in full:
            models[e["model"]].add(e["N"])
        m = max(models, key=lambda k: len(models[k])) if models else None
        sel = [dict(e, peak_MiB=e["peak_mem_bytes"] / 2**20) for e in full if e["model"] == m]
        lines(ax, sel, "N", "peak_MiB", "tokens N", "peak MiB above inputs", f"{title} full, {m}",
              logx=True, logy=True)
    # fused linear TFLOP/s vs V (full)
    nl = defaultdict(set)
    for e in lin:
        nl[e["N"]].add(e["model"])
    n1 = max(nl, key=lambda n: (len(nl[n]), n)) if nl else None
    mm = mi.get("matmul_TFLOPs")
    lines(axes[1][2], [e for e in lin if e["N"] == n1 and e["mode"] == "full"], "V", "TFLOPs", "vocab V",
          "TFLOP/s (8NHV / time)", f"linear_token_logprobs full, N={n1}",
          hline=(mm, f"{mi.get('matmul_dtype', '')} matmul {_fmt(mm, 3)} TFLOP/s") if mm else None)
    fig.suptitle(f"{mi.get('device', '?')} ({mi.get('dtype', '?')}), {mi.get('date', '?')}, commit {mi.get('commit', '?')}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
def section(path, png_dir, rel_to):
    d, mi, ci, rows = load(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    dirty = " (uncommitted changes)" if ci.get("dirty") or mi.get("dirty") else ""
    lines = [f"## {mi.get('device', '?')} — {mi.get('device_type', '?')}, {mi.get('dtype', '?')}", "",
             f"- run: {mi.get('date') or d.get('datetime')}, commit `{(mi.get('commit') or ci.get('id') or '?')[:10]}`"
             f"{dirty}, file `{os.path.relpath(path, rel_to)}`",
             f"- software: torch {mi.get('torch')}, triton {mi.get('triton')}; {mi.get('torch_threads')} torch "
             f"threads on {mi.get('cpu_count')} CPUs",
             f"- measured ceilings: copy {_fmt(mi.get('copy_GBps'))} GB/s (read + write), "
             f"{mi.get('matmul_dtype', '')} matmul {_fmt(mi.get('matmul_TFLOPs'), 3)} TFLOP/s"]
    if mi.get("threads_note"):
        lines.append(f"- threads: {mi['threads_note']}")
    if mi.get("device_type") == "cpu" and mi.get("loadavg_start"):
        lines.append(f"- load average at start / end: {mi['loadavg_start'][0]:.1f} / {mi['loadavg_end'][0]:.1f} "
                     "(a shared machine: timings are pessimistic and noisy; medians are the number to read)")
    notes = os.path.splitext(path)[0] + ".notes.md"
    if os.path.exists(notes):
        with open(notes) as f:
            lines += ["", f.read().strip()]
    pt = parts_table(mi)
    if pt:
        lines += [""] + pt
    if png_dir:
        png = os.path.join(png_dir, f"{stem}.png")
        chart(rows, mi, png)
        lines += ["", f"![{stem}]({os.path.relpath(png, rel_to)})"]
    for op in OPS:
        if not any(e["op"] == op for e in rows):
            continue
        lines += ["", f"### {op}", "", op_table(rows, op)]
        sk = skipped_lines(mi, op)
        if sk:
            lines += ["", "Skipped here:"] + sk
        cov = coverage_lines(mi, rows, op)
        if cov:
            lines += [""] + cov
    return "\n".join(lines)


HEADER = """# Benchmark results

Generated by `python -m bench.report` from the pytest-benchmark JSON files in `bench/results/`
(`make bench` on a CPU machine, `bench/gpu.sh` on a lent GPU). Every number below comes from those
files; nothing is typed in by hand. Observations that explain some of them (TRL's CPU backward,
huge pages for the native backward, launch counts of the loss) are in [NOTES.md](NOTES.md).

How to read it (details in bench/common.py and each bench file's docstring):
- median and p20-p80 over the timed rounds (one call per round, device synchronized).
- GB/s = the op's byte floor / median time. Byte floor: token_logprobs forward N*V*s (logits read
  once), backward 2*N*V*s (read + write grad_logits), full 3*N*V*s; flowrl_loss 13 / 5 / 18 bytes per
  token; fused linear: hidden + weight read (+ dH, dW written). % floor = (floor bytes / measured copy
  bandwidth) / time: 100% is the speed of a plain copy of the same bytes.
- TFLOP/s (fused linear) = 2NHV forward, 6NHV backward, 8NHV full, the same count for every provider,
  so it compares times; % matmul is against the measured matmul rate of the card.
- peak MiB: the most memory the call had allocated above what was live before it (its inputs; for
  backward mode, the saved forward state too). GPU: torch.cuda.max_memory_allocated. CPU: the torch
  profiler's allocator events (exact, not sampled; counts memory allocated through torch). RSS MiB
  (CPU): Linux's peak-RSS high-water mark of the same call, reset just before it (counts scratch
  outside torch too, but misses memory glibc reuses from its heap, so small values can read ~0).
- x ref: speed-up over `flowrl_kernels.reference` at the same shape and mode.
- Peers that compute a loss (Liger, flash-attn, CCE) run with reduction="none" and return -logp only:
  no entropy, so they do less work than the "+H" providers. Liger and CCE compute gradients during
  the forward, so their "backward" rows are cheap by construction: compare "full".
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", help="pytest-benchmark JSON files (default: bench/results/*.json)")
    ap.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--png-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--compact", action="store_true", help="print a short table to stdout and exit")
    ap.add_argument("--merge", metavar="OUT_JSON", help="merge the given JSON files (parts of one run) into one")
    ap.add_argument("--parts", metavar="JSONL", help="with --merge: bench/gpu.sh's part log (one JSON object per "
                    "line: name, filter, limit_s, took_s, status; a first line may hold total_budget_s)")
    a = ap.parse_args(argv)
    if a.merge:
        merge(a.files, a.merge, parts=a.parts)
        return
    # GPU runs first (the library's home), newest first within each kind
    files = a.files or sorted(sorted(glob.glob(os.path.join(HERE, "results", "*.json")), reverse=True),
                              key=lambda f: not os.path.basename(f).startswith("gpu-"))
    if not files:
        raise SystemExit("no JSON files given and none in bench/results/")
    if a.compact:
        for f in files:
            print(compact(f))
        return
    os.makedirs(a.png_dir, exist_ok=True)
    rel_to = os.path.dirname(os.path.abspath(a.out))
    body = [HEADER] + [section(f, a.png_dir, rel_to) for f in files]
    with open(a.out, "w") as f:
        f.write("\n\n".join(body) + "\n")
    print(f"wrote {a.out} ({len(files)} run(s))")


def merge(files, out, parts=None):
    """Concatenate the benchmarks of several JSON files of one run (gpu.sh runs one file per op);
    machine_info comes from the first, skip reasons, planned cases and load averages are unioned /
    widened; ``parts`` (gpu.sh's part log) goes into machine_info."""
    merged = None
    for f in files:
        with open(f) as fh:
            d = json.load(fh)
        if merged is None:
            merged = d
            continue
        merged["benchmarks"] += d["benchmarks"]
        a = merged["machine_info"].setdefault("flowrl_bench", {})
        b = d.get("machine_info", {}).get("flowrl_bench", {})
        a.setdefault("skipped", {}).update(b.get("skipped") or {})
        a["planned"] = sorted(set(a.get("planned") or []) | set(b.get("planned") or []))
        if b.get("loadavg_end"):
            a["loadavg_end"] = b["loadavg_end"]
    if parts:
        a = merged["machine_info"].setdefault("flowrl_bench", {})
        with open(parts) as fh:
            recs = [json.loads(ln) for ln in fh if ln.strip()]
        for r in recs:
            if "total_budget_s" in r:
                a["total_budget_s"] = r["total_budget_s"]
        a["parts"] = [r for r in recs if "name" in r]
    with open(out, "w") as fh:
        json.dump(merged, fh, indent=1)


def compact(path):
    """A terse fixed-width table: one line per case, grouped by op / shape / mode."""
    _, mi, ci, rows = load(path)
    out = [f"# {mi.get('device')} {mi.get('dtype')}  copy {_fmt(mi.get('copy_GBps'))} GB/s  "
           f"matmul {_fmt(mi.get('matmul_TFLOPs'), 3)} TFLOP/s  commit {(mi.get('commit') or ci.get('id') or '?')[:8]}",
           f"{'op':<22}{'shape':<40}{'mode':<9}{'provider':<13}{'ms':>9}{'p20':>9}{'p80':>9}{'dev ms':>9}"
           f"{'GB/s':>9}{'%fl':>7}{'dev%fl':>7}{'TF/s':>8}{'MiB':>9}{'xref':>7}"]
    for op in OPS:
        for (shape, mode), es in _groups(rows, op):
            ref = next((e["median_ms"] for e in es if e["provider"] == "reference"), None)
            for e in sorted(es, key=lambda e: e["median_ms"]):
                out.append(f"{op[:21]:<22}{shape[:39]:<40}{mode:<9}{e['provider'][:12]:<13}"
                           f"{e['median_ms']:>9.3f}{e.get('p20_ms', 0):>9.3f}{e.get('p80_ms', 0):>9.3f}"
                           f"{_fmt(e.get('device_ms'), 3):>9}"
                           f"{_fmt(e.get('GBps'), 1):>9}{_fmt(e.get('pct_floor'), 0):>7}"
                           f"{_fmt(e.get('device_pct_floor'), 0):>7}"
                           f"{_fmt(e.get('TFLOPs'), 1):>8}{_fmt(_mib(e.get('peak_mem_bytes')), 0):>9}"
                           f"{(_fmt(ref / e['median_ms']) if ref else ''):>7}")
    sk = mi.get("skipped") or {}
    if sk:
        out.append(f"skipped {len(sk)} cases; reasons:")
        for r in sorted(set(sk.values())):
            out.append(f"  - {r[:160]}")
    return "\n".join(out)


if __name__ == "__main__":
    main()
