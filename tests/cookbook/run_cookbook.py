"""tinker-cookbook 0.6.1's own training loops, unchanged, against a real `loraplex serve`.

Run by tests/cookbook.rs. Each phase calls the cookbook's own `main` with a config a user
would write for a small local run: a tiny dataset written here, the tokenizer exported from
the served GGUF (`loraplex export-hf --tokenizer-only`, placed in a Hugging Face cache that
is used offline), and the renderer for SmolLM2 passed explicitly (its chat template is
ChatML, which the cookbook's `qwen3_instruct` renderer writes token for token). Phases:

- `sl`: supervised.train for 6 steps with an evaluator and checkpoints every 3 steps; the
  loss must fall. Then a resume as after a crash at step 3: the cookbook reads the
  renderer back from the run's user_metadata, reloads weights and optimizer state, and its
  resumed step-3 loss equals that batch's loss under the checkpoint's weights. The final
  sampler checkpoint samples through the cookbook's message completer.
- `rl-sync`: rl.train in its synchronous configuration (default loss, importance_sampling)
  on the cookbook's arithmetic environment.
- `rl-async`: rl.train with AsyncConfig (its default loss, stable_reinforce, which needs
  sampling with record_stability_info and provenance spans).
- `dpo`: preference.train_dpo on a local comparisons file (forward_backward_custom).

Every phase asserts that it finished, that its losses are finite, and that the checkpoints
it wrote are listed by the server and loadable. Environment: LORAPLEX_URL, TINKER_API_KEY,
HF_HOME (the offline cache), LORAPLEX_COOKBOOK_WORK (a scratch directory).
"""

import asyncio
import json
import math
import os
import sys

import chz
import tinker

URL = os.environ["LORAPLEX_URL"]
MODEL = os.environ.get("LORAPLEX_MODEL_NAME", "HuggingFaceTB/SmolLM2-135M-Instruct")
RENDERER = "qwen3_instruct"
WORK = os.environ["LORAPLEX_COOKBOOK_WORK"]


def log(*a):
    print("[cookbook]", *a, flush=True)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def finite_values(rows, key):
    vals = [r[key] for r in rows if key in r]
    assert vals, f"no {key!r} in {rows[:2]}"
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals), (key, vals)
    return vals


def check_checkpoints(log_path, service):
    """The run's checkpoints.jsonl entries are listed by the server and loadable."""
    rows = read_jsonl(os.path.join(log_path, "checkpoints.jsonl"))
    assert rows, "no checkpoints written"
    rest = service.create_rest_client()
    for row in rows:
        for key in ("state_path", "sampler_path"):
            path = row.get(key)
            if path:
                info = rest.get_weights_info_by_tinker_path(path).result()
                assert info.base_model == MODEL, info
    sampler = [r["sampler_path"] for r in rows if r.get("sampler_path")]
    if sampler:
        sc = service.create_sampling_client(model_path=sampler[-1])
        prompt = tinker.ModelInput.from_ints([1, 4093, 198])
        out = sc.sample(prompt, 1, tinker.SamplingParams(max_tokens=4)).result()
        assert len(out.sequences[0].tokens) > 0
    return rows


# --- supervised -------------------------------------------------------------------------

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow", "pig", "hen"]


def write_conversations(path):
    with open(path, "w") as f:
        for i, (c, a) in enumerate(zip(COLOURS, ANIMALS)):
            for q, ans in [
                (f"What colour is the {a}?", f"The {a} is {c}."),
                (f"Which animal is {c}?", f"The {c} animal is the {a}."),
            ]:
                msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]
                f.write(json.dumps({"messages": msgs}) + "\n")


def sl_config(log_path, data, max_steps):
    from tinker_cookbook.renderers import TrainOnWhat
    from tinker_cookbook.supervised import train
    from tinker_cookbook.supervised.data import FromConversationFileBuilder
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    common = ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=MODEL,
        renderer_name=RENDERER,
        max_length=128,
        batch_size=4,
        train_on_what=TrainOnWhat.ALL_ASSISTANT_MESSAGES,
    )
    return train.Config(
        log_path=log_path,
        model_name=MODEL,
        recipe_name="loraplex_ci_sl",
        renderer_name=RENDERER,
        dataset_builder=FromConversationFileBuilder(
            common_config=common, file_path=data, test_size=4
        ),
        learning_rate=2e-3,
        lr_schedule="constant",
        num_epochs=4,
        lora_rank=8,
        base_url=URL,
        save_every=3,
        eval_every=3,
        max_steps=max_steps,
    )


def phase_sl(service):
    from tinker_cookbook import checkpoint_utils, completers, renderers
    from tinker_cookbook.supervised import train
    from tinker_cookbook.supervised.common import compute_mean_nll
    from tinker_cookbook.tokenizer_utils import get_tokenizer

    data = os.path.join(WORK, "conversations.jsonl")
    write_conversations(data)
    log_path = os.path.join(WORK, "sl")
    asyncio.run(train.main(sl_config(log_path, data, 6)))
    metrics = read_jsonl(os.path.join(log_path, "metrics.jsonl"))
    nll = finite_values(metrics, "train_mean_nll")
    log("sl train_mean_nll", [round(v, 4) for v in nll])
    assert len(nll) == 6, nll
    assert nll[-1] < nll[0], f"supervised loss did not fall: {nll}"
    evals = [k for r in metrics for k in r if k.startswith("test/") or "eval" in k]
    assert evals, f"no evaluator metrics in {metrics[-1].keys()}"
    rows = check_checkpoints(log_path, service)
    # The renderer is read back from the run (user_metadata), as on every resume.
    state = rows[-1]["state_path"]
    assert (
        checkpoint_utils.get_renderer_name_from_checkpoint(service, state) == RENDERER
    ), "the renderer did not round-trip through user_metadata"

    # Resume as after a crash: the run's log ends at its periodic checkpoint "000003" and
    # the same command runs again. The cookbook reads the renderer back, reloads weights and
    # optimizer state and goes on from that record's loop state (epoch 1, batch 0). The
    # checkpoint was saved after the steps submitted before it (the cookbook pipelines), so
    # the resumed step-3 loss is not the first run's; it must be the loss of that batch
    # under the checkpoint's weights, computed here through a client of our own.
    ckpt_file = os.path.join(log_path, "checkpoints.jsonl")
    assert rows[0]["name"] == "000003" and rows[0]["epoch"] == 1 and rows[0]["batch"] == 0, rows[0]
    with open(ckpt_file, "w") as f:
        f.write(json.dumps(rows[0]) + "\n")
    asyncio.run(train.main(sl_config(log_path, data, 6)))
    metrics = read_jsonl(os.path.join(log_path, "metrics.jsonl"))
    again = {r["step"]: r["train_mean_nll"] for r in metrics if "train_mean_nll" in r}
    log("sl after resume", {k: round(v, 5) for k, v in again.items()})
    assert sorted(again) == list(range(6)), again
    dataset, _ = sl_config(log_path, data, 6).dataset_builder()
    dataset.set_epoch(seed=1)
    batch = dataset.get_batch(0)
    tc = service.create_training_client_from_state(rows[0]["state_path"])
    out = tc.forward(batch, "cross_entropy").result()
    expected = compute_mean_nll(
        [x["logprobs"] for x in out.loss_fn_outputs], [d.loss_fn_inputs["weights"] for d in batch]
    )
    log("sl step 3 resumed", again[3], "under checkpoint 000003", expected)
    assert abs(again[3] - expected) <= 1e-4 * max(1.0, abs(expected)), (again[3], expected)
    rows = check_checkpoints(log_path, service)

    # The final sampler checkpoint answers through the cookbook's message completer.
    final = [r for r in rows if r.get("sampler_path")][-1]["sampler_path"]
    tokenizer = get_tokenizer(MODEL)
    renderer = renderers.get_renderer(RENDERER, tokenizer)
    sc = service.create_sampling_client(model_path=final)
    completer = completers.TinkerMessageCompleter(sc, renderer, max_tokens=12)
    reply = asyncio.run(completer([{"role": "user", "content": "What colour is the cat?"}]))
    log("sl completion", reply)
    assert reply["role"] == "assistant" and isinstance(reply["content"], (str, list))


# --- reinforcement learning ----------------------------------------------------------------


def rl_config(log_path, async_config=None):
    from tinker_cookbook.recipes.math_rl.arithmetic_env import ArithmeticDatasetBuilder
    from tinker_cookbook.rl import train

    return train.Config(
        model_name=MODEL,
        recipe_name="loraplex_ci_rl",
        renderer_name=RENDERER,
        log_path=log_path,
        dataset_builder=ArithmeticDatasetBuilder(
            batch_size=2,
            group_size=4,
            model_name_for_tokenizer=MODEL,
            renderer_name=RENDERER,
            n_batches=3,
        ),
        learning_rate=1e-4,
        max_tokens=6,
        lora_rank=8,
        base_url=URL,
        eval_every=0,
        save_every=2,
        async_config=async_config,
    )


def check_rl(log_path, service, loss_name):
    metrics = read_jsonl(os.path.join(log_path, "metrics.jsonl"))
    assert len(metrics) >= 2, f"{len(metrics)} RL steps logged"
    keys = sorted({k for r in metrics for k in r})
    losses = [k for k in keys if k.startswith("optim/") or "loss" in k]
    log(loss_name, "metric keys", [k for k in keys if "loss" in k or "kl" in k][:12])
    for k in losses:
        finite_values(metrics, k)
    rewards = finite_values(metrics, "env/all/reward/total")
    log(loss_name, "rewards", [round(v, 3) for v in rewards])
    check_checkpoints(log_path, service)


def phase_rl_sync(service):
    from tinker_cookbook.rl import train

    log_path = os.path.join(WORK, "rl-sync")
    asyncio.run(train.main(rl_config(log_path)))
    check_rl(log_path, service, "importance_sampling")


def phase_rl_async(service):
    from tinker_cookbook.rl import train

    log_path = os.path.join(WORK, "rl-async")
    cfg = rl_config(log_path, train.AsyncConfig(max_steps_off_policy=1, groups_per_batch=2))
    assert cfg.training_loss_fn() == "stable_reinforce", cfg.training_loss_fn()
    asyncio.run(train.main(cfg))
    check_rl(log_path, service, "stable_reinforce")


# --- preference (DPO) --------------------------------------------------------------------


def write_comparisons(path):
    with open(path, "w") as f:
        for c, a in zip(COLOURS, ANIMALS):
            comparison = {
                "prompt_conversation": [{"role": "user", "content": f"What colour is the {a}?"}],
                "completion_A": [{"role": "assistant", "content": f"The {a} is {c}."}],
                "completion_B": [{"role": "assistant", "content": "I do not know."}],
            }
            f.write(json.dumps({"comparison": comparison, "label": "A"}) + "\n")


def phase_dpo(service):
    from tinker_cookbook.preference import train_dpo
    from tinker_cookbook.preference.dpo_datasets import DPODatasetBuilderFromComparisons
    from tinker_cookbook.preference.preference_datasets import ComparisonBuilderFromJsonl
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    data = os.path.join(WORK, "comparisons.jsonl")
    write_comparisons(data)
    log_path = os.path.join(WORK, "dpo")
    common = ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=MODEL, renderer_name=RENDERER, max_length=128, batch_size=4
    )
    cfg = train_dpo.Config(
        log_path=log_path,
        model_name=MODEL,
        recipe_name="loraplex_ci_dpo",
        renderer_name=RENDERER,
        dataset_builder=DPODatasetBuilderFromComparisons(
            common_config=common, comparison_builder=ComparisonBuilderFromJsonl(train_path=data)
        ),
        learning_rate=1e-4,
        lr_schedule="constant",
        num_epochs=1,
        dpo_beta=0.1,
        lora_rank=8,
        base_url=URL,
        save_every=0,
        eval_every=0,
    )
    train_dpo.main(cfg)
    metrics = read_jsonl(os.path.join(log_path, "metrics.jsonl"))
    log("dpo metrics", {k: metrics[-1][k] for k in sorted(metrics[-1]) if "loss" in k or "acc" in k})
    losses = finite_values(metrics, "dpo_loss")
    assert len(losses) == 2, losses
    check_checkpoints(log_path, service)


PHASES = {"sl": phase_sl, "rl-sync": phase_rl_sync, "rl-async": phase_rl_async, "dpo": phase_dpo}


def main(argv):
    names = argv or list(PHASES)
    service = tinker.ServiceClient(base_url=URL)
    for name in names:
        log("phase", name)
        PHASES[name](service)
        log("phase", name, "passed")


if __name__ == "__main__":
    main(sys.argv[1:])
