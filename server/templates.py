"""Rendering chat templates so that no template can hurt the server.

A checkpoint's `chat_template.jinja` is code written by whoever made the checkpoint. Jinja's sandbox
(ImmutableSandboxedEnvironment) keeps it away from Python's internals, but not from the CPU or memory: two nested
`range(100000)` loops run for hours, `{{ 'x' * 10**9 }}` takes a gigabyte, a recursive macro overflows the stack.
So a checkpoint's template renders in worker processes (RenderWorkers), each with an address-space limit; a render
that outlives its time limit is ended by killing its worker, the one bound that holds for any template (a thread
cannot be stopped, and an iteration budget misses loops over a list or a string built once and iterated many times).
Every render streams its output and stops past `max_chars`, before anything is tokenized.

Measured on a busy 2-core box: a render's round trip to a worker costs ~0.3 ms; starting a worker ~0.5 s (it
imports only this module and Jinja).

    python -c "from loopgpt.server.templates import *; w = RenderWorkers('{{ messages[0].content }}'); \\
               print(w.render([{'role': 'user', 'content': 'Hi'}], True)); w.close()"
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

RENDER_TIMEOUT_S = 3.0  # a real template renders a 1 MB conversation in milliseconds
STARTUP_S = 10.0  # a new worker's Python and Jinja imports, on a busy machine
WORKERS = 2  # renders at once; more wait for a free worker (each request holds an offload thread meanwhile)
WORKER_MEMORY = 1 << 30  # address space of a worker: a template's giant string is its MemoryError, not ours
# A conversation every chat template accepts (user first, roles alternating, no system role: Gemma's refuses one),
# rendered at load so that a template that fails, hangs or explodes is refused with the checkpoint.
SAMPLE = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hello! How can I help?"},
          {"role": "user", "content": "Tell me a story."}]


class TemplateFailed(ValueError):
    """A template failed on these messages or broke a limit; the message is one sentence for a client."""


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


class Sandbox(ImmutableSandboxedEnvironment):
    # Intercepted operators are not folded into constants at compile time: `{{ 'x' * 10**8 }}` is then a render
    # that breaks the output limit in a moment, not a compile that writes a 100 MB literal for seconds.
    intercepted_binops = frozenset({"*", "**"})


def compile_template(source: str) -> jinja2.Template:
    """Hugging Face's dialect: `messages`, `add_generation_prompt`, `raise_exception`, trimmed blocks."""
    env = Sandbox(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(source)


def render_text(template: jinja2.Template, messages: list[dict[str, Any]], add_generation_prompt: bool,
                max_chars: int) -> str:
    """The prompt text, built piece by piece and refused as soon as it passes `max_chars`."""
    parts, size = [], 0
    try:
        for piece in template.generate(messages=messages, add_generation_prompt=add_generation_prompt):
            size += len(piece)
            if size > max_chars:
                raise TemplateFailed(f"the chat template's output exceeds {max_chars} characters")
            parts.append(piece)
    except TemplateFailed:
        raise
    except jinja2.TemplateError as e:  # raise_exception(...), an undefined name, a sandbox refusal
        raise TemplateFailed(f"the chat template refused the conversation ({e})") from e
    except RecursionError as e:
        raise TemplateFailed("the chat template recursed too deeply") from e
    except MemoryError as e:
        raise TemplateFailed("the chat template ran out of memory") from e
    except Exception as e:  # noqa: BLE001  the template is code: any error of it (1/0, an overflow) is its failure
        raise TemplateFailed(f"the chat template failed ({type(e).__name__}: {e})") from e
    return "".join(parts)


def _limit_memory(limit: int) -> None:
    with contextlib.suppress(ImportError, ValueError, OSError):  # no `resource` (Windows), or a lower hard limit
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def serve_renders(requests: Connection, replies: Connection, source: str, max_chars: int) -> None:
    """A worker's life: compile the template and say so (["ready"] or ["failed", why]), then render each
    [messages, add_generation_prompt] it receives, until the server closes the pipe. JSON both ways: the server never
    unpickles what a process running foreign code wrote. Compiling is the worker's too: Jinja folds constants at
    compile time, so `{{ 10**10**8 }}` costs its time and memory at compile, not at render."""
    try:
        template = compile_template(source)
    except Exception as e:  # noqa: BLE001  foreign code: a syntax error, or a constant too large to fold
        replies.send_bytes(json.dumps(["failed", f"the chat template does not compile ({type(e).__name__}: "
                                                 f"{str(e)[:200]})"]).encode())
        return
    replies.send_bytes(json.dumps(["ready", ""]).encode())
    while True:
        try:
            messages, add_generation_prompt = json.loads(requests.recv_bytes())
        except (EOFError, OSError):
            return
        try:
            reply = ["ok", render_text(template, messages, add_generation_prompt, max_chars)]
        except TemplateFailed as e:
            reply = ["failed", str(e)]
        replies.send_bytes(json.dumps(reply).encode())


class Worker:
    """One rendering process: `python -m loopgpt.server.templates`, which imports only this module and Jinja (a
    multiprocessing child would re-import the server's __main__, and a fork would copy the engine's and torch's
    threads mid-lock). Requests and replies travel on two pipes of its own."""

    def __init__(self, source: str, max_chars: int, memory: int):
        child_reads, server_writes = os.pipe()
        server_reads, child_writes = os.pipe()
        args = [str(child_reads), str(child_writes), str(max_chars), str(memory)]
        self.process = subprocess.Popen([sys.executable, "-m", "loopgpt.server.templates", *args],
                                        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        pass_fds=(child_reads, child_writes))
        os.close(child_reads)
        os.close(child_writes)
        self.requests = Connection(server_writes, readable=False)
        self.replies = Connection(server_reads, writable=False)
        self.process.stdin.write(source.encode())  # the template's source (any size) on stdin, then EOF
        self.process.stdin.close()
        self.ready = False  # its greeting (compiled) is read before its first render

    def send(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> None:
        self.requests.send_bytes(json.dumps([messages, add_generation_prompt]).encode())

    def reply(self, timeout_s: float) -> list | None:
        """[status, text], or None if none came within timeout_s."""
        if not self.replies.poll(timeout_s):
            return None
        return json.loads(self.replies.recv_bytes())

    def stop(self) -> None:
        self.requests.close()
        self.replies.close()
        self.process.kill()
        self.process.wait(5)


class RenderWorkers:
    """`workers` processes rendering one template; `render` blocks (call it from a thread, never the event loop)."""

    def __init__(self, source: str, max_chars: int, timeout_s: float = RENDER_TIMEOUT_S, workers: int = WORKERS,
                 memory: int = WORKER_MEMORY):
        self.source, self.max_chars, self.timeout_s = source, max_chars, timeout_s
        self.memory = max(memory, 16 * max_chars)  # room for the output itself (4 bytes a character) and copies
        self.idle: queue.Queue[Worker] = queue.Queue()
        self.lock = threading.Lock()
        self.all: list[Worker] = []
        self.closed = False
        for _ in range(workers):
            self.idle.put(self._start())

    def _start(self) -> Worker:
        worker = Worker(self.source, self.max_chars, self.memory)
        with self.lock:
            self.all.append(worker)
        return worker

    def _replace(self, worker: Worker) -> Worker:
        worker.stop()
        with self.lock:
            if worker in self.all:
                self.all.remove(worker)
        if self.closed:  # shutting down: nothing renders any more
            raise TemplateFailed("the server is shutting down")
        return self._start()

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        worker = self.idle.get()
        try:
            status, value = self._exchange(worker, messages, add_generation_prompt)
        except TemplateFailed:
            worker = self._replace(worker)  # killing it is the only way to stop a runaway render or compile
            raise
        except (EOFError, OSError) as e:  # the worker died (killed for memory by the OS, a crash)
            code = worker.process.poll()
            worker = self._replace(worker)
            raise TemplateFailed(f"the chat template's worker died while rendering (exit code {code})") from e
        finally:
            self.idle.put(worker)
        if status != "ok":
            raise TemplateFailed(value)
        return value

    def _exchange(self, worker: Worker, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list:
        if not worker.ready:
            greeting = worker.reply(STARTUP_S + self.timeout_s)  # Python's start, Jinja's import, the compile
            if greeting is None:
                raise TemplateFailed(f"the chat template did not compile within {STARTUP_S + self.timeout_s:g} s")
            if greeting[0] != "ready":
                raise TemplateFailed(greeting[1])
            worker.ready = True
        worker.send(messages, add_generation_prompt)
        reply = worker.reply(self.timeout_s)
        if reply is None:
            raise TemplateFailed(f"the chat template took more than {self.timeout_s:g} s to render")
        return reply

    def close(self) -> None:
        self.closed = True
        with self.lock:
            workers, self.all = self.all, []
        for worker in workers:
            worker.stop()


def main(argv: list[str]) -> None:
    """The worker process (see Worker): pipe fds, output limit, memory limit; the template's source on stdin."""
    requests, replies, max_chars, memory = (int(a) for a in argv)
    source = sys.stdin.buffer.read().decode()
    _limit_memory(memory)
    serve_renders(Connection(requests, writable=False), Connection(replies, readable=False), source, max_chars)


if __name__ == "__main__":
    main(sys.argv[1:])
