"""/v1/chat/completions with the official openai client (streaming and not, n, loops, speculative), the default
template and one a checkpoint carries (`chat_template.jinja`), and the tokenizer routes lm-eval reads.

    python -m pytest tests/test_api_chat.py -q
"""

from __future__ import annotations

import json
import shutil

import httpx
import openai
import pytest
from loopgpt.server.chat import DEFAULT_STOP, ChatTemplate
from server_harness import post, running_server

MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "A dog?"},
            {"role": "assistant", "content": "A dog ran."},
            {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "then?"}]}]
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|endoftext|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with running_server(tiny_checkpoint, max_batch=4) as (url, app):
        yield url, app


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused")


def test_the_default_template_is_a_plain_transcript():
    plain = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else "And then?"}
             for m in MESSAGES]  # text parts are joined before the template sees them
    expected = "Be brief.\n\nUser: A dog?\nAssistant: A dog ran.\nUser: And then?\nAssistant:"
    assert ChatTemplate().render(plain) == expected
    assert ChatTemplate().stops == [DEFAULT_STOP] and ChatTemplate(TEMPLATE).stops == []


def test_chat_equals_a_completion_of_the_rendered_prompt_streaming_and_not(server):
    """The reply is what /v1/completions generates from the template's prompt (as /tokenize renders it), with the
    default template's stop; streamed chunks add up to it, with OpenAI's chunk shapes."""
    url, app = server
    c = client(url)
    model = app.state.loopgpt.name
    out = c.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0,
                                    extra_body={"loops": 3})
    prompt = httpx.post(f"{url}/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    ref = post(url, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0, "loops": 3,
                                        "stop": [DEFAULT_STOP]}).json()
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref["choices"][0]["text"]
    assert out.choices[0].finish_reason == ref["choices"][0]["finish_reason"]
    assert out.usage.prompt_tokens == len(prompt) and out.model_extra["loops"] == 3
    chunks = list(c.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"loops": 3}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == \
        out.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == out.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_chat_n_choices_and_speculative(server):
    url, _ = server
    c = client(url)
    messages = [{"role": "user", "content": "Hi"}]
    model = c.models.list().data[0].id
    sampled = {"messages": messages, "model": model, "max_tokens": 6, "temperature": 1.0, "extra_body": {"loops": 2}}
    out = c.chat.completions.create(n=2, seed=5, **sampled)
    alone = [c.chat.completions.create(seed=5 + i, **sampled).choices[0].message.content for i in range(2)]
    assert [ch.index for ch in out.choices] == [0, 1] and [ch.message.content for ch in out.choices] == alone
    greedy = {"messages": messages, "max_tokens": 8, "temperature": 0, "loops": 4}
    plain = post(url, "/v1/chat/completions", greedy).json()["choices"][0]["message"]["content"]
    drafted = post(url, "/v1/chat/completions", {**greedy, "speculative": {"draft_loops": 2}}).json()
    assert drafted["choices"][0]["message"]["content"] == plain  # greedy output unchanged by drafting


def test_chat_with_adaptive_depth_reports_loops_per_token(server):
    """loops "auto" works on the chat route as on the others (a fuzzer found it answering 500), streaming and not."""
    url, _ = server
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0, "max_loops": 3}
    out = post(url, "/v1/chat/completions?loops=auto", body).json()
    assert out["loops"] == "auto" and 1 <= out["loops_per_token"] <= 3
    streamed = post(url, "/v1/chat/completions?loops=auto", {**body, "stream": True}).text
    chunks = [json.loads(line[5:]) for line in streamed.splitlines() if line.startswith("data:") and "DONE" not in line]
    final = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert final and final[-1]["loops"] == "auto" and final[-1]["loops_per_token"] == out["loops_per_token"]


def test_a_checkpoints_own_template_is_used_and_reported(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "chatty"
    shutil.copytree(tiny_checkpoint, ckpt)
    (ckpt / "chat_template.jinja").write_text(TEMPLATE)
    with running_server(ckpt, max_batch=1) as (url, app):
        info = httpx.get(f"{url}/tokenizer_info").json()
        assert info["chat_template"] == TEMPLATE and info["eos_token"] == "<|endoftext|>"
        tokens = httpx.post(f"{url}/tokenize", json={"messages": MESSAGES[:2]}).json()["tokens"]
        tokenizer = app.state.loopgpt.loaded.tokenizer
        eot = tokenizer.eot_token
        assert tokens.count(eot) == 2  # the template's <|endoftext|> is the special token, not its text
        assert tokenizer.decode(tokens) == "<|system|>Be brief.<|endoftext|><|user|>A dog?<|endoftext|><|assistant|>"
        r = post(url, "/v1/chat/completions", {"messages": MESSAGES[:2], "max_tokens": 3, "stop": ["x"]})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(tokens)


def test_tokenize_and_detokenize_round_trip_as_lm_eval_reads_them(server):
    url, app = server
    tokenizer = app.state.loopgpt.loaded.tokenizer
    r = httpx.post(f"{url}/tokenize", json={"prompt": "<|endoftext|>Once upon a time", "add_special_tokens": False})
    body = r.json()
    assert body["tokens"] == [tokenizer.eot_token] + tokenizer.encode("Once upon a time")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == app.state.loopgpt.config.block_size
    assert httpx.post(f"{url}/detokenize", json={"tokens": body["tokens"]}).json()["prompt"] == \
        "<|endoftext|>Once upon a time"
    assert httpx.post(f"{url}/tokenize", json={}).status_code == 400  # prompt or messages
    bad = httpx.post(f"{url}/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
