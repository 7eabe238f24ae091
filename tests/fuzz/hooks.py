"""schemathesis hooks for fuzzing a real `loraplex serve` (tests/fuzz_api.rs).

- Serializers for the two binary bodies: `application/x-protobuf` encodes the JSON form of
  ForwardBackwardRequest that /openapi.json documents into real protobuf bytes (field
  numbers as in src/api/proto.rs), now and then truncated or with flipped bytes;
  `application/wasm` sends a real component from plugins/dist/, a truncated or corrupted
  one, or garbage.
- Hostile tensors (the [1, 2^40] sparse CSR with no entries and its family) are added to
  some forward_backward requests, so they are reached every run, not by luck.
- Fixtures made once through the API (a session, a training model with checkpoints, a
  sampling session, plugins, a REST adapter) and, in most requests, put in place of the
  generated ids, so requests get past "not found" and into the handlers. Destructive
  requests get throwaway targets. Sizes that only cost time (max_tokens, number of
  samples, prompt lengths, LoRA rank) are clamped so the run stays in its time budget.
- Each answer is counted per operation and status in $LORAPLEX_FUZZ_STATS.

Settings (environment): LORAPLEX_FUZZ_URL (the server), LORAPLEX_FUZZ_KEY (the tenant's
API key), LORAPLEX_PLUGIN_DIST (built components), LORAPLEX_FUZZ_STATS (output file),
LORAPLEX_FUZZ_HOSTILE (share of forward_backward requests given a hostile tensor).
"""

import collections
import glob
import math
import os
import re
import random as _random
import struct
import threading
import time

import requests
import schemathesis
from hypothesis import strategies as st

BASE = os.environ.get("LORAPLEX_FUZZ_URL", "http://127.0.0.1:8000")
KEY = os.environ.get("LORAPLEX_FUZZ_KEY", "tml-fuzz")
DIST = os.environ.get(
    "LORAPLEX_PLUGIN_DIST",
    os.path.join(os.path.dirname(__file__), "..", "..", "plugins", "dist"),
)
STATS = os.environ.get("LORAPLEX_FUZZ_STATS")
# Share of forward_backward requests that get a hostile tensor (0 while chasing other bugs).
HOSTILE = float(os.environ.get("LORAPLEX_FUZZ_HOSTILE", "0.25"))
# The hooks' own randomness: hypothesis owns the `random` module inside a test.
RNG = _random.Random()
VOCAB = 49152
# How often a request gets the fixtures' ids instead of generated ones.
SUBSTITUTE = 0.8
# Throwaway models, checkpoints and sessions made for destructive requests, at most.
BUDGET = 24

# --- protobuf by hand (src/api/proto.rs) ---------------------------------------------

DTYPES = {"unspecified": 0, "float32": 1, "int64": 2, "int32": 3, "bfloat16": 4}


def varint(n):
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def tag(field, wire):
    return varint(field << 3 | wire)


def f_varint(field, n):
    return tag(field, 0) + varint(int(n))


def f_bytes(field, b):
    return tag(field, 2) + varint(len(b)) + b


def f_str(field, s):
    return f_bytes(field, str(s).encode("utf-8", "surrogatepass"))


def f_double(field, x):
    return tag(field, 1) + struct.pack("<d", float(x))


def as_int(x):
    if isinstance(x, bool):
        return int(x)
    if isinstance(x, int):
        return x
    if isinstance(x, float) and math.isfinite(x):
        return int(x)
    return 0


def as_list(x):
    return x if isinstance(x, list) else []


def as_dict(x):
    return x if isinstance(x, dict) else {}


def signed(n, bits):
    n &= (1 << bits) - 1
    return n - (1 << bits) if n >> (bits - 1) else n


def f32(x):
    try:
        return struct.pack("<f", float(x))
    except (OverflowError, ValueError, TypeError):
        return struct.pack("<f", math.copysign(math.inf, float(x) if isinstance(x, (int, float)) else 1.0))


def pack_values(dtype, xs):
    xs = as_list(xs)
    if dtype == "int64":
        return b"".join(struct.pack("<q", signed(as_int(x), 64)) for x in xs)
    if dtype == "int32":
        return b"".join(struct.pack("<i", signed(as_int(x), 32)) for x in xs)
    if dtype == "bfloat16":
        return b"".join(f32(x)[2:] for x in xs)
    return b"".join(f32(x) for x in xs)


def pack_i64(xs):
    return b"".join(struct.pack("<q", signed(as_int(x), 64)) for x in as_list(xs))


def tensor(t):
    t = as_dict(t)
    dtype = t.get("dtype", "float32")
    out = b""
    if "dense" in t:
        out += f_bytes(1, pack_values(dtype, t["dense"]))
    if "sparse_csr" in t:
        c = as_dict(t["sparse_csr"])
        out += f_bytes(
            2,
            f_bytes(1, pack_values(dtype, c.get("values")))
            + f_bytes(2, pack_i64(c.get("crow_indices")))
            + f_bytes(3, pack_i64(c.get("col_indices"))),
        )
    out += f_varint(3, DTYPES.get(dtype, 0) if isinstance(dtype, str) else as_int(dtype))
    out += f_bytes(4, b"".join(varint(as_int(d)) for d in as_list(t.get("shape"))))
    return out


def chunk(c):
    c = as_dict(c)
    if "encoded_text" in c:
        toks = b"".join(struct.pack("<i", signed(as_int(x), 32)) for x in as_list(c["encoded_text"]))
        return f_bytes(1, f_bytes(1, toks))
    if "image" in c:
        return f_bytes(2, f_str(1, c["image"]))
    if "dmel" in c:
        return f_bytes(3, f_str(1, c["dmel"]))
    return b""


def datum(d):
    d = as_dict(d)
    out = b"".join(f_bytes(1, chunk(c)) for c in as_list(d.get("model_input")))
    for k, t in as_dict(d.get("loss_fn_inputs")).items():
        out += f_bytes(2, f_str(1, k) + f_bytes(2, tensor(t)))
    return out


def forward_backward_request(v):
    v = as_dict(v)
    out = b""
    if "model_id" in v:
        out += f_str(1, v["model_id"])
    if "seq_id" in v:
        out += f_varint(2, signed(as_int(v["seq_id"]), 32))
    for d in as_list(v.get("data")):
        out += f_bytes(3, datum(d))
    if "loss_fn" in v:
        out += f_str(4, v["loss_fn"])
    for k, x in as_dict(v.get("loss_fn_config")).items():
        x = x if isinstance(x, (int, float)) and not isinstance(x, bool) else 0.0
        out += f_bytes(5, f_str(1, k) + f_double(2, x))
    if v.get("forward_only"):
        out += f_varint(6, 1)
    for k, x in as_dict(v.get("loss_fn_config_v2")).items():
        x = as_dict(x)
        inner = b""
        if isinstance(x.get("number"), (int, float)) and not isinstance(x.get("number"), bool):
            inner = f_double(1, x["number"])
        elif "text" in x:
            inner = f_str(2, x["text"])
        out += f_bytes(7, f_str(1, k) + f_bytes(2, inner))
    return out


@schemathesis.serializer("application/x-protobuf")
def to_protobuf(ctx, value):
    try:
        data = forward_backward_request(value)
    except (TypeError, ValueError, OverflowError, struct.error):
        # Negative cases of the wrong shape entirely: their JSON text is garbage protobuf.
        data = repr(value).encode("utf-8", "surrogatepass")
    r = RNG.random()
    if r < 0.05 and data:
        data = data[: RNG.randrange(len(data))]
    elif r < 0.08 and data:
        b = bytearray(data)
        for _ in range(RNG.randint(1, 4)):
            b[RNG.randrange(len(b))] = RNG.randrange(256)
        data = bytes(b)
    return data


# --- wasm bodies -----------------------------------------------------------------------


def components():
    out = {}
    for p in sorted(glob.glob(os.path.join(DIST, "*.wasm"))):
        with open(p, "rb") as f:
            out[os.path.basename(p)[:-5]] = f.read()
    return out


COMPONENTS = components()
REAL = [b for n, b in sorted(COMPONENTS.items()) if not n.startswith("hostile")] or [b"\0asm"]


@st.composite
def wasm_body(draw):
    kind = draw(st.sampled_from(["real", "hostile", "truncated", "flipped", "garbage", "header"]))
    if kind == "real":
        return draw(st.sampled_from(REAL))
    if kind == "hostile":
        hostile = [b for n, b in COMPONENTS.items() if n.startswith("hostile")]
        return draw(st.sampled_from(hostile or REAL))
    base = draw(st.sampled_from(REAL))
    if kind == "truncated":
        return base[: draw(st.integers(0, len(base) - 1))]
    if kind == "flipped":
        b = bytearray(base)
        for _ in range(draw(st.integers(1, 8))):
            b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        return bytes(b)
    if kind == "header":
        return b"\0asm\x0d\0\x01\0" + draw(st.binary(max_size=256))
    return draw(st.binary(max_size=4096))


schemathesis.openapi.media_type("application/wasm", wasm_body())

# --- fixtures --------------------------------------------------------------------------


def api(method, path, body=None, raw=None, ctype="application/json"):
    headers = {"X-API-Key": KEY}
    for _ in range(50):
        if raw is not None:
            headers["Content-Type"] = ctype
            r = requests.request(method, BASE + path, data=raw, headers=headers, timeout=120)
        else:
            r = requests.request(method, BASE + path, json=body, headers=headers, timeout=120)
        if r.status_code != 429:
            break
        # The tenant's rate limit or a full queue, shared with the fuzzer's own requests.
        time.sleep(min(float(r.headers.get("retry-after", "1")), 2.0))
    if r.status_code >= 300:
        raise RuntimeError(f"fixture {method} {path}: {r.status_code} {r.text[:300]}")
    return r.json() if r.headers.get("content-type", "").startswith("application/json") else r.content


def wait(request_id):
    for _ in range(600):
        r = api("POST", "/api/v1/retrieve_future", {"request_id": request_id})
        if isinstance(r, dict) and r.get("type") == "try_again":
            continue
        if isinstance(r, dict) and "error" in r:
            raise RuntimeError(f"fixture future {request_id} failed: {r}")
        return r
    raise RuntimeError(f"fixture future {request_id} never finished")


class Fixtures:
    def __init__(self):
        caps = api("GET", "/api/v1/get_server_capabilities")
        self.base = caps["supported_models"][0]["model_name"]
        self.session = api("POST", "/api/v1/create_session", {})["session_id"]
        self.model_seqs = 0
        self.model = self.new_model()
        self.seq = 1
        self.free = []
        self.save(self.model, "weights", "fuzz-w")
        self.save(self.model, "sampler_weights", "fuzz-s")
        self.sampler = api(
            "POST",
            "/api/v1/create_sampling_session",
            {"session_id": self.session, "sampling_session_seq_id": 0, "base_model": self.base},
        )["sampling_session_id"]
        self.plugins = {}
        for name in ("ppo-clip", "min-p"):
            if name in COMPONENTS:
                r = api("POST", "/api/v1/plugins", raw=COMPONENTS[name], ctype="application/wasm")
                self.plugins[name] = r["plugin_id"]
        self.rest_model = api("POST", "/add_lora", {"rank": 1})["model_id"]
        self.futures = collections.deque(maxlen=64)
        self.budget = collections.Counter()

    def new_model(self):
        n = self.model_seqs
        self.model_seqs += 1
        r = api(
            "POST",
            "/api/v1/create_model",
            {
                "session_id": self.session,
                "model_seq_id": n,
                "base_model": self.base,
                "lora_config": {"rank": 1, "train_unembed": False},
            },
        )
        wait(r["request_id"])
        return r["model_id"]

    def next_seq(self):
        with LOCK:
            if self.free:
                self.free.sort()
                return self.free.pop(0)
            self.seq += 1
            return self.seq - 1

    def save(self, model, kind, name):
        path = "/api/v1/save_weights" if kind == "weights" else "/api/v1/save_weights_for_sampler"
        seq = self.next_seq() if model == self.model else 1
        try:
            r = api("POST", path, {"model_id": model, "path": name, "seq_id": seq, "overwrite": True})
        except (RuntimeError, requests.RequestException):
            with LOCK:
                self.free.append(seq)
            raise
        wait(r["request_id"])

    def spend(self, what):
        with LOCK:
            if self.budget[what] >= BUDGET:
                return False
            self.budget[what] += 1
            return True


LOCK = threading.Lock()
FX = None
FX_LOCK = threading.Lock()


def fixtures():
    global FX
    with FX_LOCK:
        if FX is None:
            FX = Fixtures()
        return FX


# --- requests --------------------------------------------------------------------------

HOSTILE_TENSORS = [
    # The 100-byte request of issue 12: 2^40 zeros from nothing.
    {"dtype": "float32", "shape": [1, 2**40], "sparse_csr": {"crow_indices": [0, 0], "col_indices": [], "values": []}},
    {"dtype": "int64", "shape": [1, 2**40], "sparse_csr": {"crow_indices": [0, 0], "col_indices": [], "values": []}},
    {"dtype": "int32", "shape": [1, 2**62], "sparse_csr": {"crow_indices": [0, 0], "col_indices": [], "values": []}},
    {"dtype": "float32", "shape": [1, 2**63 - 1], "sparse_csr": {"crow_indices": [0, 1], "col_indices": [2**40], "values": [1.0]}},
    {"dtype": "float32", "shape": [2**32, 2**32], "dense": []},
    {"dtype": "int64", "shape": [2**62, 4], "dense": []},
    {"dtype": "float32", "shape": [-1], "dense": [1.0]},
    {"dtype": "float32", "shape": [2**33], "dense": [1.0, 2.0]},
    {"dtype": "bfloat16", "shape": [2], "dense": [1.0, 2.0]},
    {"dtype": "float32", "shape": [3, 2**40], "sparse_csr": {"crow_indices": [0, 0, 0, 0], "col_indices": [], "values": []}},
]


def tokens(n):
    return [RNG.randrange(VOCAB) for _ in range(n)]


def valid_datum():
    n = RNG.randint(2, 24)
    return {
        "model_input": [{"encoded_text": tokens(n)}],
        "loss_fn_inputs": {
            "target_tokens": {"dtype": "int64", "shape": [n], "dense": tokens(n)},
            "weights": {"dtype": "float32", "shape": [n], "dense": [1.0] * n},
        },
    }


def clamp_tokens(xs, most=48):
    return [as_int(x) % VOCAB for x in as_list(xs)[:most]]


def clamp_sampling(body):
    sp = body.get("sampling_params")
    if not isinstance(sp, dict):
        sp = {}
        body["sampling_params"] = sp
    mt = sp.get("max_tokens")
    if not isinstance(mt, int) or isinstance(mt, bool) or mt > 8 or mt < 1:
        sp["max_tokens"] = RNG.randint(1, 8)
    for k in ("num_samples",):
        if isinstance(body.get(k), int) and body[k] > 2:
            body[k] = RNG.randint(1, 2)
    for k in ("topk_prompt_logprobs", "topk_sample_logprobs"):
        if isinstance(body.get(k), int) and body[k] > 5:
            body[k] = 5


def throwaway_session():
    return api("POST", "/api/v1/create_session", {})["session_id"]


def substitute(case, fx):
    path, method = case.operation.path, case.operation.method.lower()
    body = case.body if isinstance(case.body, dict) else None
    pp = case.path_parameters if isinstance(case.path_parameters, dict) else None
    rest = not path.startswith("/api/v1/") or path in (
        "/api/v1/add_lora_async", "/api/v1/fwdbwd_async", "/api/v1/optim_step_async",
        "/api/v1/remove_lora", "/api/v1/sample", "/api/v1/sample_async",
    )
    if pp is not None:
        if "token" in pp and RNG.random() < 0.7:
            # A real signed link of a fixture checkpoint (the fuzzer cannot forge one).
            try:
                urls = api("GET", f"/api/v1/training_runs/{fx.model}/checkpoints/weights/fuzz-w/external_weights_urls")
                url = RNG.choice(list(urls["urls"].values()))
                pp["token"], pp["file"] = url.split("/api/v1/download/", 1)[1].split("/", 1)
            except (RuntimeError, requests.RequestException, KeyError, IndexError, ValueError):
                pass
        if "id" in pp:
            if path.startswith("/api/v1/sessions/"):
                pp["id"] = throwaway_session() if path.endswith("/finish") else fx.session
            elif path.startswith("/api/v1/training_runs/"):
                pp["id"] = fx.model
            elif path.startswith("/api/v1/samplers/"):
                pp["id"] = fx.sampler
            elif path.startswith("/api/v1/plugins/") and fx.plugins:
                pp["id"] = RNG.choice(list(fx.plugins.values()))
        if "kind" in pp:
            pp["kind"], pp["name"] = RNG.choice([("weights", "fuzz-w"), ("sampler_weights", "fuzz-s")])
            if method == "delete":
                if fx.spend("checkpoint"):
                    name = f"fz-del-{RNG.randrange(1 << 30)}"
                    fx.save(fx.model, "weights", name)
                    pp["kind"], pp["name"] = "weights", name
                else:
                    pp["name"] = f"fz-gone-{RNG.randrange(1 << 30)}"
    if body is None:
        return
    if path == "/api/v1/forward_backward":
        body["model_id"] = fx.model
        body["seq_id"] = fx.next_seq()
        data = [d for d in as_list(body.get("data"))[:2]]
        for d in data:
            if isinstance(d, dict):
                for c in as_list(d.get("model_input"))[:4]:
                    if isinstance(c, dict) and "encoded_text" in c:
                        c["encoded_text"] = clamp_tokens(c["encoded_text"])
        if RNG.random() < 0.4:
            data = [valid_datum() for _ in range(RNG.randint(1, 2))]
            body["loss_fn"] = "cross_entropy"
        body["data"] = data
        if RNG.random() < 0.1 and "ppo-clip" in fx.plugins:
            body["loss_fn"] = "plugin:" + fx.plugins["ppo-clip"]
        return
    if "session_id" in body or path in ("/api/v1/create_model", "/api/v1/create_sampling_session"):
        body["session_id"] = fx.session
    if "base_model" in body or path == "/api/v1/create_model":
        body["base_model"] = fx.base
    if path == "/api/v1/create_model":
        if fx.spend("model"):
            with LOCK:
                body["model_seq_id"] = fx.model_seqs
                fx.model_seqs += 1
            lc = body.get("lora_config")
            lc = lc if isinstance(lc, dict) else {}
            lc["rank"] = RNG.randint(1, 2)
            lc["train_unembed"] = False
            body["lora_config"] = lc
        else:
            body["session_id"] = f"session-gone-{RNG.randrange(1 << 30)}"
        return
    if path == "/api/v1/load_weights":
        body["path"] = RNG.choice([f"tinker://{fx.model}/weights/fuzz-w", f"tinker://{fx.model}/sampler_weights/fuzz-s"])
        if RNG.random() < 0.3:
            # A new model from the checkpoint.
            body.pop("model_id", None)
            body.pop("seq_id", None)
            body["session_id"] = fx.session
            if fx.spend("model"):
                with LOCK:
                    body["model_seq_id"] = fx.model_seqs
                    fx.model_seqs += 1
            else:
                body["session_id"] = f"session-gone-{RNG.randrange(1 << 30)}"
                body["model_seq_id"] = 0
            return
        body.pop("session_id", None)
        body.pop("model_seq_id", None)
        body["model_id"] = fx.model
        body["seq_id"] = fx.next_seq()
        return
    if path in ("/api/v1/unload_model", "/remove_lora", "/api/v1/remove_lora"):
        if fx.spend("unload"):
            body["model_id"] = fx.new_model() if path == "/api/v1/unload_model" else api("POST", "/add_lora", {"rank": 1})["model_id"]
        return
    if path == "/api/v1/sessions/{id}/finish":
        return
    if path == "/api/v1/copy_weights":
        body["source_path"] = RNG.choice([f"tinker://{fx.model}/weights/fuzz-w", f"tinker://{fx.model}/sampler_weights/fuzz-s"])
        body["ttl_seconds"] = None
        if not fx.spend("copy"):
            body["source_path"] = f"tinker://model-gone-{RNG.randrange(1 << 30)}/weights/x"
        elif RNG.random() < 0.7:
            body.pop("session_id", None)
            body.pop("model_seq_id", None)
            body["destination_project_id"] = "fuzz"
        return
    if "model_id" in body or path in ("/fwdbwd", "/optim_step", "/api/v1/get_info", "/api/v1/optim_step",
                                      "/api/v1/save_weights", "/api/v1/save_weights_for_sampler",
                                      "/api/v1/fwdbwd_async", "/api/v1/optim_step_async"):
        if path in ("/api/v1/sample", "/api/v1/sample_async"):
            body["model_id"] = RNG.choice([fx.rest_model, fx.base])
        else:
            body["model_id"] = fx.rest_model if rest else fx.model
    if not rest and "model_id" in body and body.get("model_id") == fx.model and (
        "seq_id" in body or path.startswith("/api/v1/save_weights") or path == "/api/v1/optim_step"
    ):
        body["seq_id"] = fx.next_seq()
    if path.startswith("/api/v1/save_weights"):
        if isinstance(body.get("path"), str) or RNG.random() < 0.7:
            # A few fixed names, replaced: files stay few.
            body["path"] = RNG.choice(["fuzz-w", "fuzz-x", "fuzz-y"])
            body["overwrite"] = True
        body["ttl_seconds"] = None
    if "tinker_path" in body:
        body["tinker_path"] = RNG.choice([f"tinker://{fx.model}/weights/fuzz-w", f"tinker://{fx.model}/sampler_weights/fuzz-s"])
    if "model_path" in body and body.get("model_path") is not None:
        body["model_path"] = f"tinker://{fx.model}/sampler_weights/fuzz-s"
    if "sampling_session_id" in body or path == "/api/v1/asample":
        body["sampling_session_id"] = fx.sampler
    if "request_id" in body:
        with LOCK:
            if fx.futures:
                body["request_id"] = RNG.choice(list(fx.futures))
    if path == "/api/v1/asample":
        p = body.get("prompt")
        if isinstance(p, dict):
            for c in as_list(p.get("chunks"))[:4]:
                if isinstance(c, dict) and "tokens" in c:
                    c["tokens"] = clamp_tokens(c["tokens"], 32)
    if path in ("/fwdbwd", "/api/v1/fwdbwd_async"):
        convs = as_list(body.get("data"))[:2]
        for conv in convs:
            for m in as_list(conv)[:6]:
                if isinstance(m, dict) and isinstance(m.get("content"), str):
                    m["content"] = m["content"][:200]
        if RNG.random() < 0.4:
            convs = [[{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]]
        body["data"] = convs
    if path in ("/api/v1/sample", "/api/v1/sample_async"):
        body["prompts"] = [p[:200] if isinstance(p, str) else p for p in as_list(body.get("prompts"))[:2]]
        s = body.get("sampler")
        if isinstance(s, dict) and "min-p" in fx.plugins:
            s["plugin"] = fx.plugins["min-p"]
    if path in ("/add_lora", "/api/v1/add_lora_async"):
        if fx.spend("rest_model"):
            body["rank"] = RNG.randint(1, 2)
        else:
            body["base_model"] = "not-served"
        return


def clamp(case):
    """Sizes that cost only time, clamped on every request (substituted or not)."""
    body = case.body if isinstance(case.body, dict) else None
    path = case.operation.path
    if body is None:
        return
    if path in ("/api/v1/asample", "/api/v1/sample", "/api/v1/sample_async"):
        clamp_sampling(body)
    if path in ("/api/v1/sample", "/api/v1/sample_async"):
        body["prompts"] = [p[:200] if isinstance(p, str) else p for p in as_list(body.get("prompts"))[:2]] or body.get("prompts")
    if path in ("/add_lora", "/api/v1/add_lora_async", "/api/v1/create_model", "/api/v1/load_weights"):
        # Every valid one holds a model in memory for the rest of the run.
        if path.endswith("add_lora") or path.endswith("add_lora_async"):
            if isinstance(body.get("rank"), int) and not isinstance(body.get("rank"), bool) and body["rank"] > 2:
                body["rank"] = 2
        lc = body.get("lora_config")
        if isinstance(lc, dict) and isinstance(lc.get("rank"), int) and not isinstance(lc.get("rank"), bool) and lc["rank"] > 2:
            lc["rank"] = 2
    if path == "/api/v1/forward_backward":
        for d in as_list(body.get("data"))[:8]:
            if isinstance(d, dict):
                for c in as_list(d.get("model_input")):
                    if isinstance(c, dict) and isinstance(c.get("encoded_text"), list):
                        c["encoded_text"] = c["encoded_text"][:64]
        if RNG.random() < HOSTILE:
            t = RNG.choice(HOSTILE_TENSORS)
            name = RNG.choice(["target_tokens", "weights", "advantages", "logprobs"])
            n = RNG.randint(1, 8)
            hostile = {"model_input": [{"encoded_text": tokens(n)}], "loss_fn_inputs": {name: t}}
            body["data"] = as_list(body.get("data"))[:1] + [hostile]


# Which fixture seq_id each request in flight carries (a Case has no room for more).
SEQS = {}


def gone(kind):
    return f"{kind}-gone-{RNG.randrange(1 << 30)}"


def protect(case, fx):
    """Keep the fixtures alive: requests that would end or expire them (with ids the fuzzer
    learned from earlier answers, or that the substitution put there) get other targets."""
    path, method = case.operation.path, case.operation.method.lower()
    pp = case.path_parameters if isinstance(case.path_parameters, dict) else {}
    body = case.body if isinstance(case.body, dict) else {}
    if path == "/api/v1/sessions/{id}/finish" and pp.get("id") == fx.session:
        pp["id"] = gone("session")
    if path in ("/api/v1/unload_model", "/remove_lora", "/api/v1/remove_lora") and body.get("model_id") in (
        fx.model,
        fx.rest_model,
    ):
        body["model_id"] = gone("model")
    if "{kind}" in path and pp.get("name") in ("fuzz-w", "fuzz-s"):
        if method == "delete":
            pp["name"] = gone("checkpoint")
        if path.endswith("/ttl") and isinstance(body.get("ttl_seconds"), int) and body["ttl_seconds"] < 3600:
            body["ttl_seconds"] = None
    if path.startswith("/api/v1/save_weights") and body.get("path") in ("fuzz-w", "fuzz-s"):
        body["ttl_seconds"] = None


@schemathesis.hook
def before_call(context, case, kwargs):
    fx = fixtures()
    if RNG.random() < SUBSTITUTE:
        try:
            substitute(case, fx)
        except (RuntimeError, requests.RequestException) as e:
            # A throwaway target could not be made (e.g. a full queue): send as generated.
            print(f"hooks: no substitution for {case.operation.path}: {e}", flush=True)
    elif isinstance(case.body, dict) and case.body.get("model_id") == fx.model:
        # The fixture model's seq_ids are the hooks' to hand out.
        case.body["model_id"] = gone("model")
    protect(case, fx)
    clamp(case)
    body = case.body if isinstance(case.body, dict) else {}
    seq = body.get("seq_id")
    if body.get("model_id") == fx.model and isinstance(seq, int) and not isinstance(seq, bool):
        with LOCK:
            SEQS[id(case)] = seq


STATS_LOCK = threading.Lock()
STATS_FILE = open(STATS, "a", buffering=1) if STATS else None


@schemathesis.hook
def after_call(context, case, response):
    fx = fixtures()
    status = response.status_code
    with LOCK:
        seq = SEQS.pop(id(case), None)
        if seq is not None and status != 200:
            # Refused before it reached the model's queue: the seq_id is still free.
            fx.free.append(seq)
    ctype = (response.headers.get("content-type") or [""])[0]
    if status == 400 and seq is not None:
        # The model's queue moved past our counter (a gap timed out): catch up.
        try:
            msg = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = ""
        m = re.search(r"next expected seq_id (\d+)", msg)
        if m:
            with LOCK:
                fx.seq = max(fx.seq, int(m.group(1)))
                fx.free = [q for q in fx.free if q >= fx.seq]
    if status == 200 and ctype.startswith("application/json"):
        try:
            v = response.json()
        except ValueError:
            v = None
        rid = v.get("request_id") if isinstance(v, dict) else None
        if isinstance(rid, str):
            with LOCK:
                fx.futures.append(rid)
    op = case.operation
    if op.path == "/api/v1/plugins/{id}" and op.method.lower() == "delete" and status == 200:
        # Put the plugin back, so later requests can still name it.
        for name in ("ppo-clip", "min-p"):
            if name in COMPONENTS:
                try:
                    api("POST", "/api/v1/plugins", raw=COMPONENTS[name], ctype="application/wasm")
                except (RuntimeError, requests.RequestException) as e:
                    print(f"hooks: cannot upload {name} again: {e}", flush=True)
    if STATS_FILE is not None:
        with STATS_LOCK:
            STATS_FILE.write(f"{op.method.upper()} {op.path} {status}\n")
