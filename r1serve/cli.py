"""The `r1serve` command line: one entry point, one subcommand per task."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = ("float64", "float32", "bfloat16")


def main(argv: list[str] | None = None) -> int:
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

    check = ckpt.add_parser("check", help="validate a checkpoint's index, shards, shapes and scales")
    check.add_argument("checkpoint", type=Path)
    check.set_defaults(run=_check_checkpoint)

    gen = sub.add_parser("generate", help="generate offline from a checkpoint")
    gen.add_argument("--checkpoint", type=Path, required=True)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--dtype", choices=DTYPES, default="float32")
    gen.set_defaults(run=_generate)

    spec = sub.add_parser("spec", help="work with R1Deployment files").add_subparsers(title="spec")
    validate = spec.add_parser("validate", help="check an R1Deployment YAML and print it with defaults")
    validate.add_argument("file", type=Path)
    validate.set_defaults(run=_validate_spec)
    return parser


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

    from r1serve.runtime.model.model import DeepseekV3ForCausalLM

    DeepseekV3ForCausalLM.from_checkpoint(args.checkpoint, torch.float32, progress=True)
    print(f"{args.checkpoint}: complete and consistent")
    return 0


def _generate(args) -> int:
    import torch

    from r1serve.runtime.model.generate import greedy_generate
    from r1serve.runtime.model.model import DeepseekV3ForCausalLM
    from r1serve.runtime.tokenizer import Tokenizer

    if args.max_tokens <= 0:
        raise ValueError(f"--max-tokens: must be positive, got {args.max_tokens}")
    tokenizer = Tokenizer.from_dir(args.checkpoint)
    model = DeepseekV3ForCausalLM.from_checkpoint(args.checkpoint, getattr(torch, args.dtype))
    if args.chat:
        prompt = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt = tokenizer.encode(args.prompt)
    limit = model.config.max_position_embeddings
    if len(prompt) + args.max_tokens > limit:
        raise ValueError(f"prompt ({len(prompt)} tokens) plus --max-tokens exceeds the model's context of {limit}")
    stops = [model.config.eos_token_id] if model.config.eos_token_id is not None else []
    [tokens] = greedy_generate(model, [prompt], args.max_tokens, stop_token_ids=stops)
    print(f"prompt: {len(prompt)} tokens; generated {len(tokens)} tokens")
    print(tokenizer.decode(tokens))
    return 0


def _validate_spec(args) -> int:
    import yaml

    from r1serve.spec import load_r1deployment

    deployment = load_r1deployment(args.file)
    print(yaml.safe_dump(deployment.to_manifest(), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
