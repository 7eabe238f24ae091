"""The loraplex web console in a real headless Chromium (the system's, over the DevTools
protocol through playwright), against a real `loraplex serve` whose keys file names the
tenants alice (tml-alice) and bob (tml-bob) and an operator key (tml-root). Run by
tests/console_browser.rs.

A user's story: sign in; train through the official tinker SDK and watch the run's curve
gain points live (server-sent events); log scale and smoothing as a plain form; download
a checkpoint as PEFT; sample in the playground; another tenant's key sees none of it;
the pages without JavaScript; the operator view; sign out. Asserts on the DOM;
screenshots go to $LORAPLEX_SHOTS.
"""

import io
import os
import re
import sys
import tarfile

import numpy as np
import tinker
from playwright.sync_api import expect, sync_playwright
from tinker import types

URL = os.environ["LORAPLEX_URL"]
CHROMIUM = os.environ.get("LORAPLEX_CHROMIUM", "/usr/bin/chromium")
SHOTS = os.environ["LORAPLEX_SHOTS"]
MODEL = os.environ.get("LORAPLEX_MODEL_NAME", "HuggingFaceTB/SmolLM2-135M-Instruct")
SEQ = [504, 2365, 314, 260, 1345, 28, 2365, 314, 260, 6152, 30, 378]
# Generous: the CPU trains while the browser waits.
WAIT_MS = 120_000


def resolve(x):
    return x.result() if "Future" in type(x).__name__ else x


def shot(page, name):
    page.screenshot(path=os.path.join(SHOTS, name), full_page=True)


def main():
    sc = tinker.ServiceClient(base_url=URL, api_key="tml-alice")
    tc = resolve(sc.create_lora_training_client(base_model=MODEL, rank=4, seed=0))
    run = tc.model_id
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(SEQ[:-1]),
        loss_fn_inputs={
            "target_tokens": np.array(SEQ[1:]),
            "weights": np.ones(len(SEQ) - 1, np.float32),
        },
    )

    def step():
        fb = tc.forward_backward([datum], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=2e-3)).result()
        return fb.metrics["loss:sum"]

    losses = [step() for _ in range(2)]

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        ctx = browser.new_context(
            accept_downloads=True, viewport={"width": 1280, "height": 900}
        )
        page = ctx.new_page()

        # Signing in: the console redirects to the form; the key goes in its body only.
        page.goto(URL + "/console")
        assert page.url.endswith("/console/sign-in"), page.url
        shot(page, "sign-in.png")
        page.get_by_label("API key").fill("tml-alice")
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator("#tenant")).to_have_text("alice")
        assert "tml-alice" not in page.url
        cookie = [c for c in ctx.cookies() if c["name"] == "loraplex_console"]
        assert cookie and cookie[0]["httpOnly"] and cookie[0]["sameSite"] == "Strict", cookie
        assert "tml-alice" not in cookie[0]["value"]
        expect(page.locator("#runs")).to_contain_text(run)
        shot(page, "runs.png")

        # The run's page: two steps so far (a forward_backward and an optim_step each).
        page.get_by_role("link", name=run).click()
        expect(page.locator("#run-id")).to_have_text(run)
        charts = page.locator("#charts")
        expect(charts).to_have_attribute("data-points", "4")
        loss_line = page.locator("figure[data-metric='loss:sum'] polyline.raw")
        assert len(loss_line.get_attribute("points").split()) == 2
        expect(page.locator("#live-status")).to_contain_text("Live", timeout=WAIT_MS)

        # Train while the page is open: the curve gains the new points by itself.
        losses += [step() for _ in range(3)]
        assert losses[-1] < losses[0], losses
        expect(page.locator("#charts")).to_have_attribute(
            "data-points", "10", timeout=WAIT_MS
        )
        points = page.locator(
            "figure[data-metric='loss:sum'] polyline.raw"
        ).get_attribute("points").split()
        assert len(points) == 5, points
        # SVG y grows downwards: the last point of a falling loss is lower than the first.
        ys = [float(xy.split(",")[1]) for xy in points]
        assert ys[-1] > ys[0], ys
        expect(page.locator("#points tbody tr")).to_have_count(10)
        expect(page.locator("#run-step")).to_have_text("5")
        shot(page, "run-live.png")

        # Log scale and smoothing are a plain GET form.
        page.get_by_label("Log scale").check()
        page.get_by_label("Smoothing").select_option("0.6")
        page.get_by_role("button", name="Apply").click()
        assert "log=1" in page.url and "smooth=0.6" in page.url, page.url
        expect(page.locator("polyline.smooth").first).to_be_attached()
        expect(page.locator("figure[data-metric='loss:sum'] desc")).to_contain_text("log scale")

        # A checkpoint downloads as a PEFT adapter.
        path = tc.save_weights_for_sampler("console-c1").result().path
        page.reload()
        row = page.locator(f"tr[data-path='{path}']")
        expect(row).to_have_count(1)
        with page.expect_download() as dl:
            row.get_by_role("link", name=re.compile("Download PEFT")).click()
        tar_path = os.path.join(SHOTS, "download.tar")
        dl.value.save_as(tar_path)
        with open(tar_path, "rb") as f:
            names = tarfile.open(fileobj=io.BytesIO(f.read())).getnames()
        os.remove(tar_path)
        assert sorted(names) == ["adapter_config.json", "adapter_model.safetensors"], names

        # The playground samples from it and shows each token's logprob.
        page.get_by_role("link", name="Sampling").click()
        page.get_by_label("Checkpoint").select_option(path)
        page.get_by_label("Prompt").fill("The capital of France is")
        page.get_by_label("Max tokens").fill("6")
        page.get_by_label("Temperature").fill("0")
        page.get_by_role("button", name="Sample").click()
        rows = page.locator("#sample-tokens tbody tr")
        expect(rows.first).to_be_visible(timeout=WAIT_MS)
        n = rows.count()
        assert 1 <= n <= 6, n
        lps = [float(x) for x in page.locator("#sample-tokens td.logprob").all_inner_texts()]
        assert len(lps) == n and all(lp <= 0 for lp in lps), lps
        assert page.locator("#sample-text").inner_text() != ""
        shot(page, "playground.png")

        # Bob's key sees none of it.
        bob_ctx = browser.new_context(viewport={"width": 1280, "height": 900})
        bob = bob_ctx.new_page()
        bob.goto(URL + "/console/sign-in")
        bob.get_by_label("API key").fill("tml-bob")
        bob.get_by_role("button", name="Sign in").click()
        expect(bob.locator("#tenant")).to_have_text("bob")
        expect(bob.locator("#no-runs")).to_be_visible()
        assert run not in bob.content()
        resp = bob.goto(URL + "/console/runs/" + run)
        assert resp.status == 404, resp.status
        expect(bob.locator("#error-message")).to_contain_text("not found")
        shot(bob, "other-tenant-404.png")
        bob.goto(URL + "/console/sampling")
        assert path not in bob.content()

        # Without JavaScript the pages still work (only the live refresh needs it).
        nojs_ctx = browser.new_context(java_script_enabled=False)
        nojs = nojs_ctx.new_page()
        nojs.goto(URL + "/console/sign-in")
        nojs.get_by_label("API key").fill("tml-alice")
        nojs.get_by_role("button", name="Sign in").click()
        nojs.get_by_role("link", name=run).click()
        expect(nojs.locator("figure[data-metric='loss:sum'] polyline.raw")).to_have_count(1)
        nojs.get_by_label("Log scale").check()
        nojs.get_by_role("button", name="Apply").click()
        assert "log=1" in nojs.url, nojs.url
        expect(nojs.locator("#live-status")).to_have_text("")

        # The operator sees every tenant; a tenant's key does not get the view.
        resp = page.goto(URL + "/console/operator")
        assert resp.status == 403, resp.status
        ops_ctx = browser.new_context(viewport={"width": 1280, "height": 900})
        ops = ops_ctx.new_page()
        ops.goto(URL + "/console/sign-in")
        ops.get_by_label("API key").fill("tml-root")
        ops.get_by_role("button", name="Sign in").click()
        ops.get_by_role("link", name="Operator").click()
        expect(ops.locator("#tenants")).to_contain_text("alice")
        expect(ops.locator("#batches")).to_be_visible()
        shot(ops, "operator.png")
        page.goto(URL + "/console")

        # Signing out returns to the form; the old page is gone.
        page.get_by_role("button", name="Sign out").click()
        assert page.url.endswith("/console/sign-in"), page.url
        page.goto(URL + "/console/runs/" + run)
        assert page.url.endswith("/console/sign-in"), page.url
        browser.close()
    print("console browser test: ok", losses)


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print("FAILED:", e, file=sys.stderr)
        raise
