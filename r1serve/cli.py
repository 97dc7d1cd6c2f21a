"""The `r1serve` command line: one entry point, one subcommand per task."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DTYPES = ("float64", "float32", "bfloat16")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["operator"]:  # the operator parses its own flags, --help included
        from r1serve.operator.main import run_operator

        return run_operator(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as exc:  # user errors: one clear line, no traceback
        print(f"r1serve: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r1serve", description=__doc__)
    sub = parser.add_subparsers(title="commands")

    ckpt = sub.add_parser("checkpoint", help="create and check checkpoints").add_subparsers(title="checkpoint")
    tiny = ckpt.add_parser("make-tiny", help="write a tiny random checkpoint in the published layout")
    tiny.add_argument("out_dir", type=Path)
    tiny.add_argument("--fp8", action="store_true", help="store projections as FP8 e4m3 with 128x128 block scales")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config.json field (JSON value), e.g. --set q_lora_rank=null")
    tiny.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    tiny.add_argument("--if-missing", action="store_true", help="do nothing when OUT_DIR already holds a checkpoint")
    tiny.set_defaults(run=_make_tiny)

    check = ckpt.add_parser("check", help="validate a checkpoint's index, shards, shapes and scales, and report "
                                          "the weight bytes each expert-parallel rank holds")
    check.add_argument("checkpoint", type=Path)
    check.add_argument("--weights", choices=("fp8", "dequantized"), default="dequantized",
                       help="how the projections are held (spec.model.weights)")
    check.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                       help="what dequantized weights take (spec.model.dtype)")
    check.add_argument("--expert-parallel", type=int, default=1, metavar="N", help="ranks per replica")
    check.add_argument("--redundant", type=int, default=0, metavar="R", help="redundant expert slots per replica")
    check.set_defaults(run=_check_checkpoint)

    fit = ckpt.add_parser("fit-mtp", help="fit the checkpoint's MTP layer to its own main model (self-distillation "
                                          "on its greedy continuations), so that speculative decoding on a tiny "
                                          "random checkpoint drafts what the main model says; rewrites CHECKPOINT")
    fit.add_argument("checkpoint", type=Path)
    fit.add_argument("--steps", type=int, default=300, help="optimiser steps")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--if-needed", action="store_true", help="do nothing when the layer was already fitted with "
                                                             "these steps and seed")
    fit.set_defaults(run=_fit_mtp)

    gen = sub.add_parser("generate", help="generate from a checkpoint (offline) or a server (--target), streaming")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="run the engine in this process on this checkpoint")
    source.add_argument("--target", metavar="HOST:PORT", help="ask a running server over gRPC, e.g. localhost:9000")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", choices=DTYPES, default="float32", help="offline only")
    gen.add_argument("--weights", choices=("auto", "fp8", "dequantized"), default="dequantized",
                     help="offline only: how an FP8 checkpoint's projections are held (spec.model.weights)")
    gen.add_argument("--speculative-tokens", type=int, choices=(0, 1), default=0,
                     help="offline only: draft tokens per step from the checkpoint's MTP layer (0: off)")
    gen.add_argument("--timeout", type=float, default=None, help="--target only: deadline in seconds")
    gen.add_argument("--token", default=None,
                     help="--target only: bearer token (default: the R1SERVE_API_TOKEN environment variable)")
    gen.add_argument("--tls", action="store_true",
                     help="--target only: connect over TLS (spec.api.tls), trusting the system's CAs")
    gen.add_argument("--ca-file", type=Path, default=None,
                     help="--target only: connect over TLS, trusting this PEM CA (e.g. a self-signed cert)")
    gen.set_defaults(run=_generate)

    srv = sub.add_parser("serve", help="run an R1Deployment on a local Ray: gRPC and OpenAI HTTP until Ctrl-C")
    srv.add_argument("file", type=Path, help="the R1Deployment YAML (the same file you would kubectl apply)")
    srv.add_argument("--address", default=None, help="join this Ray cluster instead of starting one here")
    srv.add_argument("--host", default="127.0.0.1",
                     help="interface of the HTTP endpoint and, with api.tls, of the gRPC TLS front "
                          "(Serve's own gRPC proxy listens on all)")
    srv.set_defaults(run=_serve)

    front = sub.add_parser("grpc-tls", help="terminate TLS for gRPC in front of Serve's plaintext gRPC proxy "
                                            "(the operator's sidecar; `serve` runs it itself)")
    front.add_argument("--listen", required=True, metavar="HOST:PORT", help="TLS address, e.g. 0.0.0.0:9000")
    front.add_argument("--backend", required=True, metavar="HOST:PORT",
                       help="Serve's plaintext gRPC proxy, e.g. 127.0.0.1:9001")
    front.add_argument("--cert", required=True, type=Path, help="PEM certificate chain")
    front.add_argument("--key", required=True, type=Path, help="PEM private key")
    front.set_defaults(run=_grpc_tls)

    op = sub.add_parser("operator", add_help=False, help="run the Kubernetes operator (kopf); --help for its flags")
    op.add_argument("operator_args", nargs=argparse.REMAINDER)

    status = sub.add_parser("status", help="per pool: current and desired replicas, last scaling decision")
    status.add_argument("--url", default="http://127.0.0.1:8000", help="the deployment's HTTP endpoint")
    status.add_argument("--json", action="store_true", help="print the raw status document")
    status.add_argument("--ca-file", type=Path, default=None,
                        help="with an https URL (spec.api.tls): trust this PEM CA, e.g. a self-signed certificate")
    status.set_defaults(run=_status)

    spec = sub.add_parser("spec", help="work with R1Deployment files").add_subparsers(title="spec")
    validate = spec.add_parser("validate", help="check an R1Deployment YAML and print it with defaults")
    validate.add_argument("file", type=Path)
    validate.add_argument("--checkpoint", type=Path, default=None,
                          help="warn when a pool's ranks would hold more weights than --max-weight-share of a GPU")
    validate.add_argument("--gpu-memory-gib", type=float, default=80.0,
                          help="with --checkpoint: the memory of one GPU of the pools (default 80)")
    validate.add_argument("--max-weight-share", type=float, default=0.85,
                          help="with --checkpoint: the share of it weights may take, leaving the rest to the KV "
                               "cache and activations (default 0.85)")
    validate.set_defaults(run=_validate_spec)
    return parser


def _status(args) -> int:
    import json
    import ssl
    import urllib.error
    import urllib.request

    from r1serve.runtime.serve.status_board import STATUS_ROUTE, format_status

    url = args.url.rstrip("/") + STATUS_ROUTE
    try:
        context = ssl.create_default_context(cafile=args.ca_file) if args.ca_file else None
    except (OSError, ssl.SSLError) as exc:
        print(f"r1serve: error: --ca-file {args.ca_file}: {exc}", file=sys.stderr)
        return 2
    try:
        with urllib.request.urlopen(url, timeout=10, context=context) as response:
            status = json.loads(response.read())
    except (urllib.error.URLError, OSError) as exc:
        print(f"r1serve: error: cannot read {url}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2, sort_keys=True) if args.json else format_status(status))
    return 0


def _make_tiny(args) -> int:
    from r1serve.runtime.model.tiny import make_tiny, parse_overrides

    if args.if_missing and (args.out_dir / "config.json").exists():
        print(f"{args.out_dir}: checkpoint already present")
        return 0
    out = make_tiny(args.out_dir, seed=args.seed, fp8=args.fp8, overrides=parse_overrides(args.overrides),
                    overwrite=args.overwrite)
    print(f"wrote tiny checkpoint to {out}")
    return 0


def _check_checkpoint(args) -> int:
    import torch

    from r1serve.runtime.model.checkpoint import is_fp8_checkpoint
    from r1serve.runtime.model.config import ModelConfig
    from r1serve.runtime.model.memory import format_weight_bytes, weight_bytes_per_rank
    from r1serve.runtime.model.model import DeepseekV3ForCausalLM

    if args.weights == "fp8" and not is_fp8_checkpoint(args.checkpoint):
        raise ValueError("--weights fp8: the checkpoint's weights are not FP8 (no quantization_config in config.json)")
    plan = weight_bytes_per_rank(ModelConfig.from_file(args.checkpoint), weights=args.weights,
                                 dtype_bytes=torch.empty((), dtype=getattr(torch, args.dtype)).element_size(),
                                 expert_parallel=args.expert_parallel, redundant=args.redundant)
    DeepseekV3ForCausalLM.from_checkpoint(args.checkpoint, torch.float32, progress=True)
    print(f"{args.checkpoint}: complete and consistent")
    print(f"weights ({args.weights}, {args.dtype}, expert parallel {args.expert_parallel}, {args.redundant} "
          f"redundant): {format_weight_bytes(plan)}")
    return 0


def _fit_mtp(args) -> int:
    from r1serve.runtime.model.mtp_fit import fit_mtp, fitted

    if args.if_needed and fitted(args.checkpoint, args.steps, args.seed):
        print(f"{args.checkpoint}: MTP layer already fitted ({args.steps} steps, seed {args.seed})")
        return 0
    report = fit_mtp(args.checkpoint, steps=args.steps, seed=args.seed)
    print(f"{args.checkpoint}: MTP layer fitted in {report.steps} steps: loss {report.first_loss:.3f} -> "
          f"{report.last_loss:.3f}; it drafts the main model's token on {report.top1_agreement:.0%} of held-out "
          f"positions")
    return 0


def _generate(args) -> int:
    import asyncio

    if args.target:
        return _generate_remote(args)

    from r1serve.runtime.engine.sampling import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    return asyncio.run(_stream_generation(args, params))


async def _stream_generation(args, params) -> int:
    import torch

    from r1serve.runtime.engine.async_engine import AsyncEngine
    from r1serve.runtime.engine.engine import EngineConfig, LLMEngine

    engine = LLMEngine.from_checkpoint(args.checkpoint, EngineConfig(speculative_tokens=args.speculative_tokens),
                                       dtype=getattr(torch, args.dtype), weights=args.weights)
    tokenizer = engine.tokenizer
    if args.chat:
        prompt = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt = tokenizer.encode(args.prompt)
    client = AsyncEngine(engine)
    section = None
    try:
        async for out in client.generate("cli", prompt, params):
            for name, text in (("reasoning", out.reasoning), ("answer", out.content)):
                if text and section != name:
                    section = name
                    print(f"\n--- {name} ---", flush=True)
                print(text, end="", flush=True)
            if out.finished:
                stats = engine.stats()
                drafts = (f", {stats.accepted_draft_tokens} of {stats.draft_tokens} draft tokens kept"
                          if args.speculative_tokens else "")
                print(f"\n--- {out.finish_reason}: {out.prompt_tokens} prompt tokens, "
                      f"{out.completion_tokens} generated{drafts} ---")
    finally:
        client.shutdown()
    return 0


def _generate_remote(args) -> int:
    import grpc

    from r1serve.runtime.serve import client
    from r1serve.spec.constants import API_TOKEN_ENV

    request = client.build_request(args.prompt, chat=args.chat, max_tokens=args.max_tokens,
                                   temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    try:
        token = args.token or os.environ.get(API_TOKEN_ENV) or None
        client.print_stream(client.stream(args.target, request, timeout_s=args.timeout, token=token,
                                          tls=args.tls, ca_file=args.ca_file), sys.stdout)
    except OSError as exc:
        print(f"r1serve: error: --ca-file: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"\nr1serve: error: {args.target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0


def _serve(args) -> int:
    from r1serve.runtime.serve.local import serve_file

    try:
        return serve_file(args.file, address=args.address, host=args.host)
    except (RuntimeError, TimeoutError) as exc:  # the application failed to deploy or start
        print(f"r1serve: error: {exc}", file=sys.stderr)
        return 1


def _grpc_tls(args) -> int:
    from r1serve.runtime.serve.grpc_tls import run_front

    try:
        return run_front(args.listen, args.backend, args.cert, args.key)
    except RuntimeError as exc:  # grpc cannot bind the address
        print(f"r1serve: error: grpc-tls: {exc}", file=sys.stderr)
        return 1


def _validate_spec(args) -> int:
    import yaml

    from r1serve.spec import load_r1deployment

    deployment = load_r1deployment(args.file)
    print(yaml.safe_dump(deployment.to_manifest(), sort_keys=False), end="")
    if args.checkpoint is not None:
        from r1serve.weight_fit import weight_warnings

        for warning in weight_warnings(deployment, args.checkpoint, args.gpu_memory_gib, args.max_weight_share):
            print(f"r1serve: warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
