"""The engine core: everything that owns the model — loading, the runner (device buffers, KV cache), the scheduler,
the step loop — apart from the HTTP side (server/*.py), which reaches it only through `Engine`'s interface:
`submit_all`, `abort`, `drain`, `stop`, `counts`. `EngineClient` (process.py) offers the same interface for an
engine in its own process (`loopgpt serve`'s default), talking to it over ZMQ with one message per engine step.
A prompt that starts like an earlier one prefills only the rest, at any depth up to the earlier one's
(`PrefixCache`, prefix_cache.py).

    python -m pytest tests/test_server_engine.py tests/test_engine_process.py -q
"""

from .core import Engine, NotAccepting, QueueFull
from .loading import ONNX_MISSING, BackendError, Loaded, build_engine, load_backend, serving_config
from .plan import Fork, HeadOut, Pending, PrefillChunk, Sample, StepPlan
from .prefix_cache import PrefixCache
from .request import Adaptive, FinishEvent, Request, TokenEvent
from .runner import ModelRunner, StepCosts
from .speculation import SpecRequest, Speculation

__all__ = ["ONNX_MISSING", "Adaptive", "BackendError", "Engine", "FinishEvent", "Fork", "HeadOut", "Loaded",
           "ModelRunner", "NotAccepting", "Pending", "PrefillChunk", "PrefixCache", "QueueFull", "Request", "Sample",
           "SpecRequest", "Speculation", "StepCosts", "StepPlan", "TokenEvent", "build_engine", "load_backend",
           "serving_config"]
