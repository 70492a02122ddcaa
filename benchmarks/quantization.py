"""Quantization quality on a real model: int8 and nf4 serving against fp32, on SmolLM2-135M-Instruct.

Every mode runs the code a server runs: `Checkpoint.load_span(0, 30)` (all 30 blocks), then
`quantize_linears(span, mode)` for int8 / nf4 (`corolla/inference/server/quantization.py`), with
the client's fp32 embeddings and head around it. Measured, in one run, against fp32:

(a) Perplexity of two texts, and its ratio to fp32's:
    - "replies": what the fp32 model itself wrote, greedily, to four medical questions put through
      its chat template (up to 48 tokens each, to its EOS); scored on the reply tokens given the
      templated question. Greedy fp32 text is fp32's own argmax, so this ratio is a worst case.
    - "notes": 40 held-out synthetic clinical notes (`synthetic_clinical(...).test`, the notes
      `platform train` evaluates on), scored on every token after the first.
(b) Agreement: the share of positions of both texts where the mode's top token is fp32's
    (teacher-forced), the logits' relative L2 error, and free-running greedy generation from the
    four questions against fp32's reply (its first 24 tokens, fewer where it ends sooner): the
    first token that differs, the share of identical tokens, and the share of distinct 3-grams
    (repetition: "coughing, coughing, ...").
(c) Weights. The checkpoint came from a Q4_1 GGUF: every block weight lies on a grid of 16
    levels per 32 weights (checked here). The relative L2 error of the int8 / nf4 weights
    against the fp32 (dequantized) ones is set beside the rounding error Q4_1 itself made
    against the original weights, estimated as step / sqrt(12) per weight (uniform rounding).
    A control model, "unrounded", adds uniform noise of +-step/2 to every block weight: a model
    that Q4_1 rounds to the same checkpoint, and a perturbation of Q4_1's size. Its perplexity
    against fp32 shows what a Q4_1-sized error costs; nf4 on it shows whether nf4's loss
    depends on the weights sitting on Q4_1's grid.
(d) Memory: resident set size of a real `platform serve --blocks 0:15 [--quant MODE]` process
    per mode (`VmRSS` once it is READY, and its peak `VmHWM`), one process at a time.

    python benchmarks/quantization.py            # full run, 5-10 minutes on 2 cores
    python benchmarks/quantization.py --quick    # smoke run: 1 question, 6 notes, 8 tokens, no (d)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]  # the shared helpers (benchmarks/_results.py)

from _results import Run, machine_info, torch_stack, torch_threads, warn_if_loaded  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from corolla.inference.models.checkpoint import Checkpoint  # noqa: E402
from corolla.inference.models.importer import cached_import  # noqa: E402
from corolla.inference.server.quantization import quantize_linears  # noqa: E402
from corolla.platform.launch.servers import LocalServers  # noqa: E402
from corolla.training.clinical import synthetic_clinical  # noqa: E402

RESULTS = HERE / "results" / "quantization.json"
MODES = ("fp32", "int8", "nf4")
QUESTIONS = (
    "What are the first signs of pneumonia in an elderly patient?",
    "How is type 2 diabetes diagnosed?",
    "A patient has chest pain radiating to the left arm. What should be done first?",
    "What are the symptoms of meningitis in adults?",
    "How do you treat an asthma attack?",
)
Q4_1_BLOCK = 32  # weights per Q4_1 scale and minimum
Q4_1_LEVELS = 16
MEMORY_SPAN = (0, 15)


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    questions: int  # how many of QUESTIONS
    reply_tokens: int  # longest fp32 reply written for (a)
    greedy_tokens: int  # free-running tokens compared in (b)
    notes: int  # held-out notes in (a)
    control: bool  # the "unrounded" control model of (c)
    memory: bool  # (d)


FULL = Plan(questions=4, reply_tokens=48, greedy_tokens=24, notes=40, control=True, memory=True)
QUICK = Plan(questions=1, reply_tokens=8, greedy_tokens=8, notes=6, control=False, memory=False)


# -- the model as a server runs it ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Model:
    client: Any  # ClientParts: fp32 embeddings, final norm, head
    span: Any  # Span of every block, as `platform serve` loads it

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """`(B, T)` -> `(B, T, V)` in one parallel forward; right padding does not reach earlier positions."""
        return self.client.head(self.span(self.client.embed(ids))).float()  # type: ignore[no-any-return]

    @torch.no_grad()
    def greedy(self, prompt: torch.Tensor, new_tokens: int, *, eos: int | None) -> list[int]:
        """Greedy tokens after `prompt` `(1, T)` with a KV cache, as a server's inference session steps."""
        span = self.span
        cache = span.new_cache(
            start=span.start, end=span.end, batch_size=1, max_length=prompt.shape[1] + new_tokens, dtype=torch.float32
        )
        out: list[int] = []
        step, position = prompt, 0
        for _ in range(new_tokens):
            hidden = span(self.client.embed(step, position), offset=position, cache=cache)
            token = int(self.client.head(hidden[:, -1:])[0, -1].argmax())
            out.append(token)
            position += step.shape[1]
            if token == eos:
                break
            step = torch.tensor([[token]])
        return out


def load(checkpoint: Checkpoint, client: Any, mode: str, *, unrounded: bool = False) -> Model:
    span = checkpoint.load_span(0, checkpoint.num_blocks)
    if unrounded:
        unround(span, seed=0)
    if mode != "fp32":
        quantize_linears(span, mode)  # type: ignore[arg-type]
    return Model(client=client, span=span)


def block_linears(span: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in span.named_modules() if hasattr(m, "weight") and name.split(".")[-1] in LINEARS]


LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


# -- (c) the Q4_1 grid ----------------------------------------------------------------------------


def q4_1_grid(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per block of 32 weights along a row: the minimum, the step, and how far (in steps) each
    weight sits from the nearest of the 16 levels `min + k * step` (0 for a Q4_1 weight)."""
    blocks = weight.float().reshape(-1, Q4_1_BLOCK)
    low = blocks.min(dim=1, keepdim=True).values
    step = (blocks.max(dim=1, keepdim=True).values - low) / (Q4_1_LEVELS - 1)
    level = (blocks - low) / step.clamp_min(1e-30)
    return low, step, (level - level.round()).abs()


def unround(span: nn.Module, *, seed: int) -> None:
    """Add uniform noise of +-step/2 to every block weight: a model Q4_1 rounds to this one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in block_linears(span):
            weight = module.weight
            _, step, _ = q4_1_grid(weight)
            noise = (torch.rand(weight.numel() // Q4_1_BLOCK, Q4_1_BLOCK, generator=generator) - 0.5) * step
            weight.add_(noise.reshape(weight.shape))


def dequantized(layer: nn.Module) -> torch.Tensor:
    """The weight a bitsandbytes layer computes with, back in fp32."""
    import bitsandbytes as bnb

    if isinstance(layer, bnb.nn.Linear8bitLt):
        return layer.state.CB.float() * layer.state.SCB.float()[:, None] / 127.0  # type: ignore[no-any-return]
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()  # type: ignore[no-any-return]


def grid_study(reference: nn.Module) -> dict[str, Any]:
    """(c): the share of 32-weight blocks on a Q4_1 grid, and Q4_1's estimated rounding error."""
    on_grid = total = 0
    err2 = norm2 = 0.0
    for _, module in block_linears(reference):
        _, step, distance = q4_1_grid(module.weight)
        on_grid += int((distance.amax(dim=1) < 1e-2).sum())
        total += distance.shape[0]
        err2 += float((step.pow(2) / 12).sum()) * Q4_1_BLOCK
        norm2 += float(module.weight.float().pow(2).sum())
    return {
        "block_weights": sum(m.weight.numel() for _, m in block_linears(reference)),
        "q4_1_blocks_on_grid_share": round(on_grid / total, 5),
        "q4_1_rounding_rel_l2_estimate": round(math.sqrt(err2 / norm2), 4),
    }


def weight_error(reference: nn.Module, quantized: nn.Module) -> dict[str, Any]:
    """(c): relative L2 error of the weights a quantized span computes with, overall and per projection."""
    weights = {name: m.weight.detach().float() for name, m in block_linears(reference)}
    err2 = norm2 = 0.0
    by_kind: dict[str, list[float]] = {}
    for name, layer in block_linears(quantized):
        e2 = float((dequantized(layer) - weights[name]).pow(2).sum())
        n2 = float(weights[name].pow(2).sum())
        err2, norm2 = err2 + e2, norm2 + n2
        by_kind.setdefault(name.split(".")[-1], []).append(e2 / n2)
    return {
        "rel_l2": round(math.sqrt(err2 / norm2), 4),
        "rel_l2_by_projection": {k: round(math.sqrt(sum(v) / len(v)), 4) for k, v in sorted(by_kind.items())},
    }


# -- (a), (b) texts and scores ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Texts:
    replies: list[tuple[torch.Tensor, int]]  # (templated question + fp32 reply) ids (1, T), reply start
    notes: torch.Tensor  # (N, T) right-padded with the pad id
    notes_mask: torch.Tensor  # (N, T) True on real tokens
    prompts: list[torch.Tensor]  # templated questions (1, T)


def write_texts(fp32: Model, tokenizer: Any, plan: Plan, eos: int) -> tuple[Texts, list[str]]:
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        for q in QUESTIONS[: plan.questions]
    ]
    replies, words = [], []
    for prompt in prompts:
        reply = fp32.greedy(prompt, plan.reply_tokens, eos=eos)
        replies.append((torch.cat([prompt, torch.tensor([reply])], dim=1), prompt.shape[1]))
        words.append(tokenizer.decode(reply, skip_special_tokens=True))
    records = synthetic_clinical(sites=1, records_per_site=1, test_records=plan.notes, seed=0).test
    encoded = [tokenizer(r.prompt + r.completion).input_ids for r in records]
    width = max(len(e) for e in encoded)
    notes = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(notes, dtype=torch.bool)
    for i, e in enumerate(encoded):
        notes[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = True
    return Texts(replies=replies, notes=notes, notes_mask=mask, prompts=prompts), words


def scored(model: Model, texts: Texts) -> dict[str, list[torch.Tensor]]:
    """Per text: the predicting logits `(n, V)` of every scored token and the tokens `(n,)`."""
    logits, targets = [], []
    for ids, start in texts.replies:
        out = model.logits(ids)[0]
        logits.append(out[start - 1 : -1])
        targets.append(ids[0, start:])
    note_logits = model.logits(texts.notes)[:, :-1]
    keep = texts.notes_mask[:, 1:]
    return {
        "replies": [torch.cat(logits), torch.cat(targets)],
        "notes": [note_logits[keep], texts.notes[:, 1:][keep]],
    }


def compare(mode_scores: dict[str, list[torch.Tensor]], fp32_scores: dict[str, list[torch.Tensor]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for text, (logits, targets) in mode_scores.items():
        reference = fp32_scores[text][0]
        nll = float(nn.functional.cross_entropy(logits, targets))
        ref_nll = float(nn.functional.cross_entropy(reference, targets))
        rel = (logits - reference).norm(dim=-1) / reference.norm(dim=-1)
        out[text] = {
            "tokens": int(targets.numel()),
            "perplexity": round(math.exp(nll), 4),
            "perplexity_ratio": round(math.exp(nll - ref_nll), 4),
            "top1_agreement": round(float((logits.argmax(-1) == reference.argmax(-1)).float().mean()), 4),
            "logits_rel_l2_mean": round(float(rel.mean()), 4),
            "logits_rel_l2_max": round(float(rel.max()), 4),
        }
    return out


def distinct_3grams(tokens: Sequence[int]) -> float:
    grams = [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]
    return len(set(grams)) / len(grams) if grams else 1.0


def greedy_agreement(
    model: Model, reference: list[list[int]], texts: Texts, plan: Plan, tokenizer: Any
) -> dict[str, Any]:
    runs = [model.greedy(p, len(ref), eos=None) for p, ref in zip(texts.prompts, reference, strict=True)]
    firsts = [
        next((i for i, (a, b) in enumerate(zip(r, ref, strict=True)) if a != b), len(r))
        for r, ref in zip(runs, reference, strict=True)
    ]
    same = sum(a == b for r, ref in zip(runs, reference, strict=True) for a, b in zip(r, ref, strict=True))
    return {
        "first_mismatch": firsts,
        "identical_token_share": round(same / sum(len(r) for r in runs), 4),
        "distinct_3gram_share": [round(distinct_3grams(r), 3) for r in runs],
        "text": [tokenizer.decode(r, skip_special_tokens=True) for r in runs],
    }


# -- (d) memory --------------------------------------------------------------------------------------


def server_memory(model_dir: Path, mode: str) -> dict[str, float]:
    """RSS of one `platform serve` process holding MEMORY_SPAN in `mode`, once READY and at its peak."""
    quant = [] if mode == "fp32" else ["--quant", mode]
    with LocalServers(
        model_dir, [MEMORY_SPAN], extra_args=["--no-dht", "--device", "cpu", *quant], torch_threads=2, start_timeout=300
    ) as swarm:
        time.sleep(2.0)  # let the allocator settle after the start-up measurement
        status = Path(f"/proc/{swarm.servers[0].process.pid}/status").read_text()
    fields = {line.split(":")[0]: line.split()[1] for line in status.splitlines() if line.startswith("Vm")}
    return {"rss_gb": round(int(fields["VmRSS"]) / 1e6, 3), "peak_rss_gb": round(int(fields["VmHWM"]) / 1e6, 3)}


# -- the run ----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="short smoke run (about a minute on an idle machine)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    parser.add_argument("--only", choices=("quality", "memory"), help="run only (a)-(c), or only (d)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    run = Run("quantization", quick=args.quick, machine=machine_info(**torch_stack()))
    result = run.result
    model_dir = cached_import()
    result.update(model=str(model_dir), plan=asdict(plan))
    if args.only != "memory":
        quality(result, model_dir, plan, args.out)
    if (plan.memory and args.only != "quality") or args.only == "memory":
        result["memory"] = {"span": f"{MEMORY_SPAN[0]}:{MEMORY_SPAN[1]}", "torch_threads": 2}
        for mode in MODES:
            result["memory"][mode] = server_memory(model_dir, mode)
            print(f"memory {mode}: {result['memory'][mode]}", flush=True)
            save(result, args.out)
    run.finish(args.out)
    warn_if_loaded(result["machine"], ": perplexity and agreement do not depend on load; seconds do")
    run.print_written()
    return 0


def quality(result: dict[str, Any], model_dir: Path, plan: Plan, out: Path) -> None:
    """(a)-(c) into `result`, saved after each mode."""
    checkpoint = Checkpoint.open(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos = int(tokenizer.eos_token_id)
    result["texts"] = {
        "replies": f"fp32's own greedy replies (to EOS, at most {plan.reply_tokens} tokens) to {plan.questions} "
        "medical questions through the chat template; reply tokens scored",
        "notes": f"{plan.notes} held-out synthetic clinical notes (synthetic_clinical(seed=0).test); "
        "all tokens after the first",
    }
    with torch_threads(2):
        client = checkpoint.load_client()
        fp32 = load(checkpoint, client, "fp32")
        texts, replies = write_texts(fp32, tokenizer, plan, eos)
        result["fp32_replies"] = replies
        reference_scores = scored(fp32, texts)
        reference_greedy = [ids[0, start : start + plan.greedy_tokens].tolist() for ids, start in texts.replies]
        result["modes"] = modes = {}
        result["weights"] = weights = grid_study(fp32.span)
        for mode in MODES:
            began = time.perf_counter()
            model = fp32 if mode == "fp32" else load(checkpoint, client, mode)
            modes[mode] = compare(scored(model, texts), reference_scores)
            modes[mode]["greedy"] = greedy_agreement(model, reference_greedy, texts, plan, tokenizer)
            modes[mode]["seconds"] = round(time.perf_counter() - began, 1)
            print(f"{mode}: {summary_line(modes[mode])}", flush=True)
            if mode != "fp32":
                weights[mode] = weight_error(fp32.span, model.span)
            del model
            save(result, out)
        print(f"weights: {weights}", flush=True)
        if plan.control:
            control: dict[str, Any] = {}
            unrounded = load(checkpoint, client, "fp32", unrounded=True)
            unrounded_scores = scored(unrounded, texts)
            control["fp32_unrounded_vs_fp32"] = compare(unrounded_scores, reference_scores)
            del unrounded
            nf4_unrounded = load(checkpoint, client, "nf4", unrounded=True)
            control["nf4_unrounded_vs_fp32_unrounded"] = compare(scored(nf4_unrounded, texts), unrounded_scores)
            result["unrounded_control"] = control
            print(f"control: {control}", flush=True)
            save(result, out)


def save(result: dict[str, Any], out: Path) -> None:
    """The record so far, marked partial: a run stopped by a timeout still leaves its figures."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "partial": True}, indent=2) + "\n")


def summary_line(m: dict[str, Any]) -> str:
    r, n, g = m["replies"], m["notes"], m["greedy"]
    return (
        f"ppl ratio replies {r['perplexity_ratio']} notes {n['perplexity_ratio']}; top-1 {r['top1_agreement']}/"
        f"{n['top1_agreement']}; logits rel L2 {r['logits_rel_l2_mean']}; greedy first mismatch {g['first_mismatch']}, "
        f"distinct 3-grams {g['distinct_3gram_share']}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
