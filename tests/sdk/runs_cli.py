"""Training runs that outlive their sessions, through the official tinker SDK, unchanged.

Run by tests/runs_cli.rs against a real `loraplex serve`, in two phases around a restart:

  runs_cli.py train          train a run with user_metadata, end its session, check that the
                             run, its checkpoints and its metadata are still described and
                             loadable; publish / unpublish / copy with a second tenant;
                             download an external-weights checkpoint through signed links
  runs_cli.py after_restart  the same run, after the server restarted

LORAPLEX_URL is the server, LORAPLEX_STATE a JSON file the phases share with the Rust test.
The cookbook's own `checkpoint_utils.get_renderer_name_from_checkpoint` is used when
tinker_cookbook imports (tests/runs_cli.rs puts LORAPLEX_COOKBOOK_SRC on PYTHONPATH);
otherwise the same SDK call it makes.
"""

import json
import os
import struct
import sys
import urllib.error
import urllib.request

import numpy as np
import tinker
from tinker import types

URL = os.environ["LORAPLEX_URL"]
STATE = os.environ["LORAPLEX_STATE"]
BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
ALICE = "tml-runs-alice"
BOB = "tml-runs-bob"
META = {"renderer_name": "role_colon"}
TOKENS = [504, 2365, 314, 260, 1345, 28, 2365, 314, 260, 6152, 30, 378]


def datum():
    n = len(TOKENS) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:n]),
        loss_fn_inputs={
            "target_tokens": np.array(TOKENS[1:], dtype=np.int64),
            "weights": np.ones(n, np.float32),
        },
    )


def loss_of(tc):
    return tc.forward([datum()], "cross_entropy").result().metrics["loss:sum"]


def service(key, **kw):
    return tinker.ServiceClient(base_url=URL, api_key=key, **kw)


def rest(key):
    return tinker.RestClient(base_url=URL, api_key=key)


def not_found(call):
    try:
        call()
    except tinker.NotFoundError:
        return True
    except Exception as e:  # the SDK may wrap it
        return "404" in str(e) or "not found" in str(e)
    return False


def renderer_name(path):
    """What the cookbook reads back on every resume."""
    sc = service(ALICE)
    try:
        from tinker_cookbook import checkpoint_utils

        name = checkpoint_utils.get_renderer_name_from_checkpoint(sc, path)
        how = "tinker_cookbook.checkpoint_utils"
    except ImportError:
        run = rest(ALICE).get_training_run_by_tinker_path(path).result()
        name = (run.user_metadata or {}).get("renderer_name")
        how = "the SDK call the cookbook makes"
    sc.close("success").result()
    print(f"renderer_name {name!r} via {how}")
    return name


def check_run(run, session, p_w, p_s, loss):
    """Everything the unloaded run still answers."""
    rc = rest(ALICE)
    r = rc.get_training_run(run).result()
    assert r.user_metadata == META, r
    assert r.lora_rank == 2 and r.last_checkpoint.tinker_path == p_w, r
    assert r.last_sampler_checkpoint.tinker_path == p_s, r
    assert rc.get_training_run_by_tinker_path(p_w).result().training_run_id == run
    runs = rc.list_training_runs(limit=100).result()
    assert run in [x.training_run_id for x in runs.training_runs], runs
    cks = rc.list_checkpoints(run).result().checkpoints
    assert [c.tinker_path for c in cks] == [p_s, p_w], "newest first"
    s = rc.get_session(session).result()
    assert s.training_run_ids == [run] and s.user_metadata == {"purpose": "nightly"}, s
    assert session in rc.list_sessions(limit=100).result().sessions
    assert renderer_name(p_w) == "role_colon"
    # Its checkpoints start new runs and sample.
    sc = service(ALICE)
    tc = sc.create_training_client_from_state_with_optimizer(
        p_w, user_metadata={"renderer_name": "again"}
    ).result()
    again = loss_of(tc)
    assert abs(again - loss) < 1e-4 * max(1.0, abs(loss)), (again, loss)
    assert rc.get_training_run(tc.model_id).result().user_metadata == {"renderer_name": "again"}
    sampler = sc.create_sampling_client(model_path=p_s)
    out = sampler.sample(
        types.ModelInput.from_ints(TOKENS[:4]), 1, types.SamplingParams(max_tokens=3)
    ).result()
    assert len(out.sequences[0].tokens) >= 1
    return sc, tc


def fetch(url):
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.status, r.read()


def train():
    sc = service(ALICE, user_metadata={"purpose": "nightly"})
    tc = sc.create_lora_training_client(base_model=BASE, rank=2, user_metadata=META).result()
    run = tc.model_id
    session = run.split(":train:")[0]
    tc.forward_backward([datum()], "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=0.05)).result()
    p_w = tc.save_state("step-1").result().path
    p_s = tc.save_weights_for_sampler("s-1").result().path
    loss = loss_of(tc)
    rc = rest(ALICE)
    assert rc.get_training_run(run).result().user_metadata == META, "while loaded"
    assert renderer_name(p_w) == "role_colon"
    sc.close("success").result()  # the session ends; the run is unloaded

    sc2, tc2 = check_run(run, session, p_w, p_s, loss)

    # Another tenant: nothing until published, then read-only.
    rb = rest(BOB)
    sb = service(BOB)
    assert not_found(lambda: rb.get_training_run(run).result())
    assert not_found(lambda: sb.create_sampling_client(model_path=p_s).sample(
        types.ModelInput.from_ints(TOKENS[:4]), 1, types.SamplingParams(max_tokens=2)).result())
    assert not_found(lambda: sb.create_training_client_from_state(p_w).result())
    rc.publish_checkpoint_from_tinker_path(p_w).result()
    rc.publish_checkpoint_from_tinker_path(p_s).result()
    tb = sb.create_training_client_from_state(p_w).result()
    assert abs(loss_of(tb) - loss) < 1e-4 * max(1.0, abs(loss))
    sb.create_sampling_client(model_path=p_s).sample(
        types.ModelInput.from_ints(TOKENS[:4]), 1, types.SamplingParams(max_tokens=2)
    ).result()
    assert rb.get_training_run(run, access_scope="accessible").result().training_run_id == run
    assert not_found(lambda: rb.delete_checkpoint_from_tinker_path(p_w).result())
    assert not_found(lambda: rb.set_checkpoint_ttl_from_tinker_path(p_w, 3600).result())
    assert not_found(lambda: rb.unpublish_checkpoint_from_tinker_path(p_w).result())
    copy = rb.copy_weights(p_w, destination_project_id="archive").result()
    assert copy != p_w and copy.endswith("/weights/step-1"), copy
    rc.unpublish_checkpoint_from_tinker_path(p_w).result()
    rc.unpublish_checkpoint_from_tinker_path(p_s).result()
    assert not_found(lambda: rb.get_weights_info_by_tinker_path(p_w).result())
    assert not_found(lambda: sb.create_training_client_from_state(p_w).result())
    assert rb.get_weights_info_by_tinker_path(copy).result().lora_rank == 2
    mine = [c.tinker_path for c in rb.list_user_checkpoints().result().checkpoints]
    assert mine == [copy], mine
    sb.close("success").result()

    # External weights through signed links: the owner mints them, a plain GET fetches.
    ext = tc2.save_weights_external("final").result().path
    assert ext.endswith("/external_weights/final"), ext
    urls = rc.get_external_weights_urls(ext).result()
    assert set(urls.urls) == {"adapter_config.json", "adapter_model.safetensors"}
    status, cfg = fetch(urls.urls["adapter_config.json"])
    cfg = json.loads(cfg)
    assert status == 200 and cfg["r"] == 2 and cfg["peft_type"] == "LORA", cfg
    status, st = fetch(urls.urls["adapter_model.safetensors"])
    (n,) = struct.unpack("<Q", st[:8])
    names = json.loads(st[8 : 8 + n])
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names
    bad = urls.urls["adapter_config.json"].replace("/download/", "/download/9", 1)
    try:
        fetch(bad)
        raise AssertionError("a tampered link was served")
    except urllib.error.HTTPError as e:
        assert e.code == 403, e.code
    assert not_found(lambda: rb.get_external_weights_urls(ext).result())
    sc2.close("success").result()

    with open(STATE, "w") as f:
        json.dump(
            {"run": run, "session": session, "weights": p_w, "sampler": p_s, "loss": loss,
             "copy": copy, "external": ext},
            f,
        )
    print("train phase ok")


def after_restart():
    st = json.load(open(STATE))
    sc, _ = check_run(st["run"], st["session"], st["weights"], st["sampler"], st["loss"])
    sc.close("success").result()
    mine = [c.tinker_path for c in rest(BOB).list_user_checkpoints().result().checkpoints]
    assert mine == [st["copy"]], mine
    print("after_restart phase ok")


if __name__ == "__main__":
    {"train": train, "after_restart": after_restart}[sys.argv[1]]()
