"""The official `tinker` SDK (0.38.0), unchanged, against one `loraplex serve` that serves two
base models: "tiny-a" (64-token vocabulary) and "tiny-b" (48 tokens), as tests/multi_model.rs
starts it. The capabilities list both; an adapter is trained on each (its loss falls) and
sampled through the SDK's sampling client; a base model's own sampling client samples inside
its vocabulary; an unknown base is refused with an error that lists the served ones.
Prints one line per check and exits non-zero on the first failure.
"""

import os
import sys
import time

import numpy as np
import tinker
from tinker import types

URL = os.environ["LORAPLEX_URL"]
BASES = [("tiny-a", 64), ("tiny-b", 48)]
SEQ = [3, 17, 40, 5, 22, 9, 31, 12, 44, 7, 3, 17, 40, 5]
T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def check(cond, msg):
    if not cond:
        print(f"FAIL: {msg}", flush=True)
        sys.exit(1)
    log(f"ok: {msg}")


def resolve(x):
    """Some SDK calls hand back a future of the client; others the client itself."""
    return x.result() if "Future" in type(x).__name__ else x


def datum(tokens):
    n = len(tokens) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(np.array(tokens[1:], dtype=np.int64)),
            "weights": types.TensorData.from_numpy(np.ones(n, dtype=np.float32)),
        },
    )


def main():
    sc = tinker.ServiceClient(base_url=URL, api_key="tml-multi-model")
    caps = tinker.RestClient(base_url=URL, api_key="tml-multi-model").get_server_capabilities().result()
    names = [m.model_name for m in caps.supported_models]
    check(names == [b for b, _ in BASES], f"capabilities list both bases: {names}")

    greedy = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    for base, vocab in BASES:
        tc = resolve(sc.create_lora_training_client(base_model=base, rank=4, seed=0))
        info = tc.get_info()
        check(info.model_data.model_name == base, f"{base}: the run is on {info.model_data.model_name}")
        losses = []
        for _ in range(40):
            fb = tc.forward_backward([datum(SEQ)], "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=0.01)).result()
            losses.append(fb.result().metrics["loss:sum"])
        check(losses[-1] < 0.1 * losses[0], f"{base}: loss falls {losses[0]:.3f} -> {losses[-1]:.3f}")
        sampler = resolve(tc.save_weights_and_get_sampling_client())
        out = sampler.sample(types.ModelInput.from_ints(SEQ[:4]), 1, greedy).result()
        toks = list(out.sequences[0].tokens)
        check(len(toks) == 6 and all(0 <= t < vocab for t in toks), f"{base}: the adapter samples {toks}")
        # Trained on SEQ, the adapter continues it greedily.
        check(toks == SEQ[4:10], f"{base}: the trained adapter continues the sequence: {toks}")
        plain = resolve(sc.create_sampling_client(base_model=base))
        out = plain.sample(types.ModelInput.from_ints(SEQ[:4]), 1, greedy).result()
        check(list(out.sequences[0].tokens) != SEQ[4:10], f"{base}: the base alone does not continue it")
        out = plain.sample(types.ModelInput.from_ints([1, 2, 3]), 2,
                           types.SamplingParams(max_tokens=8, temperature=1.0, seed=5)).result()
        toks = [t for s in out.sequences for t in s.tokens]
        check(all(0 <= t < vocab for t in toks), f"{base}: its base samples inside its vocabulary")

    try:
        resolve(sc.create_lora_training_client(base_model="Qwen/Qwen3-8B", rank=4))
        check(False, "an unknown base is refused")
    except Exception as e:  # the SDK's BadRequestError
        msg = str(e)
        check("Qwen/Qwen3-8B" in msg and "tiny-a" in msg and "tiny-b" in msg,
              f"an unknown base is refused, listing the served ones: {msg[:200]}")
    log("all checks passed")


if __name__ == "__main__":
    main()
