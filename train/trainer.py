"""Training: AdamW, warmup + cosine, clipping, accumulation, sampled loop depth, DDP, exact resume.

The output directory is a servable checkpoint (the best weights by validation loss) plus
`resume.pt` (latest full state), `log.jsonl` and `loss.png`. Runs unchanged under torchrun.

    loopgpt train --data data/tinystories --out runs/demo --preset demo --max-steps 2000
    torchrun --nproc_per_node=2 -m loopgpt.cli train --data data/tinystories --out runs/ddp --preset tiny
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from loopgpt.model import LoopGPT, load_checkpoint, preset, resolve_device, save_checkpoint
from loopgpt.model.tokenizer import BPE_FILE, BPE_META, load_tokenizer
from tqdm import tqdm

from .data import LOOP_SAMPLINGS, Shards, sample_loops
from .plots import plot_losses


@dataclass
class TrainConfig:
    data: str
    out: str
    preset: str = "demo"
    model_overrides: dict = field(default_factory=dict)  # LoopGPTConfig fields over the preset
    batch_size: int = 16  # sequences per micro-step per rank
    grad_accum: int = 1
    max_steps: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    loops_sampling: str = "uniform"
    loops_mean: float = 0.0  # poisson-lognormal mean (0: the middle of 1..max_loops)
    loops_sigma: float = 0.5
    loops_overflow: float = 0.0  # fraction of steps drawn from max_loops + 1..loops_overflow_max (last gate reused)
    loops_overflow_max: int = 0  # 0: 2 * max_loops, at most the config's loop_cap
    init_from: str = ""  # fine-tune: start from this checkpoint's weights and config (fresh optimizer, step 0)
    eval_interval: int = 200
    eval_batches: int = 20
    log_interval: int = 10
    seed: int = 1337
    device: str = "auto"
    compile: bool = False
    save_dtype: str = "float32"
    max_minutes: float = 0.0  # stop (and save) after this much wall time; 0 means no limit
    resume: bool = False

    def __post_init__(self):
        if self.loops_sampling not in LOOP_SAMPLINGS:
            raise ValueError(f"--loops-sampling must be one of {', '.join(LOOP_SAMPLINGS)}")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if not 0 <= self.loops_overflow < 1:
            raise ValueError(f"--loops-overflow must be in [0, 1), got {self.loops_overflow}")
        if self.save_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError("--save-dtype must be float32, bfloat16 or float16")


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: LoopGPT, cfg: TrainConfig, device: str) -> torch.optim.AdamW:
    """Weight decay on matrices only; biases, norms and loop gates are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2 or p is model.loop_gates]
    decay = [p for p in decay if p is not model.loop_gates]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.startswith("cuda"))


@dataclass
class Run:
    """What one process needs: rank layout, device, model (maybe DDP-wrapped), optimizer, generators."""

    rank: int
    world: int
    device: str
    model: LoopGPT
    ddp_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    data_gen: torch.Generator
    loops_gen: torch.Generator
    step: int = 0
    best_val: float = float("inf")


def setup(cfg: TrainConfig, shards: Shards) -> Run:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(cfg.device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)  # same init on every rank
    meta = shards.meta
    if cfg.init_from:
        model = init_model(cfg, shards)
        model_cfg = model.config
    else:
        model_cfg = preset(cfg.preset, **{"vocab_size": meta["vocab_size"], "eot_token": meta["eot_token"],
                                          "tokenizer": meta["tokenizer"], **cfg.model_overrides})
        model = LoopGPT(model_cfg)
    if cfg.loops_overflow > 0:
        cfg.loops_overflow_max = cfg.loops_overflow_max or min(2 * model_cfg.max_loops, model_cfg.loop_cap)
        if not model_cfg.max_loops < cfg.loops_overflow_max <= model_cfg.loop_cap:
            raise ValueError(f"--loops-overflow-max must be in {model_cfg.max_loops + 1}..{model_cfg.loop_cap} "
                             f"(past max_loops, within loop_cap), got {cfg.loops_overflow_max}")
    model_cfg.extra = {"train": {k: v for k, v in asdict(cfg).items() if k != "resume"}, "data": meta}
    model = model.to(device)
    optimizer = make_optimizer(model, cfg, device)
    ddp_model = model
    if cfg.compile:
        ddp_model = torch.compile(ddp_model)
    if world > 1:
        # a step of 1 loop leaves the loop gates unused
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            ddp_model, device_ids=None if device == "cpu" else [device],
            find_unused_parameters=model.loop_gates is not None)
    data_gen, loops_gen = torch.Generator().manual_seed(cfg.seed), torch.Generator().manual_seed(cfg.seed + 1)
    return Run(rank, world, device, model, ddp_model, optimizer, data_gen, loops_gen)


def init_model(cfg: TrainConfig, shards: Shards) -> LoopGPT:
    """The --init-from checkpoint's model (its config, not the preset's), if it speaks the data's tokenizer."""
    if cfg.model_overrides:
        raise ValueError("--init-from takes the model config from the checkpoint; drop the model flags "
                         f"({', '.join('--' + k.replace('_', '-') for k in cfg.model_overrides)})")
    model, _, _ = load_checkpoint(cfg.init_from)
    meta, mc = shards.meta, model.config
    same = (mc.tokenizer, mc.vocab_size, mc.eot_token) == (meta["tokenizer"], meta["vocab_size"], meta["eot_token"])
    if same and mc.tokenizer == "bpe":
        same = all((Path(cfg.init_from) / name).read_bytes() == (shards.directory / name).read_bytes()
                   for name in (BPE_FILE, BPE_META))
    if not same:
        raise ValueError(f"--init-from {cfg.init_from}: its tokenizer differs from the one {shards.directory} was "
                         "prepared with; prepare the data with that checkpoint's tokenizer")
    return model.train()


def save_state(run: Run, out: Path) -> None:
    state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "step": run.step,
             "best_val": run.best_val, "data_gen": run.data_gen.get_state(), "loops_gen": run.loops_gen.get_state(),
             "torch_rng": torch.get_rng_state()}
    tmp = out / "resume.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(out / "resume.pt")


def load_state(run: Run, out: Path) -> None:
    path = out / "resume.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: nothing to resume from")
    state = torch.load(path, map_location=run.device, weights_only=True)  # tensors and numbers only
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.step, run.best_val = state["step"], state["best_val"]
    run.data_gen.set_state(state["data_gen"])
    run.loops_gen.set_state(state["loops_gen"])
    torch.set_rng_state(state["torch_rng"])


@torch.no_grad()
def evaluate(run: Run, shards: Shards, cfg: TrainConfig, loops: int, autocast) -> float:
    """Mean validation loss on fixed batches (same batches at every evaluation)."""
    run.model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    losses = []
    for _ in range(cfg.eval_batches):
        x, y = shards.batch("val", cfg.batch_size, run.model.config.block_size, gen)
        with autocast:
            losses.append(run.model(x.to(run.device), loops, targets=y.to(run.device))[1].item())
    run.model.train()
    return sum(losses) / len(losses)


def train_step(run: Run, shards: Shards, cfg: TrainConfig, autocast) -> tuple[float, int, float]:
    """One optimizer step over grad_accum micro-batches; returns (mean loss over ranks, loops, lr)."""
    cfg_m = run.model.config
    loops = sample_loops(cfg.loops_sampling, cfg_m.max_loops, run.loops_gen, cfg.loops_mean, cfg.loops_sigma,
                         cfg_m.loop_cap, cfg.loops_overflow, cfg.loops_overflow_max)
    lr = lr_at(run.step, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    total = torch.zeros((), device=run.device)
    for micro in range(cfg.grad_accum):
        # every rank draws the global batch and keeps its slice: one process with the same global
        # batch sees exactly the same rows
        x, y = shards.batch("train", cfg.batch_size * run.world, cfg_m.block_size, run.data_gen)
        sl = slice(run.rank * cfg.batch_size, (run.rank + 1) * cfg.batch_size)
        x, y = x[sl].to(run.device), y[sl].to(run.device)
        sync = micro == cfg.grad_accum - 1 or run.world == 1
        with (nullcontext() if sync else run.ddp_model.no_sync()), autocast:
            loss = run.ddp_model(x, loops, targets=y)[1] / cfg.grad_accum
        loss.backward()
        total += loss.detach()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.world > 1:
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
    run.step += 1
    return total.item(), loops, lr


def train(cfg: TrainConfig) -> dict:
    shards = Shards(cfg.data)
    run = setup(cfg, shards)
    out = Path(cfg.out)
    if run.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if cfg.resume:
        load_state(run, out)
    tokenizer = load_tokenizer(shards.meta["tokenizer"], shards.directory)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if run.device.startswith("cuda") else nullcontext())
    log = open(out / "log.jsonl", "a") if run.rank == 0 else None  # noqa: SIM115 (closed below)
    # disable=None: a bar on a terminal only (in a log file its redraws would be thousands of lines)
    bar = tqdm(total=cfg.max_steps, initial=run.step, disable=True if run.rank else None, desc="train", unit="step")
    start, tokens_per_step = time.time(), cfg.batch_size * cfg.grad_accum * run.world * run.model.config.block_size
    run.model.train()
    try:
        while run.step < cfg.max_steps:
            loss, loops, lr = train_step(run, shards, cfg, autocast)
            bar.update(1)
            record = {"step": run.step, "loss": loss, "loops": loops, "lr": lr, "tokens": run.step * tokens_per_step,
                      "elapsed_s": round(time.time() - start, 2)}
            last = run.step == cfg.max_steps or (cfg.max_minutes and time.time() - start > 60 * cfg.max_minutes)
            if run.step % cfg.eval_interval == 0 or last:
                record["val_loss"] = evaluate(run, shards, cfg, run.model.config.max_loops, autocast)
                record["val_loss_1"] = evaluate(run, shards, cfg, 1, autocast)
                score = record["val_loss"]
                if cfg.loops_overflow > 0:  # select on the worse of the trained maximum and the overflow depth
                    record["val_loss_overflow"] = evaluate(run, shards, cfg, cfg.loops_overflow_max, autocast)
                    score = max(score, record["val_loss_overflow"])
                if run.rank == 0 and score < run.best_val:
                    run.best_val = score
                    save_checkpoint(run.model, out, tokenizer, dtype=getattr(torch, cfg.save_dtype))
                if run.rank == 0:
                    save_state(run, out)
                bar.set_postfix(loss=f"{loss:.3f}", val=f"{record['val_loss']:.3f}")
            if log and (run.step % cfg.log_interval == 0 or "val_loss" in record):
                log.write(json.dumps(record) + "\n")
                log.flush()
            if last:
                break
    finally:
        bar.close()
        if log:
            log.close()
    if run.rank == 0:
        plot_losses(out / "log.jsonl", out / "loss.png")
    if run.world > 1:
        dist.destroy_process_group()
    return {"step": run.step, "best_val": run.best_val, "out": str(out)}
