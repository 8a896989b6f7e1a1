"""`serve --served-model-name NAME [NAME ...]` (vLLM's convention) through the official openai client: a request may
name the model by any of the names, with or without `:loops=N`; /v1/models and every response report the first;
without the flag the name is the checkpoint directory's.

    python -m pytest tests/test_api_model_names.py -q
"""

from __future__ import annotations

import argparse

import httpx
import openai
import pytest
from loopgpt.model import SamplingParams, generate_text, load_checkpoint
from loopgpt.server.options import add_option_flags, options_from_args
from server_harness import post, running_server, sse_events
from test_cli_failures import check_one_sentence, run_main

NAMES = ["tiny-v2", "tiny"]
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def url(tiny_checkpoint):
    with running_server(tiny_checkpoint, max_batch=2, served_model_name=NAMES) as (url, _):
        yield url


@pytest.fixture(scope="module")
def expected(tiny_checkpoint):
    """The greedy text at loops 2 and at the trained depth (4), from the reference decode."""
    model, tokenizer, _ = load_checkpoint(tiny_checkpoint)
    return {n: list(generate_text(model, tokenizer, PROMPT, n, 6, SamplingParams(0.0)))[-1][1].text for n in (2, 4)}


def test_every_name_is_served_and_the_first_reported(url, expected, tiny_checkpoint):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-v2"]
    for model, loops in (("tiny-v2", 4), ("tiny", 4), ("tiny:loops=2", 2), ("tiny-v2:loops=2", 2)):
        done = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0)
        assert done.model == "tiny-v2", model
        assert done.choices[0].text == expected[loops] and done.to_dict()["loops"] == loops, model
    chunks = list(client.chat.completions.create(model="tiny:loops=2", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=3, temperature=0, stream=True))
    assert chunks and {c.model for c in chunks} == {"tiny-v2"} and chunks[-1].to_dict()["loops"] == 2
    with pytest.raises(openai.NotFoundError) as e:  # the directory's name is not one of the names now
        client.completions.create(model=tiny_checkpoint.name, prompt=PROMPT, max_tokens=1)
    assert e.value.code == "model_not_found" and "'tiny-v2', 'tiny'" in e.value.message


def test_the_other_routes_read_the_names_too(url):
    assert httpx.get(f"{url}/health").json()["model"] == "tiny-v2"
    assert post(url, "/tokenize", {"prompt": "hi", "model": "tiny"}).status_code == 200
    r = post(url, "/tokenize", {"prompt": "hi", "model": "demo"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    events = list(sse_events(httpx.post(f"{url}/generate", json={"prompt": "hi", "max_tokens": 2, "stream": True},
                                        timeout=60).iter_lines()))
    assert events[-1] == "[DONE]" and events[-2]["finish_reason"] in ("stop", "length")
    r = post(url, "/generate", {"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == "tiny-v2"


def test_without_the_flag_the_name_is_the_checkpoint_directorys(tiny_checkpoint):
    with running_server(tiny_checkpoint, max_batch=1) as (url, _):
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == tiny_checkpoint.name


def test_the_flag_takes_several_names_and_refuses_a_depth_in_one(capsys):
    parser = argparse.ArgumentParser()
    add_option_flags(parser)
    assert options_from_args(parser.parse_args(["--served-model-name", "a", "b"])).served_model_name == ["a", "b"]
    assert options_from_args(parser.parse_args([])).served_model_name is None
    code, _, err = run_main(capsys, "serve", "--served-model-name", "a", "a:loops=2", "--port", "1")
    check_one_sentence("serve", code, err, "--served-model-name takes non-empty names without ':loops='")
