#!/usr/bin/env python3
"""Independent reference values for loraplex's built-in RL losses, computed with numpy.

Each loss is written here from its definition (README, "Losses") as a *surrogate*
f(lp, lp_frozen): the per-token loss where every stop-gradient quantity is computed from
lp_frozen. Its value is f(lp, lp); its gradient d loss / d lp is taken by central finite
differences on lp with lp_frozen held fixed, in float64, so no hand-derived gradient is
shared with the Rust code. Metrics are counted from the same definitions.

Inputs are drawn with a fixed seed and rounded to float32, so the Rust side reads exactly
the values used here. The output (tests/reference/losses_reference.json) is deterministic;
tests/losses.rs compares loraplex against it and re-runs this script to check it is current.

Usage:
  python tests/reference/losses_reference.py [--out tests/reference/losses_reference.json]
"""

import argparse
import json
import os

import numpy as np

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "losses_reference.json")

CLIP_LOW, CLIP_HIGH, DRO_BETA = 0.8, 1.2, 0.05
KL_COEFF, MAX_RATIO = 0.05, 2.0
H = 1e-6


def f32(x):
    return np.asarray(x, dtype=np.float32)


# --- surrogates: per-token loss vectors (float64) -------------------------------------------


def importance_sampling(lp, fz, d, cfg):
    return -np.exp(lp - d["logprobs"]) * d["advantages"]


def ppo(lp, fz, d, cfg):
    lo, hi = cfg.get("clip_low_threshold", CLIP_LOW), cfg.get("clip_high_threshold", CLIP_HIGH)
    r = np.exp(lp - d["logprobs"])
    a = d["advantages"]
    return -np.minimum(r * a, np.clip(r, lo, hi) * a)


def cispo(lp, fz, d, cfg):
    lo, hi = cfg.get("clip_low_threshold", CLIP_LOW), cfg.get("clip_high_threshold", CLIP_HIGH)
    w = np.clip(np.exp(fz - d["logprobs"]), lo, hi)  # stop-gradient
    return -w * lp * d["advantages"]


def dro(lp, fz, d, cfg):
    beta = cfg.get("beta", DRO_BETA)
    q, a = d["logprobs"], d["advantages"]
    return -(lp * a - 0.5 * beta * (lp - q) ** 2)


def gspo(lp, fz, d, cfg):
    lo, hi = cfg.get("clip_low_threshold", CLIP_LOW), cfg.get("clip_high_threshold", CLIP_HIGH)
    q, a, m = d["logprobs"], d["advantages"], d["sequence_ratio_mask"] != 0
    s = np.exp(np.mean((fz - q)[m])) if m.any() else 1.0  # stop-gradient
    st = s * np.exp(lp - fz)  # value s, gradient of its own logprob
    return -np.minimum(st * a, np.clip(st, lo, hi) * a)


def stable_reinforce(lp, fz, d, cfg):
    kl, cap = cfg.get("kl_coeff", KL_COEFF), cfg.get("max_ratio", MAX_RATIO)
    q, a = d["recorded:sampler_logprobs"], d["advantages"]
    sampled = d["recorded:sampled"] != 0
    r_frozen = np.exp(fz - q)
    w_over_r = np.minimum(r_frozen, cap) / r_frozen  # stop-gradient
    x = lp - q
    per = -w_over_r * np.exp(x) * a + kl * (np.exp(x) - 1.0 - x)
    return np.where(sampled, per, 0.0)


LOSSES = {
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
    "gspo": gspo,
    "stable_reinforce": stable_reinforce,
}


def metrics(loss_fn, data, cfg):
    out = {}
    if loss_fn in ("ppo", "cispo", "gspo"):
        lo = cfg.get("clip_low_threshold", CLIP_LOW)
        hi = cfg.get("clip_high_threshold", CLIP_HIGH)
        clipped = 0
        ratios = []
        for lp, d in data:
            a = d["advantages"]
            if loss_fn == "gspo":
                m = d["sequence_ratio_mask"] != 0
                s = np.exp(np.mean((lp - d["logprobs"])[m])) if m.any() else 1.0
                if m.any():
                    ratios.append(s)
                r = np.full_like(lp, s)
            else:
                r = np.exp(lp - d["logprobs"])
            if loss_fn == "cispo":
                # The clipped weight multiplies a nonzero advantage.
                clipped += int(np.sum((np.clip(r, lo, hi) != r) & (a != 0)))
            else:
                # The clipped branch is strictly smaller (so never where A = 0).
                clipped += int(np.sum(np.clip(r, lo, hi) * a < r * a))
        out["clipped_tokens:sum"] = float(clipped)
        if ratios:
            out["sequence_ratio:min"] = float(min(ratios))
            out["sequence_ratio:max"] = float(max(ratios))
    if loss_fn == "stable_reinforce":
        cap = cfg.get("max_ratio", MAX_RATIO)
        sampled = truncated = 0
        kl = 0.0
        rmax = None
        for lp, d in data:
            m = d["recorded:sampled"] != 0
            x = (lp - d["recorded:sampler_logprobs"])[m]
            r = np.exp(x)
            sampled += int(m.sum())
            truncated += int(np.sum((r > cap) & (d["advantages"][m] != 0)))
            kl += float(np.sum(np.expm1(x) - x))
            if r.size:
                rmax = float(r.max()) if rmax is None else max(rmax, float(r.max()))
        out["sampled_tokens:sum"] = float(sampled)
        out["truncated_tokens:sum"] = float(truncated)
        out["kl_sample_train:sum"] = kl
        if rmax is not None:
            out["importance_ratio:max"] = rmax
    return out


def reference(loss_fn, data, cfg):
    f = LOSSES[loss_fn]
    loss = 0.0
    grads, elementwise = [], []
    for lp, d in data:
        per = f(lp, lp, d, cfg)
        loss += float(per.sum())
        elementwise.append(per)
        g = np.zeros_like(lp)
        for j in range(lp.size):
            e = np.zeros_like(lp)
            e[j] = H
            g[j] = (f(lp + e, lp, d, cfg).sum() - f(lp - e, lp, d, cfg).sum()) / (2 * H)
        grads.append(g)
    out = {"loss:sum": loss}
    out.update(metrics(loss_fn, data, cfg))
    return {
        "loss": loss,
        "grads": [g.tolist() for g in grads],
        "elementwise": [e.tolist() for e in elementwise],
        "metrics": out,
    }


# --- cases ---------------------------------------------------------------------------------


def rl_datum(rng, prompt, sampled, adv, drift):
    """A datum shaped like the cookbook's: `prompt` target positions with advantage 0 and
    sampler logprob 0, then `sampled` positions with advantage `adv`. The learner's logprobs
    are the sampler's plus `drift`-sized noise (off-policy-ness)."""
    n = prompt + sampled
    q_s = f32(-np.abs(rng.normal(1.0, 0.8, sampled)) - 0.05)
    lp_s = f32(q_s + rng.normal(0.0, drift, sampled))
    lp_p = f32(-np.abs(rng.normal(2.0, 1.0, prompt)) - 0.05)
    lp = np.concatenate([lp_p, lp_s]).astype(np.float64)
    q = np.concatenate([np.zeros(prompt, np.float32), q_s]).astype(np.float64)
    mask = np.concatenate([np.zeros(prompt), np.ones(sampled)])
    a = np.concatenate([np.zeros(prompt), np.full(sampled, adv)]).astype(np.float32).astype(np.float64)
    d = {
        "logprobs": q,
        "advantages": a,
        "sequence_ratio_mask": mask,
        # The record holds the sampler's logprobs of the sampled tokens.
        "recorded:sampler_logprobs": np.concatenate([np.zeros(prompt), q_s]).astype(np.float64),
        "recorded:sampled": mask,
    }
    assert lp.size == n
    return lp, d


def cases():
    rng = np.random.default_rng(20261201)
    out = []

    def add(name, loss_fn, data, cfg=None, inputs=None):
        cfg = cfg or {}
        keys = inputs or {
            "gspo": ["logprobs", "advantages", "sequence_ratio_mask"],
            "stable_reinforce": ["advantages", "recorded:sampler_logprobs", "recorded:sampled", "logprobs"],
        }.get(loss_fn, ["logprobs", "advantages"])
        out.append(
            {
                "name": name,
                "loss_fn": loss_fn,
                "config": cfg,
                "data": [
                    {"logprobs": lp.tolist(), "inputs": {k: np.asarray(d[k], dtype=np.float64).tolist() for k in keys}}
                    for lp, d in data
                ],
                "expected": reference(loss_fn, data, cfg),
            }
        )

    group = [rl_datum(rng, 5, 9, adv, drift) for adv, drift in [(1.0, 0.05), (-0.5, 0.4), (0.75, 0.9), (-1.25, 0.02)]]
    for loss_fn in ("importance_sampling", "ppo", "cispo", "dro"):
        add(f"{loss_fn}: a cookbook-shaped group", loss_fn, group)

    # GSPO: default thresholds, the paper's tight ones (most sequences clipped), asymmetric,
    # a mask over part of the sampled tokens, per-token thresholds, a datum with no mask and
    # no advantage.
    add("gspo: default thresholds", "gspo", group)
    add("gspo: the paper's thresholds", "gspo", group,
        {"clip_low_threshold": 1 - 3e-4, "clip_high_threshold": 1 + 4e-4})
    add("gspo: asymmetric thresholds", "gspo", group, {"clip_low_threshold": 0.95, "clip_high_threshold": 1.01})
    lp, d = rl_datum(rng, 3, 8, 1.5, 0.3)
    d = dict(d)
    d["sequence_ratio_mask"] = np.array([0, 0, 0, 1, 1, 0, 1, 1, 0, 2.0, 1], dtype=np.float64)
    lp2, d2 = rl_datum(rng, 4, 2, 0.0, 0.3)
    d2 = dict(d2)
    d2["sequence_ratio_mask"] = np.zeros(6)
    add("gspo: partial mask, and a datum without one", "gspo", [(lp, d), (lp2, d2)],
        {"clip_low_threshold": 0.97, "clip_high_threshold": 1.02})

    # StableReinforce: on-policy-ish, far off-policy (ratios past the cap), its config keys.
    near = [rl_datum(rng, 4, 10, adv, 0.01) for adv in (1.0, -1.0, 0.5)]
    far = [rl_datum(rng, 6, 12, adv, 1.2) for adv in (1.0, -0.75, 2.0, -1.5)]
    add("stable_reinforce: near on-policy", "stable_reinforce", near)
    add("stable_reinforce: far off-policy, default config", "stable_reinforce", far)
    add("stable_reinforce: kl_coeff and max_ratio", "stable_reinforce", far, {"kl_coeff": 0.3, "max_ratio": 1.25})
    add("stable_reinforce: no KL term", "stable_reinforce", far, {"kl_coeff": 0.0})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()
    doc = {
        "generator": "tests/reference/losses_reference.py",
        "numpy": np.__version__,
        "finite_difference_step": H,
        "cases": cases(),
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {len(doc['cases'])} cases to {args.out}")


if __name__ == "__main__":
    main()
