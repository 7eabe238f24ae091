#!/usr/bin/env python3
"""Reference decode-speed benchmark: llama.cpp (via llama-cpp-python) on our GGUF model.

What it measures
    Greedy token-generation throughput of llama.cpp on the CPU. The model is
    loaded once; each round clears the KV cache, tokenizes a fixed chat prompt
    ("Write a short story about a robot who learns to paint." through the
    model's chat template), prefills it for every sequence (untimed), then runs
    exactly --tokens decode steps. Each step is ONE llama_decode call that
    advances all --batch sequences by one token (llama_batch with one token per
    seq_id), followed by argmax over each sequence's logits (greedy, no
    sampling; EOS is ignored and decoding keeps going). Only that decode loop
    is timed. tok/s counts the tokens of all sequences: batch*tokens/seconds.

    Output is one JSON line:
      {"engine":"llama.cpp","version":...,"threads":...,"batch":...,
       "tokens":...,"decode_tok_s_median":...,"rounds":[tok/s per round],
       "ms_per_step_median":..., ...}
    "mode" is "batched" (one llama_decode per step for all sequences) or,
    only if the batched decode is refused by the installed llama.cpp,
    "sequential-fallback" (the N sequences decoded one after another; a
    "note" field says so).

    With --tensor-types it instead prints the GGUF tensor types of the model
    (name -> ggml type, plus a summary grouping the per-layer tensors).

How to run
    It needs the optional venv with llama-cpp-python (built from source, CPU,
    native flags) and gguf:
        python3 -m venv /root/.cache/loraplex/venv-llama
        /root/.cache/loraplex/venv-llama/bin/pip install llama-cpp-python gguf
    then, from the repository root:
        /root/.cache/loraplex/venv-llama/bin/python scripts/bench-llamacpp.py \\
            --threads 2 --tokens 128 --rounds 5 --batch 1
        /root/.cache/loraplex/venv-llama/bin/python scripts/bench-llamacpp.py --batch 8
        /root/.cache/loraplex/venv-llama/bin/python scripts/bench-llamacpp.py --tensor-types
    --verbose shows llama.cpp's own log; --show-text prints the generated text
    of sequence 0 to stderr (a sanity check that the greedy decode is sane).

    Measure on an otherwise idle machine. With --threads equal to the core
    count and other processes competing for the cores, llama.cpp's OpenMP
    threads spin at barriers and throughput collapses (seen: 1.4 tok/s instead
    of ~60); OMP_WAIT_POLICY=passive in the environment avoids that collapse
    under load, at some cost on an idle machine.
"""

import argparse
import ctypes
import json
import re
import statistics
import sys
import time

PROMPT = "Write a short story about a robot who learns to paint."
DEFAULT_MODEL = "models/SmolLM2-135M-Instruct.Q4_1.gguf"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128, help="decode steps per sequence")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=1, help="independent sequences decoded at once")
    p.add_argument("--tensor-types", action="store_true",
                   help="print the GGUF tensor types of --model and exit")
    p.add_argument("--show-text", action="store_true",
                   help="print sequence 0's generated text (last round) to stderr")
    p.add_argument("--verbose", action="store_true", help="keep llama.cpp's log on stderr")
    a = p.parse_args()
    for k in ("threads", "tokens", "rounds", "batch"):
        if getattr(a, k) < 1:
            p.error(f"--{k} must be >= 1")
    return a


# --------------------------------------------------------------------------- tensor types

def tensor_types(path):
    try:
        from gguf import GGUFReader
    except ImportError:
        sys.exit("--tensor-types needs the `gguf` package (pip install gguf in the same venv)")
    r = GGUFReader(path)
    rows = []
    for t in r.tensors:
        rows.append((t.name, t.tensor_type.name, [int(x) for x in t.shape]))
    print(f"# {path}: {len(rows)} tensors")
    for name, ty, shape in rows:
        print(f"{name}\t{ty}\t{shape}")
    # Summary: blk.N.<rest> grouped by <rest>, listing which layers have which type.
    groups = {}
    order = []
    for name, ty, _ in rows:
        m = re.match(r"blk\.(\d+)\.(.*)", name)
        key, layer = (m.group(2), int(m.group(1))) if m else (name, None)
        if key not in groups:
            groups[key] = {}
            order.append(key)
        groups[key].setdefault(ty, []).append(layer)
    print("# summary (per-layer tensors grouped; layers listed as ranges)")
    for key in order:
        parts = []
        for ty, layers in groups[key].items():
            if layers == [None]:
                parts.append(ty)
            else:
                parts.append(f"{ty} (layers {_ranges(sorted(layers))})")
        prefix = "" if groups[key].get(next(iter(groups[key]))) == [None] else "blk.*."
        print(f"{prefix}{key}\t{'; '.join(parts)}")
    has_output = any(n == "output.weight" for n, _, _ in rows)
    print(f"# output.weight present: {has_output}"
          + ("" if has_output else " (tied to token_embd.weight)"))


def _ranges(xs):
    out, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ",".join(out)


# --------------------------------------------------------------------------- benchmark

def main():
    a = parse_args()
    if a.tensor_types:
        tensor_types(a.model)
        return

    import numpy as np
    import llama_cpp as L

    if not a.verbose:
        # Keep the reference alive for the life of the process.
        global _log_cb
        _log_cb = L.llama_log_callback(lambda level, text, user: None)
        L.llama_log_set(_log_cb, ctypes.c_void_p(0))

    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = L.llama_model_load_from_file(a.model.encode(), mparams)
    if not model:
        sys.exit(f"failed to load model {a.model}")
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)

    prompt_text = chat_prompt(L, model, PROMPT)
    prompt = tokenize(L, vocab, prompt_text)
    n_prompt = len(prompt)

    N = a.batch
    per_seq = n_prompt + a.tokens + 8
    cparams = L.llama_context_default_params()
    cparams.n_ctx = N * ((per_seq + 255) // 256 * 256)
    cparams.n_batch = max(512, N * n_prompt)
    cparams.n_ubatch = cparams.n_batch
    cparams.n_seq_max = N
    cparams.n_threads = a.threads
    cparams.n_threads_batch = a.threads
    ctx = L.llama_init_from_model(model, cparams)
    if not ctx:
        sys.exit("failed to create llama.cpp context")
    mem = L.llama_get_memory(ctx)

    batch = L.llama_batch_init(max(cparams.n_batch, N), 0, N)

    def fill(entries):
        """entries: list of (token, pos, seq_id, want_logits)."""
        batch.n_tokens = len(entries)
        for i, (tok, pos, seq, out) in enumerate(entries):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = 1 if out else 0

    def argmax(i):
        ptr = L.llama_get_logits_ith(ctx, i)
        return int(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).argmax())

    def prefill(seqs):
        """Untimed: prompt for each seq in `seqs`; returns first generated token per seq."""
        entries, last = [], {}
        for s in seqs:
            for p, tok in enumerate(prompt):
                entries.append((tok, p, s, p == n_prompt - 1))
            last[s] = len(entries) - 1
        fill(entries)
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"prefill llama_decode returned {rc}")
        return {s: argmax(last[s]) for s in seqs}

    def decode_batched():
        L.llama_memory_clear(mem, True)
        first = prefill(list(range(N)))
        cur = [first[s] for s in range(N)]
        gen = [[c] for c in cur]
        t0 = time.perf_counter()
        for step in range(a.tokens):
            pos = n_prompt + step
            fill([(cur[s], pos, s, True) for s in range(N)])
            rc = L.llama_decode(ctx, batch)          # one call per step, all N seqs
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} at step {step}")
            cur = [argmax(s) for s in range(N)]
            for s in range(N):
                gen[s].append(cur[s])
        dt = time.perf_counter() - t0
        return dt, gen

    def decode_sequential():
        total, gen = 0.0, []
        for s in range(N):
            L.llama_memory_clear(mem, True)
            cur = prefill([0])[0]
            g = [cur]
            t0 = time.perf_counter()
            for step in range(a.tokens):
                fill([(cur, n_prompt + step, 0, True)])
                rc = L.llama_decode(ctx, batch)
                if rc != 0:
                    raise RuntimeError(f"llama_decode returned {rc} at step {step}")
                cur = argmax(0)
                g.append(cur)
            total += time.perf_counter() - t0
            gen.append(g)
        return total, gen

    mode, note, run = "batched", None, decode_batched
    rates, steps_ms, gen = [], [], None
    for r in range(a.rounds):
        try:
            dt, gen = run()
        except RuntimeError as e:
            if mode == "batched" and N > 1:
                mode = "sequential-fallback"
                note = (f"batched decode failed ({e}); the {N} sequences are decoded "
                        "one after another instead (one llama_decode per token)")
                run = decode_sequential
                rates, steps_ms = [], []
                dt, gen = run()
            else:
                raise
        n_steps = a.tokens if mode == "batched" else a.tokens * N
        rates.append(N * a.tokens / dt)
        steps_ms.append(dt / n_steps * 1000.0)

    if a.show_text:
        text = b"".join(piece(L, vocab, t) for t in gen[0]).decode("utf-8", "replace")
        print(f"--- prompt ({n_prompt} tokens) ---\n{prompt_text}\n--- seq 0 greedy output ---\n"
              f"{text}\n---", file=sys.stderr)

    out = {
        "engine": "llama.cpp",
        "version": L.__version__,
        "threads": a.threads,
        "batch": N,
        "tokens": a.tokens,
        "decode_tok_s_median": round(statistics.median(rates), 2),
        "rounds": [round(x, 2) for x in rates],
        "ms_per_step_median": round(statistics.median(steps_ms), 3),
        "mode": mode,
        "prompt_tokens": n_prompt,
        "seqs_identical": all(g == gen[0] for g in gen),
        "model": a.model,
    }
    if note:
        out["note"] = note
    print(json.dumps(out), flush=True)

    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    L.llama_backend_free()


def chat_prompt(L, model, user):
    tmpl = L.llama_model_chat_template(model, None)
    if tmpl:
        msg = (L.llama_chat_message * 1)()
        msg[0].role = b"user"
        msg[0].content = user.encode()
        buf = ctypes.create_string_buffer(8192)
        n = L.llama_chat_apply_template(tmpl, msg, 1, True, buf, len(buf))
        if 0 < n <= len(buf):
            return buf.raw[:n].decode()
    # ChatML fallback (SmolLM2's format).
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def tokenize(L, vocab, text):
    raw = text.encode()
    cap = len(raw) + 16
    arr = (L.llama_token * cap)()
    n = L.llama_tokenize(vocab, raw, len(raw), arr, cap, True, True)
    if n < 0:
        sys.exit("tokenize failed")
    return list(arr[:n])


def piece(L, vocab, tok):
    buf = ctypes.create_string_buffer(64)
    n = L.llama_token_to_piece(vocab, tok, buf, len(buf), 0, False)
    return buf.raw[:max(n, 0)]


if __name__ == "__main__":
    main()
