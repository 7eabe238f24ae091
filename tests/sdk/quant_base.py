"""The official `tinker` SDK (0.38.0), unchanged, against one `loraplex serve` that serves the
shipped SmolLM2 GGUF twice, as tests/quant_base.rs starts it: "smol-stored" with its matrices
kept as stored (Q4_1 layers, Q8_0 embeddings) and "smol-f32" expanded to f32. An adapter is
trained on each with the same data and seed: the losses fall, step by step as on f32; both
trained adapters then sample, and greedy decoding gives the same continuation. /metrics
reports each base's weight memory, the stored one at most its file's size.
Prints one line per check and exits non-zero on the first failure.
"""

import os
import re
import sys
import time
import urllib.request

import numpy as np
import tinker
from tinker import types

URL = os.environ["LORAPLEX_URL"]
FILE_BYTES = int(os.environ["LORAPLEX_FILE_BYTES"])
BASES = ["smol-stored", "smol-f32"]
T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def check(cond, msg):
    if not cond:
        print(f"FAIL: {msg}", flush=True)
        sys.exit(1)
    log(f"ok: {msg}")


def resolve(x):
    return x.result() if "Future" in type(x).__name__ else x


def main():
    sc = tinker.ServiceClient(base_url=URL, api_key="tml-quant")
    # A 12-token phrase three times over (ids from the vocabulary, no tokenizer download).
    tok_ids = [(i * 3571 + 211) % 49152 for i in range(12)] * 3
    curves, samples = {}, {}
    for base in BASES:
        tc = resolve(sc.create_lora_training_client(base_model=base, rank=8, seed=3))
        n = len(tok_ids) - 1
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(tok_ids[:-1]),
            loss_fn_inputs={
                "target_tokens": types.TensorData.from_numpy(np.array(tok_ids[1:], dtype=np.int64)),
                "weights": types.TensorData.from_numpy(np.ones(n, dtype=np.float32)),
            },
        )
        losses = []
        for _ in range(6):
            fb = tc.forward_backward([datum], "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=2e-3)).result()
            losses.append(fb.result().metrics["loss:sum"] / n)
        log(f"{base}: losses {[round(x, 4) for x in losses]}")
        check(losses[-1] < 0.8 * losses[0], f"{base}: loss falls {losses[0]:.3f} -> {losses[-1]:.3f}")
        curves[base] = losses
        sampler = resolve(tc.save_weights_and_get_sampling_client())
        greedy = types.SamplingParams(max_tokens=12, temperature=0.0, stop=[])
        out = sampler.sample(types.ModelInput.from_ints(tok_ids[:8]), 1, greedy).result()
        samples[base] = list(out.sequences[0].tokens)
        log(f"{base}: greedy {samples[base]}")
    a, b = curves["smol-stored"], curves["smol-f32"]
    worst = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    check(worst < 3e-3, f"the stored base's losses follow f32's step by step (worst relative gap {worst:.1e})")
    check(samples["smol-stored"] == samples["smol-f32"], "both trained adapters decode the same tokens")

    text = urllib.request.urlopen(f"{URL}/metrics").read().decode()
    mem = {}
    for line in text.splitlines():
        m = re.match(r'loraplex_base_model_weight_bytes\{base="([^"]+)"\} (\S+)', line)
        if m:
            mem[m.group(1)] = float(m.group(2))
    log(f"/metrics base weight bytes: {mem}, file {FILE_BYTES}")
    check(set(mem) == set(BASES), "/metrics reports memory per base")
    check(mem["smol-stored"] <= FILE_BYTES, "the stored base takes at most its file's size")
    check(mem["smol-f32"] > 4 * mem["smol-stored"], "f32 takes over 4x the stored base")


if __name__ == "__main__":
    main()
