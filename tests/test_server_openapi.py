"""`/openapi.json` states the real contract (bodies from the routes' own pydantic models, the loaded checkpoint's
limits, the API key when there is one) and `/docs` is a self-contained page. The fuzz test holds the server
to the document; the playground test renders /docs in Chromium.

    python -m pytest tests/test_server_openapi.py -q
"""

from __future__ import annotations

import httpx
import pytest
from server_harness import running_server

ROUTES = {("/generate", "post"), ("/v1/completions", "post"), ("/v1/chat/completions", "post"), ("/tokenize", "post"),
          ("/detokenize", "post"), ("/tokenizer_info", "get"), ("/v1/models", "get"), ("/health", "get"),
          ("/metrics", "get"), ("/", "get")}


@pytest.fixture(scope="module")
def document(tiny_checkpoint):
    with running_server(tiny_checkpoint, max_batch=1, max_context=48) as (url, _):
        yield httpx.get(f"{url}/openapi.json").json(), url


def test_every_route_is_described(document):
    doc, _ = document
    assert {(path, method) for path, ops in doc["paths"].items() for method in ops} == ROUTES
    assert "securitySchemes" not in doc["components"]  # no key, so no auth to document


def test_generation_bodies_are_the_routes_models_with_the_checkpoints_limits(document):
    doc, _ = document
    schemas = doc["components"]["schemas"]
    for path, body in (("/generate", "GenerateBody"), ("/v1/completions", "CompletionBody"),
                       ("/v1/chat/completions", "ChatBody")):
        op = doc["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(f"/{body}")
        assert [p["schema"] for p in op["parameters"] if p["name"] == "loops"] == \
            [{"anyOf": [{"type": "integer", "minimum": 1, "maximum": 16}, {"const": "auto"}]}]
        assert set(op["responses"]) == {"200", "400", "401", "413", "415", "429", "500", "503"} | \
            ({"404"} if path.startswith("/v1/") else set())
        assert set(op["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
        props = schemas[body]["properties"]
        assert schemas[body]["required"] == ["messages" if body == "ChatBody" else "prompt"]
        max_loops = next(b for b in props["max_loops"]["anyOf"] if b.get("type") == "integer")
        assert (max_loops["minimum"], max_loops["maximum"]) == (1, 16)
        loops = next(b for b in props["loops"]["anyOf"] if b.get("type") == "integer")
        assert any(b.get("const") == "auto" for b in props["loops"]["anyOf"])
        max_tokens = next(b for b in props["max_tokens"]["anyOf"] if b["type"] == "integer")
        assert (loops["minimum"], loops["maximum"], max_tokens["maximum"]) == (1, 16, 47)  # --max-context 48
    ids = next(b for b in schemas["CompletionBody"]["properties"]["prompt"]["anyOf"]
               if b.get("items", {}).get("type") == "integer")
    assert ids["items"] == {"type": "integer", "minimum": 0, "maximum": 511}
    lists = next(b for b in schemas["CompletionBody"]["properties"]["prompt"]["anyOf"]
                 if b.get("items", {}).get("type") == "array")
    assert lists["items"]["items"] == {"type": "integer", "minimum": 0, "maximum": 511} and lists["maxItems"] == 64
    props = schemas["CompletionBody"]["properties"]
    assert props["echo"]["type"] == "boolean" and props["suffix"]["type"] == "null"
    assert next(b for b in props["logprobs"]["anyOf"] if b["type"] == "integer") == \
        {"type": "integer", "minimum": 0, "maximum": 5}
    assert props["n"]["maximum"] == 1  # --max-batch 1: a prompt's choices are admitted together
    for name in ("GenerateResponse", "CompletionResponse", "CompletionChunk", "GenerateTokenEvent", "ErrorResponse",
                 "ModelList", "Health", "ChatResponse", "ChatChunk", "TokenizeResponse", "CompletionLogprobs"):
        assert name in schemas, name


def test_docs_page_is_self_contained(document):
    _, url = document
    r = httpx.get(f"{url}/docs")
    assert r.status_code == 200 and "/openapi.json" in httpx.get(f"{url}/static/docs.js").text
    assert "http://" not in r.text and "https://" not in r.text  # nothing from a CDN: it works offline


def test_the_api_key_is_documented_when_there_is_one(tiny_checkpoint):
    with running_server(tiny_checkpoint, max_batch=1, api_key="k") as (url, _):
        doc = httpx.get(f"{url}/openapi.json").json()
    assert doc["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    secured = {path for path, ops in doc["paths"].items() for op in ops.values() if "security" in op}
    assert secured == {"/generate", "/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize",
                       "/detokenize", "/tokenizer_info"}
