"""The replaced Flask server's concurrency client, replayed against `loraplex serve`.

It sends that client's request bodies as they were: `/add_lora` with
`{"base_model": "base", "rank": 8, "alpha": 16}` ("base" meant the base model the Flask
server loaded), chat conversations to `/fwdbwd`, `/optim_step`, and it polls
`/retrieve_future` until the answer is no longer 202, reading `model_id` and `loss` from
the results. Four users run at once, then the same flow one user after another; every
call must succeed and each user's loss must fall. Run by tests/sdk_e2e.rs with
LORAPLEX_URL set; needs only `requests`.
"""

import os
import sys
import threading
import time

import requests

BASE_URL = os.environ["LORAPLEX_URL"]
NUM_USERS = 4
STEPS = 3


def poll(session, request_id, timeout=300):
    """Poll /retrieve_future until the job is done: 202 while pending, 200 with the result."""
    deadline = time.time() + timeout
    pending = 0
    while time.time() < deadline:
        r = session.post(f"{BASE_URL}/retrieve_future", json={"request_id": request_id})
        if r.status_code == 202:
            assert r.json()["status"] == "pending", r.text
            pending += 1
            time.sleep(0.1)
            continue
        assert r.status_code == 200, f"{r.status_code} {r.text}"
        return r.json(), pending
    raise TimeoutError(request_id)


def run_user(user_id, results):
    s = requests.Session()
    s.headers["X-API-Key"] = f"tml-flask-user-{user_id}"
    r = s.post(f"{BASE_URL}/add_lora", json={"base_model": "base", "rank": 8, "alpha": 16})
    assert r.status_code == 200, f"add_lora: {r.status_code} {r.text}"
    created, _ = poll(s, r.json()["request_id"])
    model_id = created["model_id"]
    assert model_id == r.json()["model_id"], (created, r.json())

    conversation = [
        {"role": "user", "content": f"What is user {user_id}'s favourite number?"},
        {"role": "assistant", "content": f"User {user_id}'s favourite number is {user_id * 7 + 3}."},
    ]
    losses, pending_polls = [], 0
    for _ in range(STEPS):
        r = s.post(
            f"{BASE_URL}/fwdbwd",
            json={"model_id": model_id, "data": [conversation], "loss_fn": "cross_entropy"},
        )
        assert r.status_code == 200, f"fwdbwd: {r.status_code} {r.text}"
        fb, p = poll(s, r.json()["request_id"])
        pending_polls += p
        losses.append(fb["loss"])
        r = s.post(
            f"{BASE_URL}/optim_step",
            json={"model_id": model_id, "adam_params": {"learning_rate": 0.002}},
        )
        assert r.status_code == 200, f"optim_step: {r.status_code} {r.text}"
        poll(s, r.json()["request_id"])

    r = s.post(
        f"{BASE_URL}/api/v1/sample",
        json={
            "model_id": model_id,
            "prompts": [f"User {user_id}'s favourite number is"],
            "sampling_params": {"max_tokens": 8, "temperature": 0.0},
        },
    )
    assert r.status_code == 200, f"sample: {r.status_code} {r.text}"
    text = r.json()["generated_text"][0]
    base = s.post(
        f"{BASE_URL}/api/v1/sample",
        json={"model_id": "base", "prompts": ["Hello"], "sampling_params": {"max_tokens": 4}},
    )
    assert base.status_code == 200, f"sample from base: {base.status_code} {base.text}"
    r = s.post(f"{BASE_URL}/remove_lora", json={"model_id": model_id})
    assert r.status_code == 200, f"remove_lora: {r.status_code} {r.text}"
    results[user_id] = (losses, text, pending_polls)


def run_all(user_ids, concurrent):
    results, errors = {}, []

    def guarded(u):
        try:
            run_user(u, results)
        except Exception as e:  # reported below, fails the run
            errors.append(f"user {u}: {e!r}")

    t = time.time()
    if concurrent:
        threads = [threading.Thread(target=guarded, args=(u,)) for u in user_ids]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    else:
        for u in user_ids:
            guarded(u)
    return time.time() - t, results, errors


def main():
    run_all([99], concurrent=False)  # warm-up
    t_conc, conc, errs1 = run_all(list(range(NUM_USERS)), concurrent=True)
    t_seq, seq, errs2 = run_all(list(range(NUM_USERS, 2 * NUM_USERS)), concurrent=False)
    errors = errs1 + errs2
    for u, (losses, text, pending) in sorted({**conc, **seq}.items()):
        print(f"user {u}: losses {[round(x, 4) for x in losses]}, 202 polls {pending}, sample {text!r}")
        if not losses[-1] < losses[0]:
            errors.append(f"user {u}: loss did not fall: {losses}")
    print(f"{NUM_USERS} users at once {t_conc:.2f} s, one after another {t_seq:.2f} s, "
          f"speed-up {t_seq / t_conc:.2f}x")
    if errors:
        print("\n".join(errors))
        sys.exit(1)


if __name__ == "__main__":
    main()
