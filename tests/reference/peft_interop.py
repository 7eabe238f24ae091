#!/usr/bin/env python3
"""PEFT interop check for loraplex's adapter export (run by tests/store_peft.rs).

Loads the base model from the same GGUF file through transformers (dequantized to
float32), applies the exported adapter with `peft.PeftModel.from_pretrained`, and compares
logits at every position of the given tokens with the ones loraplex computed.

Inputs (from the Rust test):
  --gguf PATH          the GGUF base model
  --adapter DIR        adapter_config.json + adapter_model.safetensors
  --tokens JSON        a JSON list of token ids
  --base-logits BIN    loraplex's base-model logits, float32 little-endian [n, vocab]
  --lora-logits BIN    loraplex's logits with the adapter, same layout
  --out JSON           where to write the measurements

Writes: max |Δlogit| without and with the adapter, how much the adapter moves the logits
(so agreement is not trivial), that every exported tensor was loaded into the PEFT model
unchanged, and the error if the q/k lora_B rows were permuted llama.cpp-style (to show
the layout question is real and that the export needs no permutation).
"""

import argparse
import json
import os

import numpy as np
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def permute_llamacpp(w, n_head):
    # llama.cpp's convert_hf_to_gguf permute: HF half-split rows -> interleaved rows.
    out, inp = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, inp).swapaxes(1, 2).reshape(out, inp)


def main():
    ap = argparse.ArgumentParser()
    for a in ["--gguf", "--adapter", "--tokens", "--base-logits", "--lora-logits", "--out"]:
        ap.add_argument(a, required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    tokens = json.load(open(args.tokens))
    d, name = os.path.split(os.path.abspath(args.gguf))
    base = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    base.eval()
    vocab = base.config.vocab_size
    n = len(tokens)
    ids = torch.tensor([tokens], dtype=torch.long)
    rust_base = np.fromfile(args.base_logits, dtype="<f4").reshape(n, vocab)
    rust_lora = np.fromfile(args.lora_logits, dtype="<f4").reshape(n, vocab)

    with torch.no_grad():
        hf_base = base(ids).logits[0].float().numpy()
    model = PeftModel.from_pretrained(base, args.adapter)
    model.eval()
    with torch.no_grad():
        hf_lora = model(ids).logits[0].float().numpy()

    # Every exported tensor is in the PEFT model, unchanged.
    exported = load_file(os.path.join(args.adapter, "adapter_model.safetensors"))
    params = dict(model.named_parameters())
    checked = 0
    for k, v in exported.items():
        pk = k.replace(".weight", ".default.weight")
        if pk not in params:
            raise SystemExit(f"exported tensor {k} is not a parameter of the PEFT model")
        if not torch.equal(params[pk].detach().cpu(), v):
            raise SystemExit(f"exported tensor {k} changed on load")
        checked += 1
    n_lora = sum(1 for p in params if ".lora_A." in p or ".lora_B." in p)

    # Negative control: q/k lora_B rows in llama.cpp's interleaved order instead.
    cfg = base.config
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if name_.endswith("q_proj.lora_B.default.weight"):
                p.copy_(permute_llamacpp(p.detach().clone(), cfg.num_attention_heads))
            elif name_.endswith("k_proj.lora_B.default.weight"):
                p.copy_(permute_llamacpp(p.detach().clone(), cfg.num_key_value_heads))
        hf_perm = model(ids).logits[0].float().numpy()

    out = {
        "positions": n,
        "vocab": vocab,
        "max_abs_diff_base": float(np.abs(hf_base - rust_base).max()),
        "max_abs_diff_lora": float(np.abs(hf_lora - rust_lora).max()),
        "adapter_effect": float(np.abs(hf_lora - hf_base).max()),
        "max_abs_diff_if_qk_permuted": float(np.abs(hf_perm - rust_lora).max()),
        "tensors_checked": checked,
        "lora_parameters_in_model": n_lora,
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "peft": __import__("peft").__version__,
        },
    }
    json.dump(out, open(args.out, "w"), indent=2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
