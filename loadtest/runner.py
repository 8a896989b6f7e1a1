"""The load generator: closed loop (fixed concurrency) or open loop (Poisson arrivals), self-stopping.

Every random choice (arrival gaps, loops, prompt) comes from one seeded `random.Random`, so two runs
with the same seed send the same requests at the same planned times.

    loopgpt loadtest --url http://127.0.0.1:8000 --concurrency 4 --requests 40 --loops 1,2,4,6
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

from .client import ENDPOINTS, send
from .stats import RequestRecord

BUILTIN_PROMPTS = [
    "Once upon a time, there was a little girl named Lily.",
    "The dog ran to the park and",
    "Tom and his mom went to the store. They wanted to buy",
    "One day, a small bird sat on a tree. It",
    "The sun was hot and the children",
]


@dataclass
class LoadConfig:
    url: str  # one base URL, or several separated by commas: requests go round-robin over them
    loops_mix: dict[int, float] = field(default_factory=lambda: {1: 1.0})  # loops -> relative weight
    prompts: list[str] = field(default_factory=lambda: list(BUILTIN_PROMPTS))
    max_tokens: int = 32
    temperature: float = 0.8
    concurrency: int = 1  # closed loop: requests in flight
    rate: float | None = None  # open loop: mean arrivals per second (Poisson); overrides concurrency
    requests: int | None = None  # stop after this many requests ...
    duration: float | None = None  # ... or after this many seconds of sending
    timeout: float = 120.0  # seconds per request
    api_key: str | None = None
    endpoint: str = "generate"
    seed: int = 0
    progress: bool = True
    ignore_eos: bool = False  # generate max_tokens whatever the model says (equal work per request)

    def __post_init__(self):
        if self.requests is None and self.duration is None:
            raise ValueError("give --requests or --duration so the load test stops by itself")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"--requests must be >= 1, got {self.requests}")
        if self.duration is not None and self.duration <= 0:
            raise ValueError(f"--duration must be > 0 seconds, got {self.duration}")
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"--rate must be > 0 requests per second, got {self.rate}")
        if self.max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        bad = [u for u in self.urls if not u.startswith(("http://", "https://"))]
        if bad or not self.urls:
            raise ValueError(f"--url takes http(s) base URLs such as http://127.0.0.1:8000, got {self.url!r}")
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"--endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}")
        if not self.prompts:
            raise ValueError("no prompts to send: the prompts file holds no text")
        if not self.loops_mix or any(n < 1 or w <= 0 for n, w in self.loops_mix.items()):
            raise ValueError("the loops mix needs loop counts >= 1 with positive weights, e.g. 1,2,4 or 1:3,6:1")

    @property
    def urls(self) -> list[str]:
        return [u.strip() for u in self.url.split(",") if u.strip()]


def parse_loops_mix(text: str) -> dict[int, float]:
    """`1,2,4,6` (equal weights) or `1:3,6:1` (weighted) -> {loops: weight}."""
    mix: dict[int, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        loops, _, weight = part.partition(":")
        try:
            n, w = int(loops), float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"--loops takes counts like 1,2,4 or weighted 1:3,6:1; cannot read {part!r}") from None
        if n < 1 or w <= 0:
            raise ValueError(f"--loops entry {part!r} needs loops >= 1 and a weight > 0")
        mix[n] = mix.get(n, 0.0) + w
    if not mix:
        raise ValueError("--loops is empty; give counts like 1,2,4 or weighted 1:3,6:1")
    return mix


def load_prompts(path: str | Path, max_chars: int = 400) -> list[str]:
    """Documents of a text file: split on `<|endoftext|>` when present, else on blank lines.

    Each is cut to its first `max_chars` characters so that prompts fit a small model's context.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read prompts file {path}: {e}") from None
    docs = text.split("<|endoftext|>") if "<|endoftext|>" in text else text.split("\n\n")
    return [d.strip()[:max_chars] for d in docs if d.strip()]


def with_shared_prefix(url: str, prompts: list[str], tokens: int, api_key: str | None = None) -> list[str]:
    """`--shared-prefix N`: every prompt behind the same text of N of the server's tokens (the prompts joined, cut
    with its /tokenize and /detokenize), as requests sharing a system prompt or few-shot examples do."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    text = " ".join(prompts)
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=30.0) as client:
            ids = client.post("/tokenize", json={"prompt": text}).raise_for_status().json()["tokens"]
            ids = ids * (tokens // max(1, len(ids)) + 1)
            prefix = client.post("/detokenize", json={"tokens": ids[:tokens]}).raise_for_status().json()["prompt"]
    except (httpx.HTTPError, ValueError, KeyError) as e:
        raise ValueError(f"--shared-prefix: cannot build the prefix with {url}/tokenize ({e})") from None
    return [prefix + " " + p for p in prompts]


def plan(cfg: LoadConfig, rng: random.Random) -> tuple[str, int]:
    """The next request's (prompt, loops)."""
    loops = rng.choices(list(cfg.loops_mix), weights=list(cfg.loops_mix.values()))[0]
    return rng.choice(cfg.prompts), loops


async def run_load(cfg: LoadConfig) -> tuple[list[RequestRecord], float]:
    """All request records and the run's wall time (first send to last response), in seconds."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    in_flight = cfg.concurrency if cfg.rate is None else 1024
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    timeout = httpx.Timeout(cfg.timeout, connect=min(cfg.timeout, 10.0))
    bar = tqdm(total=cfg.requests, unit="req", disable=None if cfg.progress else True, desc="loadtest")  # tty only
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        t0 = time.perf_counter()
        runner = open_loop if cfg.rate is not None else closed_loop
        records = await runner(cfg, client, t0, bar)
        duration = time.perf_counter() - t0
    bar.close()
    return records, duration


async def _one(cfg: LoadConfig, client: httpx.AsyncClient, t0: float, prompt: str, loops: int, n: int,
               records: list[RequestRecord], bar: tqdm) -> None:
    """Request number n (from 1), seeded cfg.seed + n; with several URLs they take turns (client-side balancing)."""
    urls = cfg.urls
    record = await send(client, urls[(n - 1) % len(urls)], prompt, loops, cfg.max_tokens, cfg.temperature,
                        cfg.seed + n, cfg.endpoint, start=time.perf_counter() - t0, ignore_eos=cfg.ignore_eos)
    records.append(record)
    bar.update(1)
    if not record.ok:
        bar.set_postfix(errors=sum(not r.ok for r in records), refresh=False)


def _more(cfg: LoadConfig, sent: int, t0: float) -> bool:
    """Whether another request may start: below --requests and inside --duration."""
    if cfg.requests is not None and sent >= cfg.requests:
        return False
    return cfg.duration is None or time.perf_counter() - t0 < cfg.duration


async def closed_loop(cfg: LoadConfig, client: httpx.AsyncClient, t0: float, bar: tqdm) -> list[RequestRecord]:
    """`concurrency` workers, each sending its next request as soon as the previous one ends."""
    rng = random.Random(cfg.seed)
    records: list[RequestRecord] = []
    sent = 0

    async def worker() -> None:
        nonlocal sent
        while _more(cfg, sent, t0):
            sent += 1  # claimed before the await, so workers never overshoot --requests
            prompt, loops = plan(cfg, rng)
            await _one(cfg, client, t0, prompt, loops, sent, records, bar)
            if records[-1].status == 0:
                await asyncio.sleep(0.1)  # a down server fails at once: do not spin through --duration

    await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
    return records


async def open_loop(cfg: LoadConfig, client: httpx.AsyncClient, t0: float, bar: tqdm) -> list[RequestRecord]:
    """Poisson arrivals at `rate`: send times are planned ahead, independent of how fast replies come."""
    rng = random.Random(cfg.seed)
    records: list[RequestRecord] = []
    tasks: list[asyncio.Task] = []
    limit = cfg.requests if cfg.requests is not None else float("inf")
    for due in arrival_times(cfg.rate, cfg.seed):
        if len(tasks) >= limit or (cfg.duration is not None and due >= cfg.duration):
            break
        delay = t0 + due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)  # planned against t0, so sleep overshoot does not accumulate
        prompt, loops = plan(cfg, rng)
        tasks.append(asyncio.create_task(_one(cfg, client, t0, prompt, loops, len(tasks) + 1,
                                              records, bar)))
    await asyncio.gather(*tasks)
    return records


def arrival_times(rate: float, seed: int) -> Iterator[float]:
    """Planned send times (seconds after start) of a Poisson process; its own generator, so the
    plan depends on nothing but rate and seed."""
    rng, due = random.Random(f"arrivals-{seed}"), 0.0
    while True:
        due += rng.expovariate(rate)
        yield due
