#!/usr/bin/env python3
"""Tiny random models of every family loraplex serves, and what transformers computes on them.

Run with the cookbook venv (torch 2.10, transformers 5.24, plus `pip install gguf`):

    ~/.cache/loraplex/venv-cookbook/bin/python tests/reference/make_families.py

No hub access. Writes under tests/reference/families/:

  <family>/                 Hugging Face directory (config.json, model.safetensors,
                            tokenizer.json, tokenizer_config.json), float32
  <family>.gguf             the same weights as llama.cpp's convert_hf_to_gguf writes them
                            (F32; Q/K rows permuted for llama only; rope_freqs.weight for
                            llama3 RoPE scaling; q/k/v biases; q/k norms)
  <family>.lora.safetensors a LoRA (rank 2, alpha 4, every linear layer and lm_head, A and
                            B nonzero) in PEFT's tensor names
  llama3-rope-parameters/config.json   llama3's config as transformers 5 writes it
                            (`rope_parameters`); the weights are llama3's
  llama3-sharded/           llama3 in two safetensors shards with an index
  qwen3-bf16/, llama-tied-f16/   those families' weights stored in bf16 / f16 (exact: every
                            weight is made representable in bf16 and f16)
  quant-zoo.gguf            one tensor per GGUF dtype loraplex reads (+ one Q5_0 it refuses)
  bad-arch.gguf             a GGUF whose general.architecture is "mamba"
  expected.json             per family: token rows, log-probs of the next tokens with and
                            without the LoRA, full log-softmax at probe ids, gradients of
                            sum_t w_t * logprob_t (with the LoRA) for every LoRA tensor,
                            8-token greedy continuations through generate() (KV cache),
                            with and without the LoRA; and the quant zoo's dequantized values

Every reference value is computed in float64 (the weights are exact in f32, bf16 and f16).
"""

import argparse
import copy
import json
import math
import os
import shutil

import gguf
import numpy as np
import torch
from safetensors.numpy import save_file as save_np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "families")
VOCAB = 288
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LORA_RANK, LORA_ALPHA = 2, 4.0
PROBES = [0, 1, 17, 200, VOCAB - 1]
GREEDY_NEW = 8
ROW_LENGTHS = [7, 12, 4]
NEUTRAL = False

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=0,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

FAMILIES = {
    "llama3": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(COMMON, rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE), tie_word_embeddings=False),
    ),
    "llama-tied": (LlamaConfig, LlamaForCausalLM, dict(COMMON, rope_theta=10000.0, tie_word_embeddings=True)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(COMMON, rope_theta=1000000.0, tie_word_embeddings=False)),
    "qwen3": (
        Qwen3Config,
        Qwen3ForCausalLM,
        dict(COMMON, rope_theta=1000000.0, head_dim=24, tie_word_embeddings=False),
    ),
}
SEEDS = {"llama3": 1, "llama-tied": 2, "qwen2": 3, "qwen3": 4}


def exact(t):
    """Round to bf16, and flush what f16 cannot hold exactly, so f32/bf16/f16 files agree."""
    t = t.to(torch.bfloat16).to(torch.float32)
    return torch.where(t.abs() < 2.0**-14, torch.zeros_like(t), t)


def make_tokenizer():
    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "Hello, world! Tiny models of llama and qwen families.",
        "def f(x):\n    return x * 2\n",
        "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    ] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    assert tok.get_vocab_size() <= VOCAB
    return tok


def build(family):
    cfg_cls, model_cls, kw = FAMILIES[family]
    cfg = cfg_cls(**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(SEEDS[family])
    model = model_cls(cfg)
    g = torch.Generator().manual_seed(1000 + SEEDS[family])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if NEUTRAL and (name.endswith(".bias") or "q_norm" in name or "k_norm" in name):
                # Sanity mode: zero biases and unit q/k norms make qwen's math llama's.
                v = torch.zeros(p.shape) if name.endswith(".bias") else torch.ones(p.shape)
            elif name.endswith("norm.weight"):
                # RMSNorm weights (layer norms, final norm, q/k norms) around 1.
                v = 1.0 + 0.3 * torch.randn(p.shape, generator=g)
            elif name.endswith(".bias"):
                v = 0.5 * torch.randn(p.shape, generator=g)
            elif "embed_tokens" in name:
                # Tied, the embeddings are the LM head too: keep logits O(1) there, or the
                # model is so ill-conditioned that float32 itself is off by 1e-4.
                std = 2.0 / math.sqrt(p.shape[1]) if cfg.tie_word_embeddings else 0.7
                v = std * torch.randn(p.shape, generator=g)
            else:
                v = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1])
            p.copy_(exact(v))
    model.eval()
    return cfg, model


def lora_tensors(family, cfg, model):
    """PEFT-named lora_A [r, in] / lora_B [out, r], both nonzero."""
    g = torch.Generator().manual_seed(2000 + SEEDS[family])
    out = {}
    mods = []
    for l in range(cfg.num_hidden_layers):
        for m in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]:
            mods.append(f"model.layers.{l}.{m}")
    mods.append("lm_head")
    for m in mods:
        lin = model.get_submodule(m)
        a = exact(torch.randn(LORA_RANK, lin.in_features, generator=g) / math.sqrt(lin.in_features))
        b = exact(0.2 * torch.randn(lin.out_features, LORA_RANK, generator=g))
        out[f"base_model.model.{m}.lora_A.weight"] = a
        out[f"base_model.model.{m}.lora_B.weight"] = b
    return mods, out


class Lora:
    """y += (alpha/r) * B A x on each module, by forward hooks (PEFT's math, no peft)."""

    def __init__(self, model, mods, tensors):
        self.params = {k: v.clone().double().requires_grad_(True) for k, v in tensors.items()}
        self.hooks = []
        scale = LORA_ALPHA / LORA_RANK
        for m in mods:
            a = self.params[f"base_model.model.{m}.lora_A.weight"]
            b = self.params[f"base_model.model.{m}.lora_B.weight"]

            def hook(mod, inp, out, a=a, b=b):
                return out + scale * (inp[0] @ a.T) @ b.T

            self.hooks.append(model.get_submodule(m).register_forward_hook(hook))

    def remove(self):
        for h in self.hooks:
            h.remove()


def rows_for(family):
    rng = np.random.default_rng(50 + SEEDS[family])
    return [[int(x) for x in rng.integers(0, VOCAB, n + 1)] for n in ROW_LENGTHS]


def logprob_weights(family):
    rng = np.random.default_rng(70 + SEEDS[family])
    return [[float(np.float32(x)) for x in rng.normal(size=n)] for n in ROW_LENGTHS]


def forward_stats(model, rows):
    lps, probes = [], []
    for seq in rows:
        ids = torch.tensor([seq[:-1]])
        logits = model(ids).logits[0].double()
        ls = torch.log_softmax(logits, -1)
        tgt = torch.tensor(seq[1:])
        lps.append(ls[torch.arange(len(tgt)), tgt])
        probes.append(ls[:, PROBES])
    return lps, probes


def greedy(model, rows):
    out = []
    for seq in rows:
        ids = torch.tensor([seq[:-1]])
        g = model.generate(
            ids,
            do_sample=False,
            max_new_tokens=GREEDY_NEW,
            min_new_tokens=GREEDY_NEW,
            eos_token_id=None,
            pad_token_id=0,
            use_cache=True,
        )
        new = [int(x) for x in g[0, ids.shape[1]:]]
        # Cache-free check, and the smallest margin between the best and second token.
        cur = list(seq[:-1])
        margin = float("inf")
        for t in new:
            logits = model(torch.tensor([cur])).logits[0, -1].double()
            top = torch.topk(logits, 2)
            assert int(top.indices[0]) == t, "generate() with the KV cache and a plain loop disagree"
            margin = min(margin, float(top.values[0] - top.values[1]))
            cur.append(t)
        out.append({"tokens": new, "min_margin": margin})
    return out


def to_list(t):
    return [float(x) for x in t.detach().reshape(-1)]


def permute_llamacpp(w, n_head):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg):
    rp = cfg.rope_parameters
    base = rp["rope_theta"]
    dim = cfg.head_dim
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
    old = rp["original_max_position_embeddings"]
    lo_wl, hi_wl = old / lo, old / hi
    out = []
    for f in freqs:
        wl = 2 * math.pi / float(f)
        if wl < hi_wl:
            out.append(1.0)
        elif wl > lo_wl:
            out.append(factor)
        else:
            s = (old / wl - lo) / (hi - lo)
            out.append(1.0 / ((1 - s) / factor + s))
    return np.array(out, dtype=np.float32)


def write_gguf(path, family, cfg, model, tok):
    arch = "qwen3" if family.startswith("qwen3") else "qwen2" if family.startswith("qwen2") else "llama"
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny-{family}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if arch == "llama":
        w.add_rope_dimension_count(hd)
    if hd != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    # Tokenizer as llama.cpp's gpt2 BPE, padded to the model's vocabulary.
    vocab = tok.get_vocab()
    tokens = [None] * len(vocab)
    for s, i in vocab.items():
        tokens[i] = s
    types = [gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens]
    for i in range(len(tokens), cfg.vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if family.startswith("llama") and cfg.rope_parameters.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg))
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}."
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        if arch == "llama":
            q = permute_llamacpp(q, cfg.num_attention_heads)
            k = permute_llamacpp(k, cfg.num_key_value_heads)
        b = f"blk.{l}."
        w.add_tensor(b + "attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(b + "attn_q.weight", np.ascontiguousarray(q))
        w.add_tensor(b + "attn_k.weight", np.ascontiguousarray(k))
        w.add_tensor(b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        for n in ["q", "k", "v"]:
            if p + f"self_attn.{n}_proj.bias" in sd:
                w.add_tensor(b + f"attn_{n}.bias", sd[p + f"self_attn.{n}_proj.bias"])
        for n in ["q", "k"]:
            if p + f"self_attn.{n}_norm.weight" in sd:
                w.add_tensor(b + f"attn_{n}_norm.weight", sd[p + f"self_attn.{n}_norm.weight"])
        w.add_tensor(b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(b + "ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(b + "ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(b + "ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def save_tokenizer(d, tok):
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(
            {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS[0], "eos_token": SPECIALS[0]},
            f,
            indent=2,
        )


def save_dir(d, model, tok, dtype=torch.float32):
    shutil.rmtree(d, ignore_errors=True)
    # A copy: converting in place would also round RoPE's inv_freq buffer for good.
    copy.deepcopy(model).to(dtype).save_pretrained(d)
    for extra in ["generation_config.json"]:
        if os.path.exists(os.path.join(d, extra)):
            os.remove(os.path.join(d, extra))
    save_tokenizer(d, tok)


def classic_layout(d):
    """Rewrite config.json the way Hub configs read: rope_theta and rope_scaling at the top."""
    p = os.path.join(d, "config.json")
    c = json.load(open(p))
    rp = c.pop("rope_parameters")
    c["rope_theta"] = rp.pop("rope_theta")
    c["rope_scaling"] = rp if rp.get("rope_type", "default") != "default" else None
    json.dump(c, open(p, "w"), indent=2, sort_keys=True)
    return c


def save_sharded(d, model, tok, cfg_json):
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = sorted(sd)
    half = len(names) // 2
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for fi, part in enumerate([names[:half], names[half:]]):
        save_np({k: np.ascontiguousarray(sd[k]) for k in part}, os.path.join(d, files[fi]), metadata={"format": "pt"})
        weight_map.update({k: files[fi] for k in part})
    total = sum(v.nbytes for v in sd.values())
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              open(os.path.join(d, "model.safetensors.index.json"), "w"), indent=2, sort_keys=True)
    json.dump(cfg_json, open(os.path.join(d, "config.json"), "w"), indent=2, sort_keys=True)
    save_tokenizer(d, tok)


def quant_zoo(path):
    rng = np.random.default_rng(7)
    T = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(path, "llama")
    expected = {}
    shape = (2, 256)
    x = rng.normal(size=shape).astype(np.float32)
    for t in [T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0]:
        data = gguf.quants.quantize(x, t)
        w.add_tensor(f"zoo.{t.name.lower()}", data, raw_dtype=t)
    # K-quants: gguf-py cannot quantize them, so random blocks with sane f16 scales.
    sizes = {T.Q4_K: 144, T.Q5_K: 176, T.Q6_K: 210}
    for t, bs in sizes.items():
        blocks = rng.integers(0, 256, size=(shape[0], shape[1] // 256, bs), dtype=np.uint8)
        d = np.array([0.01], dtype=np.float16).view(np.uint8)
        dmin = np.array([0.02], dtype=np.float16).view(np.uint8)
        if t == T.Q6_K:
            blocks[..., 208:210] = d
            # int8 scales: keep them small
            blocks[..., 192:208] = rng.integers(-20, 20, size=(shape[0], 1, 16)).astype(np.int8).view(np.uint8)
        else:
            blocks[..., 0:2] = d
            blocks[..., 2:4] = dmin
        data = blocks.reshape(shape[0], -1)
        w.add_tensor(f"zoo.{t.name.lower()}", data, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    # Read back and dequantize with gguf-py: the reference values.
    r = gguf.GGUFReader(path)
    for tinfo in r.tensors:
        deq = gguf.quants.dequantize(tinfo.data, tinfo.tensor_type).reshape(shape)
        assert np.isfinite(deq).all()
        expected[tinfo.name] = {
            "dtype": tinfo.tensor_type.name,
            "shape": list(shape),
            "values": [float(v) for v in deq.reshape(-1)],
        }
    return expected


def bad_arch(path):
    w = gguf.GGUFWriter(path, "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    global OUT, NEUTRAL
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=OUT, help="output directory (default: tests/reference/families)")
    ap.add_argument(
        "--neutral",
        action="store_true",
        help="zero q/k/v biases, unit q/k norm weights and no q/k norms in the reference math (a "
        "sanity run of the loaders before the qwen math exists: qwen then computes like llama); "
        "never commit its output",
    )
    args = ap.parse_args()
    OUT, NEUTRAL = args.out, args.neutral
    torch.set_num_threads(2)
    os.makedirs(OUT, exist_ok=True)
    tok = make_tokenizer()
    expected = {
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "gguf": getattr(gguf, "__version__", "?")},
        "lora": {"rank": LORA_RANK, "alpha": LORA_ALPHA},
        "probe_ids": PROBES,
        "families": {},
    }
    for family in FAMILIES:
        cfg, model = build(family)
        d = os.path.join(OUT, family)
        save_dir(d, model, tok)
        cfg_json = classic_layout(d) if family.startswith("llama") else None
        if family == "llama3":
            os.makedirs(os.path.join(OUT, "llama3-rope-parameters"), exist_ok=True)
            model.config.to_json_file(os.path.join(OUT, "llama3-rope-parameters", "config.json"))
            save_sharded(os.path.join(OUT, "llama3-sharded"), model, tok, cfg_json)
        if family == "qwen3":
            save_dir(os.path.join(OUT, "qwen3-bf16"), model, tok, torch.bfloat16)
        if family == "llama-tied":
            save_dir(os.path.join(OUT, "llama-tied-f16"), model, tok, torch.float16)
            classic_layout(os.path.join(OUT, "llama-tied-f16"))
        write_gguf(os.path.join(OUT, f"{family}.gguf"), family, cfg, model, tok)
        mods, lt = lora_tensors(family, cfg, model)
        save_np({k: v.numpy() for k, v in lt.items()}, os.path.join(OUT, f"{family}.lora.safetensors"))

        if NEUTRAL and family.startswith("qwen3"):
            # A unit-weight RMSNorm still normalizes: drop the q/k norms from the reference
            # math (the files keep their unit weights), so qwen3 computes like llama.
            for layer in model.model.layers:
                layer.self_attn.q_norm = torch.nn.Identity()
                layer.self_attn.k_norm = torch.nn.Identity()
        rows = rows_for(family)
        with torch.no_grad():
            lp32, _ = forward_stats(model, rows)
        model.double()
        weights = logprob_weights(family)
        with torch.no_grad():
            lp, probes = forward_stats(model, rows)
            base_greedy = greedy(model, rows)
        # Well-conditioned: torch in float32 agrees with float64 far inside the tests' 1e-4.
        f32_err = max(float(((a - b).abs() / (1 + b.abs())).max()) for a, b in zip(lp32, lp))
        assert f32_err < 1e-5, f"{family}: float32 is off by {f32_err}"
        lora = Lora(model, mods, lt)
        lp_lora, probes_lora = forward_stats(model, rows)
        loss = sum((l * torch.tensor(w, dtype=torch.float64)).sum() for l, w in zip(lp_lora, weights))
        loss.backward()
        with torch.no_grad():
            lora_greedy = greedy(model, rows)
        lora.remove()
        expected["families"][family] = {
            "model_type": cfg.model_type,
            "rows": rows,
            "loss_weights": weights,
            "logprobs": [to_list(x) for x in lp],
            "probe_logprobs": [to_list(x) for x in probes],
            "logprobs_lora": [to_list(x) for x in lp_lora],
            "probe_logprobs_lora": [to_list(x) for x in probes_lora],
            "objective": float(loss.detach()),
            "float32_torch_rel_error": f32_err,
            "lora_grads": {k: to_list(p.grad) for k, p in lora.params.items()},
            "greedy": base_greedy,
            "greedy_lora": lora_greedy,
        }
        print(family, "greedy", [g["tokens"] for g in base_greedy], "margins",
              [round(g["min_margin"], 4) for g in base_greedy + lora_greedy])
    expected["quant_zoo"] = quant_zoo(os.path.join(OUT, "quant-zoo.gguf"))
    bad_arch(os.path.join(OUT, "bad-arch.gguf"))
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f)


if __name__ == "__main__":
    main()
