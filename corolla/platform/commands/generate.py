"""`platform generate`: text generation through the swarm, streamed as it comes.

With no `--peers` or `--servers`, an embedded local swarm (`--local-servers` processes of
`platform serve`, two by default, on the workspace's tiny Llama) is started for the run.
With `--chat` the prompt is one user message through the checkpoint's chat template, and only
the reply is printed; generation stops at the generation config's EOS, as in `transformers`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoTokenizer, TextStreamer

from corolla.inference.client import LoraAdapter, RemoteModelForCausalLM
from corolla.inference.device import DeviceKind, resolve_device
from corolla.inference.errors import ModelLoadError
from corolla.inference.models.checkpoint import Checkpoint
from corolla.inference.security import TlsConfig
from corolla.pki import NodeIdentity
from corolla.platform.commands._flags import add_renamed, endpoint
from corolla.platform.identity_args import add_identity_options, tls_from_args
from corolla.platform.launch.servers import LocalServers, even_spans
from corolla.platform.workspace import default_model, resolve_workspace, throwaway_consortium

if TYPE_CHECKING:
    from corolla.verify.tolerance import ToleranceTable


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg,unused-ignore]
    p = sub.add_parser("generate", help="generate text through the swarm")
    p.add_argument("prompt", nargs="?", default="The patient presented with", help="text to continue")
    p.add_argument(
        "--chat",
        action="store_true",
        help="send PROMPT as a user message through the checkpoint's chat template and print only the reply "
        "(instruction-tuned models); a checkpoint without a template is refused (exit 4)",
    )
    p.add_argument(
        "--model", metavar="DIR", help="checkpoint directory (client parts and tokenizer); default: tiny Llama"
    )
    p.add_argument("--peers", action="append", default=[], metavar="MULTIADDR", help="DHT peer to join (repeatable)")
    p.add_argument(
        "--servers",
        action="append",
        default=[],
        type=endpoint,
        metavar="HOST:PORT",
        help="block server endpoint, without the DHT (repeatable); a bare number is refused: that is --local-servers N",
    )
    p.add_argument(
        "--local-servers",
        type=int,
        default=2,
        metavar="N",
        help="block servers the embedded swarm starts when neither --peers nor --servers is given (default 2)",
    )
    p.add_argument(
        "--device",
        choices=[k.value for k in DeviceKind],
        default=DeviceKind.AUTO.value,
        help="where the client's embeddings and LM head run (default auto: cuda if torch sees one, else cpu)",
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, metavar="N", help="sampling seed")
    add_renamed(
        p,
        "--adapter-dir",
        "--adapter",
        metavar="DIR",
        help="a PEFT LoRA adapter directory (e.g. `platform train`'s out-dir/adapter), applied by the servers",
    )
    p.add_argument(
        "--audit-rate",
        type=float,
        default=0.0,
        metavar="R",
        help="spot-check this share of span computations on other replicas, verdicts to --ledger (default 0)",
    )
    p.add_argument("--ledger", metavar="URL", help="reputation ledger for --audit-rate (default: the workspace's)")
    p.add_argument(
        "--tolerances",
        type=Path,
        metavar="FILE",
        help="tolerance table for --audit-rate, from `platform audit calibrate --model DIR --out FILE` "
        "(default: the shipped table: entries for tiny random models and SmolLM2-135M, a fallback for others)",
    )
    add_identity_options(p, role_hint="site")
    p.set_defaults(run=run)


def _ledger_checker(
    args: argparse.Namespace, stack: contextlib.ExitStack, reporter: str, tolerances: ToleranceTable | None
) -> Any:
    """A spot checker whose verdicts go straight to the ledger, routing around the nodes the
    ledger's history quarantines (inference clients report directly; sites in training
    report through Flower), comparing outputs with `tolerances` (None: the shipped table)."""
    from corolla.platform.commands.audit import reputation_book
    from corolla.verify.ledger import Ledger, LedgerKey
    from corolla.verify.ledger_paths import default_ledger_key_path, default_ledger_url
    from corolla.verify.shared_book import LockedBook
    from corolla.verify.spot_check import SpotChecker, SpotCheckSettings

    workspace = resolve_workspace(args.workspace)
    key = LedgerKey.load_or_create(default_ledger_key_path(workspace))
    ledger = stack.enter_context(Ledger.open(args.ledger or default_ledger_url(workspace), key=key, writer=reporter))
    book = LockedBook(reputation_book(ledger))

    def sink(events: list[Any]) -> None:
        ledger.append(events)

    checker = SpotChecker(
        book, sink=sink, reporter=reporter, settings=SpotCheckSettings(rate=args.audit_rate), tolerances=tolerances
    )
    stack.callback(checker.close)
    stack.callback(checker.flush, 60.0)
    return checker


def _prompt_ids(tokenizer: Any, prompt: str, *, chat: bool, model_dir: Path) -> torch.Tensor:
    """`(1, T)` prompt ids: the text as it is, or with `chat` one user message through the
    checkpoint's chat template, ending where the assistant's reply starts."""
    if not chat:
        return tokenizer(prompt, return_tensors="pt").input_ids
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            f"{model_dir} has no chat template (chat_template.jinja or tokenizer_config.json): "
            "--chat needs one; drop --chat to continue the prompt as plain text"
        )
    encoding = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return encoding["input_ids"]


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.audit_rate <= 1:
        print(f"platform generate: --audit-rate {args.audit_rate} must be in [0, 1]", file=sys.stderr)
        return 2
    tolerances: ToleranceTable | None = None
    if args.tolerances:  # before any server starts: a bad file is a quick, clear error (exit 13)
        from corolla.verify.tolerance import load_table

        tolerances = load_table(args.tolerances)
        if not args.audit_rate:
            print("platform generate: note: --tolerances has no effect without --audit-rate", file=sys.stderr)
    device = resolve_device(args.device)  # before any server starts: no CUDA for --device cuda is exit 15
    model_dir = Path(args.model) if args.model else default_model(resolve_workspace(args.workspace))
    checkpoint = Checkpoint.open(model_dir)  # before any server starts: a bad checkpoint is one line (exit 4)
    if args.adapter_dir:  # before any server starts: a bad directory is a quick, clear error
        LoraAdapter.load_peft(args.adapter_dir, checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    input_ids = _prompt_ids(tokenizer, args.prompt, chat=args.chat, model_dir=model_dir)  # no template: exit 4
    with contextlib.ExitStack() as stack:
        peers, servers = list(args.peers), list(args.servers)
        if not peers and not servers:
            # The embedded default: a throwaway CA, so even the local swarm is mutual TLS.
            blocks = checkpoint.num_blocks
            print(
                f"starting an embedded swarm of {args.local_servers} servers on {model_dir} (throwaway CA) ...",
                file=sys.stderr,
                flush=True,
            )
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="corolla-embedded-")))
            consortium = throwaway_consortium(tmp, servers=args.local_servers, sites=1)
            swarm = stack.enter_context(
                LocalServers(
                    model_dir,
                    even_spans(blocks, args.local_servers),
                    torch_threads=1,
                    workspace=consortium.workspace,
                    nodes=consortium.servers,
                )
            )
            peers = swarm.initial_peers
            tls = (
                None
                if args.insecure
                else TlsConfig.for_node(NodeIdentity.load(consortium.workspace / "nodes" / consortium.sites[0]))
            )
        else:
            tls = tls_from_args(args, "generate")
        model = stack.enter_context(
            RemoteModelForCausalLM.from_pretrained(
                model_dir, initial_peers=peers, servers=servers, tls=tls, device=device
            )
        )
        if args.adapter_dir:
            model.load_adapter(args.adapter_dir)
        if args.audit_rate:
            reporter = getattr(args, "node", None) or "client"
            model.use_spot_checker(_ledger_checker(args, stack, reporter=reporter, tolerances=tolerances))
        # A chat reply is printed alone; a plain prompt is printed with its continuation.
        streamer = TextStreamer(tokenizer, skip_prompt=args.chat, skip_special_tokens=args.chat)
        model.generate(
            input_ids,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            streamer=streamer,
            generator=torch.Generator().manual_seed(args.seed),
        )
    return 0
