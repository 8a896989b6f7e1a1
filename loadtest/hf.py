"""Our model as a Hugging Face `transformers` GPT-2 of n_layer * inner_loops * loops layers (the baseline).

With a gate of ones a LoopGPT run for N loops *is* this unrolled GPT-2 with tied weights, so the
benchmark compares equal work. Gates are not copied (GPT-2 has none): the shapes and FLOPs are equal,
the numbers only match for gate "none" or a gate of ones (tests/test_model.py checks that case).

    python -c "from loopgpt.model import LoopGPT, preset; from loopgpt.loadtest.hf import to_hf; \
print(to_hf(LoopGPT(preset('tiny')), 2).config.n_layer)"
"""

from __future__ import annotations

from loopgpt.model import LoopGPT

CONV1D = ("c_attn", "c_proj", "c_fc")  # HF's Conv1D stores (in, out); nn.Linear stores (out, in)


def to_hf(model: LoopGPT, loops: int):
    """A transformers GPT2LMHeadModel (eval mode, same dtype/device) holding copies of our weights."""
    import transformers

    cfg = model.config
    depth = cfg.n_layer * cfg.inner_loops * loops
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=depth,
        n_head=cfg.n_head, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=1e-5, bos_token_id=cfg.eot_token, eos_token_id=cfg.eot_token,
    )
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    ours = model.state_dict()
    theirs = {name: ours[name] for name in ("transformer.wte.weight", "transformer.wpe.weight",
                                           "transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight")}
    for n in range(loops):
        for i in range(cfg.n_layer):
            prefix = f"transformer.h.{i}."
            for j in range(cfg.inner_loops):
                # the unrolled layer index is the K/V slot index (DESIGN.md: (loop*n_layer+layer)*inner+j)
                u = (n * cfg.n_layer + i) * cfg.inner_loops + j
                for name, tensor in ours.items():
                    if name.startswith(prefix):
                        rest = name[len(prefix):]
                        transpose = rest.endswith("weight") and any(c in rest for c in CONV1D)
                        theirs[f"transformer.h.{u}.{rest}"] = tensor.t() if transpose else tensor
    missing, unexpected = hf.load_state_dict(theirs, strict=False)
    if unexpected or not all(".attn.bias" in m or "masked_bias" in m for m in missing):
        raise RuntimeError(f"weight mapping to GPT-2 is incomplete: missing {missing}, unexpected {unexpected}")
    weight = model.lm_head.weight
    return hf.to(device=weight.device, dtype=weight.dtype)
