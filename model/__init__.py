"""loopgpt.model: the loop-residual GPT in pure PyTorch (config, model, KV cache, sampling, tokenizer, I/O).

    python -c "from loopgpt.model import LoopGPT, preset; print(LoopGPT(preset('gpt2-81m-loop')).num_params())"
"""

from .checkpoint import CheckpointError, load_checkpoint, resolve_device, resolve_dtype, save_checkpoint
from .config import PRESETS, ConfigError, LoopGPTConfig, preset
from .generate import Completion, TextStream, check_request, generate_text, generate_tokens
from .gpt import LoopGPT
from .kv_cache import KVCache
from .sampling import SamplingParams, fresh_seed, sample_row, token_stats
from .tokenizer import Tokenizer, TokenizerError, load_tokenizer, train_bpe

__all__ = [
    "PRESETS", "CheckpointError", "Completion", "ConfigError", "KVCache", "LoopGPT", "LoopGPTConfig",
    "SamplingParams", "TextStream", "Tokenizer", "TokenizerError", "check_request", "generate_text",
    "fresh_seed", "generate_tokens", "load_checkpoint", "load_tokenizer", "preset", "resolve_device", "resolve_dtype",
    "sample_row",
    "save_checkpoint", "token_stats", "train_bpe",
]
