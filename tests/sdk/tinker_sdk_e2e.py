"""End-to-end test: the official `tinker` SDK (0.38.0), unchanged, against `loraplex serve`.

Run by `tests/sdk_e2e.rs`, which starts the server on SmolLM2 and passes its URL in
LORAPLEX_URL. Token ids are passed directly (no tokenizer download). Prints one line per
check and exits non-zero on the first failure. forward_backward_custom needs torch on the
client: it runs when torch is importable and is reported as skipped otherwise.
"""

import math
import os
import sys
import time

import numpy as np
import tinker
from tinker import types

URL = os.environ["LORAPLEX_URL"]
MODEL = os.environ.get("LORAPLEX_MODEL_NAME", "HuggingFaceTB/SmolLM2-135M-Instruct")
VOCAB = 49152
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


# A fixed, memorisable token sequence (ids of SmolLM2's vocabulary).
SEQ = [504, 2365, 314, 260, 1345, 28, 2365, 314, 260, 6152, 30, 378, 2365, 314, 1345, 30]


def datum(tokens, **extra):
    n = len(tokens) - 1
    inputs = {"target_tokens": types.TensorData.from_numpy(np.array(tokens[1:], dtype=np.int64))}
    for k, v in extra.items():
        inputs[k] = types.TensorData.from_numpy(np.asarray(v, dtype=np.float32))
    if "weights" not in extra:
        inputs["weights"] = types.TensorData.from_numpy(np.ones(n, dtype=np.float32))
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def with_sampled_provenance(d, prompt_length, num_sampled, sequence_id):
    """tinker-cookbook 0.6.1's recipes/rl_loop.py: name the sampled sequence behind every
    position of the datum (the prompt, then the sampled tokens)."""
    return d.with_provenance(
        model_input=[
            types.PromptProvenanceSpan(sequence_id=sequence_id, length=prompt_length),
            types.SampledProvenanceSpan(sequence_id=sequence_id, length=num_sampled - 1),
        ],
        loss_fn_inputs=[
            types.PromptProvenanceSpan(sequence_id=sequence_id, offset=1, length=prompt_length - 1),
            types.SampledProvenanceSpan(sequence_id=sequence_id, length=num_sampled),
        ],
    )


def rl_datums(prompt, response, advantages, loss_fn):
    """The cookbook's RL datums (recipes/rl_loop.py) for one group of samples."""
    out = []
    ob_len = len(prompt) - 1
    for seq, adv in zip(response.sequences, advantages):
        toks, lps = seq.tokens, seq.logprobs
        n = ob_len + len(toks)
        inputs = {
            "target_tokens": types.TensorData.from_numpy(np.array(prompt[1:] + toks, dtype=np.int64)),
            "logprobs": types.TensorData.from_numpy(np.array([0.0] * ob_len + lps, dtype=np.float32)),
            "advantages": types.TensorData.from_numpy(np.array([0.0] * ob_len + [adv] * len(toks), dtype=np.float32)),
        }
        if loss_fn == "gspo":
            inputs["sequence_ratio_mask"] = types.TensorData.from_numpy(
                np.array([0.0] * ob_len + [1.0] * len(toks), dtype=np.float32))
        d = types.Datum(model_input=types.ModelInput.from_ints(prompt + toks[:-1]), loss_fn_inputs=inputs)
        assert d.model_input.length == n
        if loss_fn == "stable_reinforce":
            d = with_sampled_provenance(d, len(prompt), len(toks), seq.sequence_id)
        out.append(d)
    return out


def stable_reinforce_and_gspo(tc):
    """The cookbook's RL step with its default loss: sample with record_stability_info,
    attach provenance, train with stable_reinforce; and gspo with a sequence_ratio_mask."""
    srl = resolve(tc.save_weights_and_get_sampling_client(record_stability_info=True))
    prompt = SEQ[:6]
    params = types.SamplingParams(max_tokens=6, temperature=1.0, seed=7, stop=[])
    res = srl.sample(prompt=types.ModelInput.from_ints(prompt), num_samples=4, sampling_params=params).result()
    ids = [s.sequence_id for s in res.sequences]
    check(len(set(ids)) == 4 and all(ids), f"each sampled sequence has its own sequence_id: {ids}")
    advantages = [1.0, -0.5, 0.25, 0.75]
    n_sampled = sum(len(s.tokens) for s in res.sequences)
    want = -sum(a * len(s.tokens) for a, s in zip(advantages, res.sequences))

    data = rl_datums(prompt, res, advantages, "stable_reinforce")
    out = tc.forward_backward(data, "stable_reinforce").result()
    m = out.metrics
    log(f"stable_reinforce on-policy metrics: {m}")
    check(math.isfinite(m["loss:sum"]) and m["sampled_tokens:sum"] == n_sampled,
          f"stable_reinforce: loss:sum = {m['loss:sum']:.4f} over {n_sampled} sampled tokens")
    check(abs(m["importance_ratio:max"] - 1.0) < 1e-2 and abs(m["loss:sum"] - want) < 5e-2,
          f"stable_reinforce on the sampler's own weights: ratio ~1, loss ~ -sum(A) = {want}")
    lp = out.loss_fn_outputs[0]["logprobs"].to_numpy()[len(prompt) - 1:]
    diff = float(np.max(np.abs(lp - np.array(res.sequences[0].logprobs))))
    check(diff < 5e-3, f"trainer logprobs of the sampled tokens match the sampler's (max diff {diff:.1e})")

    g = rl_datums(prompt, res, advantages, "gspo")
    out = tc.forward_backward(g, "gspo").result()
    m = out.metrics
    log(f"gspo metrics: {m}")
    check(math.isfinite(m["loss:sum"]) and abs(m["sequence_ratio:max"] - 1.0) < 1e-2,
          f"gspo: loss:sum = {m['loss:sum']:.4f}, sequence ratio ~1")
    tc.optim_step(types.AdamParams(learning_rate=5e-3)).result()

    # The same samples again after a step (as async RL trains on stale samples): the
    # record is used again, the ratios move off 1, the loss stays finite.
    out = tc.forward_backward(data, "stable_reinforce", loss_fn_config={"kl_coeff": 0.1, "max_ratio": 1.5}).result()
    m = out.metrics
    log(f"stable_reinforce one step off-policy: {m}")
    check(math.isfinite(m["loss:sum"]) and m["kl_sample_train:sum"] > 0,
          f"stable_reinforce off-policy: loss:sum = {m['loss:sum']:.4f}, kl = {m['kl_sample_train:sum']:.2e}")
    tc.optim_step(types.AdamParams(learning_rate=1e-5)).result()

    # A span naming a sequence this session never recorded fails as a user error.
    plain = rl_datums(prompt, res, advantages, "importance_sampling")[0]
    bad = with_sampled_provenance(plain, len(prompt), len(res.sequences[0].tokens), "no-such-sequence")
    try:
        tc.forward_backward([bad], "stable_reinforce").result()
        check(False, "an unknown sequence_id must fail")
    except tinker.RequestFailedError as e:
        check("no-such-sequence" in str(e) and e.category == "user",
              f"unknown sequence_id refused as a user error: {str(e)[:90]}...")


def prompt_extras(scl):
    """Top-k prompt logprobs, prompt_logprobs_last_n, target_prompt_logprobs (dense and
    sparse), prompt_alt_tokens_k and prefix-cache hits, read through the SDK's own types."""
    P = SEQ[:12]
    rows = len(P) - 1
    pin = types.ModelInput.from_ints(P)
    one = types.SamplingParams(max_tokens=1, temperature=0.0, stop=[])
    full = scl.sample(prompt=pin, num_samples=1, sampling_params=one,
                      include_prompt_logprobs=True, topk_prompt_logprobs=3).result()
    plp, tk = full.prompt_logprobs, full.topk_prompt_logprobs
    check(tk is not None and tk[0] is None and all(r is not None and len(r) == 3 for r in tk[1:]),
          "topk_prompt_logprobs[0] is None (the SDK's -99999 sentinel), other rows hold 3")
    check(all(tk[i][0][1] >= plp[i] - 1e-5 for i in range(1, len(P)))
          and all(abs(dict(tk[i]).get(P[i], plp[i]) - plp[i]) < 1e-4 for i in range(1, len(P))),
          "top-k prompt logprobs agree with the prompt logprobs")

    last = scl.sample(prompt=pin, num_samples=1, sampling_params=one, include_prompt_logprobs=True,
                      topk_prompt_logprobs=3, prompt_logprobs_last_n=4).result()
    check(all(x is None for x in last.prompt_logprobs[:-4])
          and max(abs(a - b) for a, b in zip(last.prompt_logprobs[-4:], plp[-4:])) < 1e-3,
          "prompt_logprobs_last_n=4: only the last 4 are scored, as in the full request")
    check(all(r is None for r in last.topk_prompt_logprobs[:-4])
          and all(r is not None and len(r) == 3 for r in last.topk_prompt_logprobs[-4:]),
          "prompt_logprobs_last_n masks the top-k rows too")
    lps = scl.compute_logprobs(pin, prompt_logprobs_last_n=2).result()
    check(all(x is None for x in lps[:-2]) and max(abs(a - b) for a, b in zip(lps[-2:], plp[-2:])) < 1e-3,
          "compute_logprobs(prompt_logprobs_last_n=2)")

    # Dense targets: the actual next token in column 0, and one more id on the last row.
    ids = np.full((rows, 2), -1, dtype=np.int64)
    ids[:, 0] = P[1:]
    ids[-1, 1] = 7
    r = scl.sample(prompt=pin, num_samples=1, sampling_params=one,
                   target_prompt_logprobs=types.TensorData.from_numpy(ids)).result()
    tl = np.asarray(r.target_prompt_logprobs.to_numpy()).reshape(rows, 2)
    check(max(abs(tl[i, 0] - plp[i + 1]) for i in range(rows)) < 1e-3,
          "target_prompt_logprobs of the actual tokens equal the prompt logprobs")
    check(all(tl[:-1, 1] == 0.0) and tl[-1, 1] < 0.0, "cells of -1 come back 0.0")

    # Sparse, as the cookbook's decisions send it: K labels on the last row only.
    labels = [7, 8, 9, P[-1]]
    K = len(labels)
    crow = [0] * rows + [K]
    sparse = types.TensorData(data=labels, dtype="int64", shape=[rows, K],
                              sparse_crow_indices=crow, sparse_col_indices=list(range(K)))
    r = scl.sample(prompt=pin, num_samples=1, sampling_params=one, target_prompt_logprobs=sparse).result()
    t = r.target_prompt_logprobs
    vals = np.asarray(t.data, dtype=np.float64)
    check(list(t.shape) == [rows, K] and list(t.sparse_crow_indices) == crow
          and list(t.sparse_col_indices) == list(range(K)) and len(vals) == K,
          "sparse target_prompt_logprobs come back in the same layout")
    check(abs(vals[3] - plp[-1]) < 1e-3 and all(v < 0 for v in vals),
          f"sparse target logprobs: {np.round(vals, 3).tolist()}")

    # Alternative draws at temperature 0 are the most likely token, with its logprob.
    r = scl.sample(prompt=pin, num_samples=1, sampling_params=one, include_prompt_logprobs=True,
                   topk_prompt_logprobs=1, prompt_alt_tokens_k=4).result()
    at = np.asarray(r.prompt_alt_tokens.tokens.to_numpy()).reshape(rows, 4)
    al = np.asarray(r.prompt_alt_tokens.logprobs.to_numpy()).reshape(rows, 4)
    check(all(at[i, j] == r.topk_prompt_logprobs[i + 1][0][0] and abs(al[i, j] - r.topk_prompt_logprobs[i + 1][0][1]) < 1e-5
              for i in range(rows) for j in range(4)),
          "prompt_alt_tokens_k=4 at temperature 0: the most likely token and its logprob")
    hot = types.SamplingParams(max_tokens=1, temperature=1.0, seed=3, stop=[])
    r = scl.sample(prompt=pin, num_samples=1, sampling_params=hot, prompt_alt_tokens_k=8).result()
    al = np.asarray(r.prompt_alt_tokens.logprobs.to_numpy())
    check(al.shape[-1] == 8 or al.size == rows * 8, "prompt_alt_tokens_k=8 at temperature 1")
    check(bool(np.all(al <= 0.0)) and bool(np.all(np.isfinite(al))), "draws carry finite logprobs")

    # A group of 4 on a 60-token prompt, twice: the second takes all but its last token
    # from the prefix cache and samples the same.
    long = types.ModelInput.from_ints((SEQ * 4)[:60])
    g = types.SamplingParams(max_tokens=5, temperature=0.0, stop=[])
    a = scl.sample(prompt=long, num_samples=4, sampling_params=g).result()
    b = scl.sample(prompt=long, num_samples=4, sampling_params=g).result()
    check(b.prompt_cache_hit_tokens == 59, f"prompt_cache_hit_tokens {a.prompt_cache_hit_tokens} then {b.prompt_cache_hit_tokens}")
    check([s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
          and max(abs(x - y) for s, q in zip(a.sequences, b.sequences) for x, y in zip(s.logprobs, q.logprobs)) < 1e-4,
          "cached and uncached samples agree")


def main():
    sc = tinker.ServiceClient(base_url=URL, api_key="tml-loraplex-sdk-test")
    tc = resolve(sc.create_lora_training_client(base_model=MODEL, rank=8, seed=0))
    check(":train:" in tc.model_id, f"training model id {tc.model_id}")
    info = tc.get_info()
    check(info.model_data.model_name == MODEL, "get_info names the base model")

    data = [datum(SEQ), datum(SEQ[:9])]
    n_tokens = (len(SEQ) - 1) + 8

    # forward (no gradient) then cross_entropy training: the loss goes down.
    fwd = tc.forward(data, "cross_entropy").result()
    lp0 = fwd.loss_fn_outputs[0]["logprobs"].to_numpy()
    check(lp0.shape == (len(SEQ) - 1,), f"forward logprobs shape {lp0.shape}")
    check(abs(-lp0.sum() - (-fwd.loss_fn_outputs[0]["logprobs"].to_numpy().sum())) < 1e-6, "logprobs readable")
    losses = []
    for step in range(4):
        out = tc.forward_backward(data, "cross_entropy").result()
        losses.append(out.metrics["loss:sum"] / n_tokens)
        tc.optim_step(types.AdamParams(learning_rate=2e-3)).result()
    log(f"cross_entropy per-token loss by step: {[round(x, 3) for x in losses]}")
    check(abs(losses[0] * n_tokens - (-fwd.loss_fn_outputs[0]["logprobs"].to_numpy().sum()
                                       - fwd.loss_fn_outputs[1]["logprobs"].to_numpy().sum())) < 1e-2,
          "first forward_backward loss equals -sum(forward logprobs)")
    check(all(b < a for a, b in zip(losses, losses[1:])), "cross_entropy loss falls at every step")

    # RL losses on the learner's own logprobs as the sampler's q.
    cur = tc.forward(data, "cross_entropy").result()
    for loss_fn, cfg in [("importance_sampling", None), ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
                         ("cispo", None), ("dro", {"beta": 0.1})]:
        rl = []
        for i, d in enumerate([SEQ, SEQ[:9]]):
            q = cur.loss_fn_outputs[i]["logprobs"].to_numpy()
            adv = np.linspace(-1.0, 1.0, len(d) - 1, dtype=np.float32)
            rl.append(datum(d, logprobs=q, advantages=adv))
        kwargs = {"loss_fn_config": cfg} if cfg else {}
        out = tc.forward_backward(rl, loss_fn, **kwargs).result()
        loss = out.metrics["loss:sum"]
        check(math.isfinite(loss), f"{loss_fn}: loss:sum = {loss:.4f}")
        if loss_fn in ("importance_sampling", "ppo"):
            # At q = p every ratio is 1: loss = -sum(advantages) = 0 for symmetric advantages.
            check(abs(loss) < 1e-3, f"{loss_fn} at ratio 1 gives -sum(A) = 0 (got {loss:.2e})")
    tc.optim_step(types.AdamParams(learning_rate=1e-5)).result()

    stable_reinforce_and_gspo(tc)

    # forward_backward_custom: the SDK runs the loss in torch on the client.
    try:
        import torch  # noqa: F401

        def custom(data_, logprobs_list):
            loss = sum(-(lp * 2.0).sum() for lp in logprobs_list)
            return loss, {"custom:sum": float(loss)}

        ce = tc.forward(data, "cross_entropy").result().metrics["loss:sum"]
        out = tc.forward_backward_custom(data, custom).result()
        got = out.metrics["loss:sum"]
        check(abs(got - 2 * ce) < 1e-3 * abs(ce), f"forward_backward_custom: loss {got:.4f} = 2 x cross_entropy {ce:.4f}")
        tc.optim_step(types.AdamParams(learning_rate=1e-5)).result()
    except ImportError:
        log("SKIP forward_backward_custom: torch is not installed in this Python")

    # Sampler weights, sampling with stop tokens and prompt logprobs.
    saved = tc.save_weights_for_sampler("sampler-a").result()
    check(saved.path.startswith("tinker://") and "/sampler_weights/" in saved.path, f"sampler path {saved.path}")
    scl = resolve(sc.create_sampling_client(model_path=saved.path))
    prompt = types.ModelInput.from_ints(SEQ[:6])
    greedy = types.SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    r = scl.sample(prompt=prompt, num_samples=2, sampling_params=greedy, include_prompt_logprobs=True).result()
    toks = r.sequences[0].tokens
    check(len(r.sequences) == 2 and r.sequences[1].tokens == toks, f"greedy samples agree: {toks}")
    check(len(toks) == 6 and r.sequences[0].stop_reason == "length", "max_tokens ends with stop_reason length")
    check(len(r.sequences[0].logprobs) == len(toks), "one logprob per sampled token")
    check(r.prompt_logprobs[0] is None and all(x is not None for x in r.prompt_logprobs[1:]),
          "prompt_logprobs[0] is None, the rest are numbers")
    stop_tok = toks[2]
    r2 = scl.sample(prompt=prompt, num_samples=1,
                    sampling_params=types.SamplingParams(max_tokens=6, temperature=0.0, stop=[stop_tok])).result()
    t2 = r2.sequences[0].tokens
    check(t2[-1] == stop_tok and r2.sequences[0].stop_reason == "stop" and t2 == toks[: toks.index(stop_tok) + 1],
          f"stop token {stop_tok} ends the sequence and is returned last: {t2}")
    seeded = types.SamplingParams(max_tokens=5, temperature=1.0, seed=1234, stop=[])
    a = scl.sample(prompt=prompt, num_samples=1, sampling_params=seeded).result().sequences[0].tokens
    b = scl.sample(prompt=prompt, num_samples=1, sampling_params=seeded).result().sequences[0].tokens
    check(a == b, f"same seed, same sample: {a}")

    # compute_logprobs agrees with the training model's forward pass (same weights).
    lps = scl.compute_logprobs(types.ModelInput.from_ints(SEQ)).result()
    fwd_now = tc.forward([datum(SEQ)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    diff = max(abs(x - y) for x, y in zip(lps[1:], fwd_now))
    check(lps[0] is None and len(lps) == len(SEQ) and diff < 1e-3,
          f"compute_logprobs matches forward logprobs (max diff {diff:.2e})")

    prompt_extras(scl)

    # Ephemeral sampler straight from the training client.
    scl2 = resolve(tc.save_weights_and_get_sampling_client())
    r3 = scl2.sample(prompt=prompt, num_samples=1, sampling_params=greedy).result()
    check(r3.sequences[0].tokens == toks, "ephemeral sampler samples the same weights")

    # Training state: save, list, restore with optimizer into a new model.
    st = tc.save_state("ckpt-1").result()
    check("/weights/ckpt-1" in st.path, f"save_state path {st.path}")
    rc = tinker.RestClient(base_url=URL, api_key="tml-loraplex-sdk-test")
    cks = rc.list_checkpoints(tc.model_id).result()
    ids = sorted(c.checkpoint_id for c in cks.checkpoints)
    check("weights/ckpt-1" in ids and "sampler_weights/sampler-a" in ids, f"list_checkpoints: {ids}")
    run = rc.get_training_run(tc.model_id).result()
    check(run.training_run_id == tc.model_id and run.lora_rank == 8, "get_training_run")
    tc2 = resolve(sc.create_training_client_from_state_with_optimizer(st.path))
    check(tc2.model_id != tc.model_id, f"restored model {tc2.model_id}")
    a = tc.forward(data, "cross_entropy").result().metrics["loss:sum"]
    b = tc2.forward(data, "cross_entropy").result().metrics["loss:sum"]
    check(abs(a - b) < 1e-4, f"restored model gives the same loss ({a:.5f} vs {b:.5f})")
    # Both take the same step from the same state (optimizer moments restored): still equal.
    for c in (tc, tc2):
        c.forward_backward(data, "cross_entropy").result()
        c.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    a = tc.forward(data, "cross_entropy").result().metrics["loss:sum"]
    b = tc2.forward(data, "cross_entropy").result().metrics["loss:sum"]
    check(abs(a - b) < 1e-3, f"after one more step each, losses still agree ({a:.5f} vs {b:.5f})")

    # A user error fails its future with category user; the client stays usable.
    bad = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                      loss_fn_inputs={"target_tokens": types.TensorData.from_numpy(np.array([1, 2, VOCAB + 5], dtype=np.int64)),
                                      "weights": types.TensorData.from_numpy(np.ones(3, dtype=np.float32))})
    try:
        tc.forward_backward([bad], "cross_entropy").result()
        check(False, "out-of-vocabulary target must fail")
    except Exception as e:  # noqa: BLE001
        check("vocabulary" in str(e), f"out-of-vocabulary target refused: {type(e).__name__}")
    out = tc.forward(data, "cross_entropy").result()
    check(math.isfinite(out.metrics["loss:sum"]), "training client still works after a refused request")

    sc.close("success").result()
    # Closing the session unloads its training models; their runs and checkpoints stay.
    run = rc.get_training_run(tc.model_id).result()
    check(run.training_run_id == tc.model_id and run.last_checkpoint is not None,
          "a closed session's run stays described, with its checkpoints")
    log("ALL SDK CHECKS PASSED")


if __name__ == "__main__":
    main()
