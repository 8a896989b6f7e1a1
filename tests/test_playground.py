"""The playground page (GET /) in a real headless Chromium against a real `loopgpt serve` on 127.0.0.1.

    python -m pytest tests/test_playground.py -q

Drives Debian's /usr/bin/chromium through Python playwright (no `playwright install`). Locally the
test skips with a reason when chromium or playwright is missing; with CI=true it must run.
The checkpoint is a random model sized so that one greedy stream lasts seconds on CPU (Stop must land
mid-stream), and whose end-of-text embedding is zero so greedy decoding never ends early.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import tiny_model
from loopgpt.model import save_checkpoint
from server_harness import serve_process

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
LOOP_CAP = 32
BLOCK = 512


def browser_or_skip():
    """playwright's sync API, or a skip with the reason (a failure under CI=true)."""
    missing = None
    if not CHROMIUM.is_file():
        missing = f"{CHROMIUM} is absent (apt-get install chromium)"
    else:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            missing = 'python playwright is not installed (pip install -e ".[browser]")'
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the browser test must run in CI but {missing}")
        pytest.skip(missing)
    return sync_playwright


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, bpe):
    directory = tmp_path_factory.mktemp("playground-ckpt")
    model = tiny_model(vocab_size=bpe.n_vocab, eot_token=bpe.eot_token, block_size=BLOCK, n_embd=64,
                       loop_cap=LOOP_CAP)
    with torch.no_grad():  # tied embeddings: a zero row gives end-of-text a logit of 0, below the greedy max
        model.transformer.wte.weight[bpe.eot_token].zero_()
    evals = {"data": "synthetic", "loops": {str(n): {"loss": 6.0 - 0.2 * n, "ppl": 0.0} for n in range(1, 5)}}
    save_checkpoint(model, directory, bpe, eval_results=evals)
    return directory


@contextlib.contextmanager
def serving(checkpoint: Path, log_path: Path, *flags: str):
    """`loopgpt serve` on the checkpoint as a child process (server_harness.serve_process); yields its base URL."""
    with serve_process(log_path, "--checkpoint", str(checkpoint), "--device", "cpu", "--max-batch", "4", *flags,
                       clean_exit=False) as (url, _):
        yield url


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    with serving(checkpoint, tmp_path_factory.mktemp("serve") / "serve.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    sync_playwright = browser_or_skip()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def open_page(browser, url: str, path: str = "/"):
    """A fresh browser context on a page of the server, under its real Content-Security-Policy; fails the test
    on any uncaught JavaScript error and on anything the policy blocked."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None)
    page.goto(url + path)
    yield page
    context.close()
    assert not errors, f"JavaScript errors or blocked content on the page: {errors}"


def wait_for(page, expression: str, timeout: float) -> None:
    """Poll a JavaScript expression until it is true. Playwright's wait_for_function compiles its predicate with
    eval() inside the page, which the page's policy (rightly) forbids; evaluate() runs it from outside."""
    deadline = time.monotonic() + timeout / 1000
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"still false after {timeout / 1000:.0f} s: {expression}"
        time.sleep(0.05)


@pytest.fixture
def page(browser, server):
    with open_page(browser, server) as page:
        wait_for(page, "document.getElementById('status').textContent === 'ready'", timeout=10_000)
        yield page


def metric(url: str, name: str, labelled: bool = False) -> float:
    """Sum of one Prometheus series over its labels, read from /metrics. A labelled counter has no
    samples before its first request, so it reads 0; an unlabelled gauge must always be there."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    values = [float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    assert values or labelled, f"{name} is not in /metrics"
    return sum(values)


def wait_for_metric(url: str, name: str, value: float, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while (seen := metric(url, name)) != value:
        assert time.monotonic() < deadline, f"{name} is still {seen} after {timeout_s} s, expected {value}"
        time.sleep(0.1)


def set_slider(page, selector: str, value: int) -> None:
    """Move a range input with the keyboard, as a user would (Home, then ArrowRight)."""
    slider = page.locator(selector)
    slider.focus()
    slider.press("Home")
    for _ in range(value - int(slider.get_attribute("min"))):
        slider.press("ArrowRight")
    assert slider.input_value() == str(value)


def test_page_shows_the_checkpoints_loops_and_eval_loss(page):
    slider = page.locator("#loops")
    assert (slider.get_attribute("min"), slider.get_attribute("max")) == ("1", str(LOOP_CAP))
    assert slider.input_value() == "4"  # the trained maximum is the default
    assert "eval loss 5.200" in page.locator("#loops-a-tag").inner_text()
    set_slider(page, "#loops", 2)
    assert "eval loss 5.600" in page.locator("#loops-a-tag").inner_text()
    assert page.locator("#evals .sel-a").first.inner_text() == "2"
    set_slider(page, "#loops", 9)
    assert "not evaluated" in page.locator("#loops-a-tag").inner_text()


def test_generate_streams_text_and_timing(page, server, tmp_path):
    page.fill("#prompt", "Once upon a time")
    set_slider(page, "#loops", 3)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    page.click("#generate")
    pane = page.locator(".pane.a")
    wait_for(page, "document.querySelector('.pane.a')?.dataset.done === 'true'", timeout=30_000)
    assert pane.locator(".error").inner_text() == ""
    assert pane.locator(".tag").inner_text() == "loops 3"
    assert pane.locator(".completion").inner_text().strip() != ""
    assert pane.locator("[data-stat=tokens]").inner_text() == "24"
    assert pane.locator("[data-stat=finish]").inner_text() == "length"
    assert re.fullmatch(r"\d+ ms|\d+\.\d\d s", pane.locator("[data-stat=ttft]").inner_text())
    assert float(pane.locator("[data-stat=tps]").inner_text()) > 0
    assert "prompt" in pane.locator(".server").inner_text()  # the server's final event: usage and timing
    page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    assert (tmp_path / "playground.png").stat().st_size > 10_000


def test_compare_mode_runs_two_loop_counts_side_by_side(page, tmp_path):
    assert page.locator("#loops-b").is_hidden()
    page.check("#compare")
    assert page.locator("#loops-b").is_visible()
    set_slider(page, "#loops", 4)
    set_slider(page, "#loops-b", 1)
    page.fill("#max-tokens", "16")
    page.fill("#seed", "7")
    page.click("#generate")
    wait_for(page, "[...document.querySelectorAll('.pane')].every(p => p.dataset.done === 'true')"
                           " && document.querySelectorAll('.pane').length === 2", timeout=30_000)
    tags = page.locator(".pane .tag").all_inner_texts()
    assert tags == ["loops 4", "loops 1"]
    for text in page.locator(".pane .completion").all_inner_texts():
        assert text.strip() != ""
    page.screenshot(path=str(tmp_path / "playground-compare.png"), full_page=True)


def test_stop_aborts_the_stream_on_the_server(page, server):
    max_tokens = BLOCK - 16
    tokens_before = metric(server, "loopgpt_generation_tokens_total", labelled=True)
    page.fill("#prompt", "Once upon a time")
    set_slider(page, "#loops", LOOP_CAP // 2)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(max_tokens))
    page.click("#generate")
    wait_for(page, "document.querySelector('.pane.a .completion')?.textContent.length > 0",
                           timeout=30_000)
    # The engine publishes its gauges after each step, so the first token can arrive before the gauge moves.
    wait_for_metric(server, "loopgpt_requests_running", 1)
    page.click("#stop")
    wait_for(page, "document.querySelector('.pane.a')?.dataset.done === 'true'", timeout=5_000)
    assert page.locator(".pane.a [data-stat=finish]").inner_text() == "stopped"
    assert page.locator("#generate").is_enabled() and page.locator("#stop").is_disabled()
    wait_for_metric(server, "loopgpt_requests_running", 0)
    generated = metric(server, "loopgpt_generation_tokens_total", labelled=True) - tokens_before
    assert generated < max_tokens, f"the server generated all {max_tokens} tokens: Stop did not abort it"


def test_a_rejected_request_shows_the_servers_message(page):
    page.fill("#max-tokens", str(BLOCK * 4))
    page.click("#generate")
    wait_for(page, "document.querySelector('.pane.a')?.dataset.done === 'true'", timeout=10_000)
    error = page.locator(".pane.a .error").inner_text()
    assert error.startswith("400: ") and "context" in error, error
    assert page.locator(".pane.a .completion").inner_text() == ""


@pytest.mark.slow  # starts a second server
def test_api_key_field_is_sent_as_bearer_token(browser, tiny_checkpoint, tmp_path):
    with serving(tiny_checkpoint, tmp_path / "serve.log", "--api-key", "s3cret") as url, \
            open_page(browser, url) as page:
        wait_for(page, "document.getElementById('status').textContent.startsWith('401: ')",
                               timeout=10_000)
        assert page.locator("#key-box").get_attribute("open") is not None  # the page asks for the key
        page.fill("#api-key", "s3cret")
        page.press("#api-key", "Enter")
        wait_for(page, "document.getElementById('status').textContent === 'ready'", timeout=10_000)
        page.fill("#max-tokens", "8")
        page.click("#generate")
        wait_for(page, "document.querySelector('.pane.a')?.dataset.done === 'true'", timeout=10_000)
        assert page.locator(".pane.a .error").inner_text() == ""
        assert page.locator(".pane.a [data-stat=tokens]").inner_text() == "8"


def test_docs_page_renders_the_api_under_its_policy(browser, server):
    with open_page(browser, server, "/docs") as page:
        wait_for(page, "document.body.dataset.ready === 'true'", timeout=10_000)
        operations = page.locator(".op h3").all_inner_texts()
        assert any("/generate" in op for op in operations) and any("/v1/completions" in op for op in operations)
        row = page.locator("#schema-GenerateBody tr", has_text="loops").first.inner_text()
        assert f"maximum {LOOP_CAP}" in row  # the live limit of the served checkpoint


def test_adaptive_and_speculative_modes_show_loops_per_token(page):
    """Adaptive depth sends loops=auto with the slider as the budget and shows the loops each token used;
    self-speculative decoding (greedy) streams the same text as plain decoding."""
    page.fill("#prompt", "Once upon a time")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "12")
    set_slider(page, "#loops", 4)
    texts = {}
    for mode in ("plain", "speculative", "auto"):
        page.set_checked("#speculative", mode == "speculative")
        page.set_checked("#auto", mode == "auto")
        page.click("#generate")
        wait_for(page, "document.querySelector('.pane.a')?.dataset.done === 'true'", timeout=30_000)
        pane = page.locator(".pane.a")
        assert pane.locator(".error").inner_text() == ""
        texts[mode] = pane.locator(".completion").inner_text()
        lpt = float(pane.locator("[data-stat=lpt]").inner_text())
        assert (1 <= lpt <= 4) if mode == "auto" else lpt == 4.0
        assert pane.locator(".tag").inner_text() == {"plain": "loops 4", "speculative": "loops 4 · speculative",
                                                      "auto": "loops auto ≤ 4"}[mode]
    assert texts["speculative"] == texts["plain"] and texts["plain"].strip()
