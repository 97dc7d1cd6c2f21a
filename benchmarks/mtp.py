"""Speculative decoding with the MTP layer against plain decoding, side by side in one run, on a tiny model
whose MTP layer was fitted to it (`r1serve checkpoint fit-mtp`).

    python benchmarks/mtp.py [--layers 16] [--steps 300] [--batches 1 4] [--new-tokens 32] [--record]

The model: the tiny checkpoint with `--layers` decoder layers (deeper than the 3-layer default: there the MTP
layer's own output head costs about as much as a main step), written and fitted once under
.r1serve/bench/ (cached: rerunning reuses it). The requests: the fit's own prompts (see runtime/model/
mtp_fit.py for why a tiny random model drafts well only on those), greedy, `--new-tokens` each; at batch B,
B requests run together, all prompts in turn. Each configuration runs on a fresh engine, MTP off and on
alternately, `--repeats` times each (the medians are reported: a shared 2-core machine is noisy), and
every request's tokens must be the same in both (greedy speculation changes nothing but speed).

Reported per batch: decode tokens/s off and on and their ratio; tokens per main-model decode forward (1 off;
at most 2 with one draft token); the share of draft tokens kept. The prefill step of each request is not
timed: decoding is what speculation changes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, record  # noqa: E402

from r1serve.runtime.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from r1serve.runtime.engine.sampling import SamplingParams  # noqa: E402
from r1serve.runtime.model.mtp_fit import fit_mtp, fit_prompts, fitted  # noqa: E402
from r1serve.runtime.model.tiny import make_tiny  # noqa: E402

CACHE = Path(__file__).resolve().parents[1] / ".r1serve" / "bench"


def fitted_checkpoint(layers: int, steps: int, seed: int) -> Path:
    """The tiny checkpoint with `layers` layers and its MTP layer fitted: made once, then reused."""
    directory = CACHE / f"tiny-{layers}-layers-mtp"
    if not fitted(directory, steps, seed):  # fitted otherwise, or not at all: from a fresh checkpoint
        make_tiny(directory, seed=7, overrides={"num_hidden_layers": layers}, overwrite=True)
        report = fit_mtp(directory, steps=steps, seed=seed)
        print(f"fitted the MTP layer: {json.dumps(report.to_dict())}", flush=True)
    return directory


def decode(checkpoint: Path, prompts: list[list[int]], batch: int, new_tokens: int, speculative: int
           ) -> tuple[dict, dict[str, list[int]]]:
    """Decode tokens/s (prefill steps aside), main forwards per decode step, and every request's tokens."""
    engine = LLMEngine.from_checkpoint(checkpoint, EngineConfig(num_blocks=512, block_size=16, max_running=batch,
                                                                speculative_tokens=speculative))
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    out: dict[str, list[int]] = {}
    decode_s, decode_tokens, forwards = 0.0, 0, 0
    for start in range(0, len(prompts), batch):
        for i in range(start, min(start + batch, len(prompts))):
            engine.add_request(f"r{i}", prompts[i], params)
        for o in engine.step():  # the prompts (one step: they are short) and their first tokens, not timed
            out.setdefault(o.request_id, []).extend(o.token_ids)
        while engine.has_work:
            t = time.perf_counter()
            outs = engine.step()
            decode_s += time.perf_counter() - t
            forwards += 1
            for o in outs:
                out.setdefault(o.request_id, []).extend(o.token_ids)
                decode_tokens += len(o.token_ids)
    stats = engine.stats()
    return {"tokens_per_s": decode_tokens / decode_s, "tokens": decode_tokens, "seconds": decode_s,
            "forwards": forwards, "drafts": stats.draft_tokens, "kept": stats.accepted_draft_tokens}, out


def median_run(runs: list[dict]) -> dict:
    """The run of median decode speed (its counts come with it)."""
    return sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps of the MTP fit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", type=int, default=16, help="of the fit's prompts, the first N")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--new-tokens", type=int, default=32, help="at most the fit's 40")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration, alternating")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    checkpoint = fitted_checkpoint(args.layers, args.steps, args.seed)
    fit = json.loads((checkpoint / "mtp_fit.json").read_text())
    prompts = fit_prompts(129280, seed=args.seed, sequences=fit["sequences"], prompt_tokens=fit["prompt_tokens"])
    prompts = prompts[: args.prompts]
    rows = []
    for batch in args.batches:
        runs: dict[int, list[dict]] = {0: [], 1: []}
        outputs = {}
        for _ in range(args.repeats):
            for speculative in (0, 1):
                result, outputs[speculative] = decode(checkpoint, prompts, batch, args.new_tokens, speculative)
                runs[speculative].append(result)
                if speculative and outputs[1] != outputs[0]:
                    sys.exit(f"batch {batch}: the tokens with MTP differ from those without; speculation must "
                             "not change greedy output")
        off, on = (median_run(runs[k]) for k in (0, 1))
        rows.append({"batch": batch, "off": off, "on": on, "ratio": on["tokens_per_s"] / off["tokens_per_s"],
                     "tokens_per_forward": (on["tokens"] / on["forwards"]) / (off["tokens"] / off["forwards"]),
                     "kept": on["kept"] / on["drafts"] if on["drafts"] else 0.0})
        print(f"batch {batch}: {off['tokens_per_s']:.0f} -> {on['tokens_per_s']:.0f} decode tokens/s", flush=True)
    table = markdown_table(
        ["batch", "decode tokens/s, MTP off", "MTP on", "on / off", "tokens per decode forward (on / off)",
         "draft tokens kept", "step time (on / off)"],
        [[r["batch"], f"{r['off']['tokens_per_s']:.0f}", f"{r['on']['tokens_per_s']:.0f}", f"{r['ratio']:.2f}",
          f"{r['tokens_per_forward']:.2f}", f"{r['kept']:.0%}", f"{r['tokens_per_forward'] / r['ratio']:.2f}"]
         for r in rows])
    text = (f"{table}\n\n- Model: the tiny checkpoint with {args.layers} layers, its MTP layer fitted in "
            f"{fit['steps']} steps (loss {fit['first_loss']:.2f} -> {fit['last_loss']:.3f}; it drafts the main "
            f"model's token at {fit['fitted_agreement']:.1%} of the fitted continuations' positions, "
            f"{fit['held_out_agreement']:.1%} on prompts it did not see). Requests: the first {len(prompts)} fit "
            f"prompts, {args.new_tokens} greedy tokens each; the same tokens with MTP on and off; the median of "
            f"{args.repeats} runs of each, alternating.\n- A step with a draft costs more than a plain one (last "
            f"column: tokens per forward over the speed ratio): it runs two tokens per sequence through the main "
            f"model, and the MTP layer with its own 129k-token output head, which on a tiny model weighs as much as "
            f"several decoder layers.")
    print("\n" + text)
    if args.record:
        record("mtp", "## Speculative decoding: MTP drafts vs plain decoding (fitted tiny model, CPU)\n\n" + text)


if __name__ == "__main__":
    main()
