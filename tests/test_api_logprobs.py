"""Log-probabilities through the API against independent computations: a greedy completion's logprobs (and top
alternatives) equal a teacher-forced forward at the same depth; echo's prompt logprobs equal `loopgpt eval`'s
per-token NLL of the same text; streaming and chat report the same numbers; the official openai client reads them.

    python -m pytest tests/test_api_logprobs.py -q
"""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from loopgpt.model import load_checkpoint
from loopgpt.train.evaluate import sliding_nll
from server_harness import post, running_server, sse_events

PROMPT = "Once upon a time, there was a little girl named Lily."


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with running_server(tiny_checkpoint, max_batch=4, max_queue=16) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    model, tokenizer, _ = load_checkpoint(tiny_checkpoint)
    return model, tokenizer


def forced_logprobs(model, ids: list[int], loops: int) -> torch.Tensor:
    """log-softmax of a teacher-forced forward at `loops` (T, V): row t predicts ids[t + 1]."""
    with torch.inference_mode():
        logits, _ = model(torch.tensor([ids]), loops)
    return torch.log_softmax(logits[0].float(), dim=-1)


@pytest.mark.parametrize("loops", [1, 3])
def test_greedy_logprobs_equal_a_teacher_forced_forward_at_the_same_depth(server, model, loops):
    url, _ = server
    net, tokenizer = model
    body = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "logprobs": 5, "loops": loops, "ignore_eos": True}
    choice = post(url, "/v1/completions", body).json()["choices"][0]
    lp = choice["logprobs"]
    prompt = tokenizer.encode(PROMPT)
    with httpx.stream("POST", f"{url}/generate", json={**body, "stream": True}, timeout=60) as r:
        generated = [e["token_id"] for e in sse_events(r.iter_lines()) if isinstance(e, dict) and "token_id" in e]
    ref = forced_logprobs(net, prompt + generated, loops)[len(prompt) - 1:-1]  # (10, V), the generated positions
    assert len(lp["tokens"]) == 10 and "".join(lp["tokens"]) == choice["text"]
    assert lp["tokens"] == [tokenizer.decode([t]) for t in generated]
    picked = ref.gather(1, torch.tensor(generated)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"]), picked, atol=1e-4, rtol=0)
    values, ids = ref.topk(5, dim=-1)
    for t, top in enumerate(lp["top_logprobs"]):
        # as the server names them: by their text (two byte tokens may both read U+FFFD, and then share a key)
        want = {tokenizer.decode([i]): v for i, v in zip(ids[t].tolist(), values[t].tolist(), strict=True)}
        assert top.keys() == want.keys()
        assert all(abs(top[k] - want[k]) < 1e-4 for k in want)
        assert lp["token_logprobs"][t] == pytest.approx(values[t, 0].item(), abs=1e-4)  # greedy: the likeliest
    assert lp["text_offset"] == [sum(len(x) for x in lp["tokens"][:i]) for i in range(10)]


def test_echo_logprobs_equal_loopgpt_evals_per_token_nll(server, model):
    """`max_tokens: 0` with echo scores a text without generating: the sum equals `loopgpt eval`'s NLL of the same
    tokens (sliding_nll, one window), each token equals the forced forward, the first token has none."""
    url, _ = server
    net, tokenizer = model
    ids = tokenizer.encode(PROMPT + " She loved to play outside in the sun.")
    r = post(url, "/v1/completions", {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1, "loops": 2})
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == tokenizer.decode(ids) and choice["finish_reason"] == "length"
    usage = r.json()["usage"]
    assert usage.pop("prompt_tokens_details")["cached_tokens"] in (0, 16)  # a 16-token block of PROMPT may be cached
    assert usage == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(ids)
    total, count = sliding_nll(net, torch.tensor(ids), 2)
    assert count == len(ids) - 1
    assert -sum(lp["token_logprobs"][1:]) == pytest.approx(total, rel=1e-5)
    ref = forced_logprobs(net, ids, 2)
    per_token = ref[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]), per_token, atol=1e-4, rtol=0)
    for t, top in enumerate(lp["top_logprobs"][1:]):  # the top 1, and the real token beside it when it is not
        assert max(top.values()) == pytest.approx(ref[t].max().item(), abs=1e-4)
        assert top[lp["tokens"][t + 1]] == lp["token_logprobs"][t + 1]


def test_streamed_logprobs_and_echo_equal_the_json_response(server):
    url, _ = server
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 2, "echo": True, "loops": 2,
            "ignore_eos": True}
    whole = post(url, "/v1/completions", body).json()["choices"][0]
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        chunks = [e for e in sse_events(r.iter_lines()) if e != "[DONE]"]
    parts = [c["choices"][0] for c in chunks]
    assert "".join(p["text"] for p in parts) == whole["text"]
    assert parts[0]["text"] == PROMPT  # the echoed prompt comes first, in one chunk
    merged = {k: [v for p in parts if p["logprobs"] for v in p["logprobs"][k]] for k in whole["logprobs"]}
    assert merged == whole["logprobs"]
    assert parts[-1]["finish_reason"] == "length" and parts[-1]["logprobs"] is None


def test_chat_logprobs_are_the_completions_numbers_in_the_chat_shape(server):
    url, _ = server
    messages = [{"role": "user", "content": "Tell me about Lily."}]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    out = client.chat.completions.create(model=client.models.list().data[0].id, messages=messages, max_tokens=5,
                                         temperature=0, logprobs=True, top_logprobs=3, extra_body={"loops": 2})
    content = out.choices[0].logprobs.content
    prompt = httpx.post(f"{url}/tokenize", json={"messages": messages}).json()["tokens"]
    ref = post(url, "/v1/completions", {"prompt": prompt, "max_tokens": 5, "temperature": 0, "logprobs": 3,
                                        "loops": 2}).json()["choices"][0]["logprobs"]
    assert [c.token for c in content] == ref["tokens"][:len(content)]
    assert [c.logprob for c in content] == ref["token_logprobs"][:len(content)]
    for c in content:
        assert len(c.top_logprobs) == 3 and bytes(c.bytes).decode("utf-8", "replace") == c.token
        assert c.top_logprobs[0].logprob >= c.top_logprobs[-1].logprob
