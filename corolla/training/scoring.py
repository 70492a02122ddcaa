"""Held-out label scoring with the prompt run once: every candidate label of a batch of notes
scored from one shared prefix (a KV cache), instead of one full forward per (note, label).

What is computed is what `data.evaluate` computes (its docstring is the definition): each
record's loss over its completion and EOS, and whether its true label has the highest total
log-probability of `" " + label` + EOS after the prompt. The order of work differs:

    for each batch of notes whose prompts have the same number of tokens L:
        run the prompts (B, L) once, keeping the cache      -> logits at L-1: each first token
        run every label's tokens from position L on it      -> logits of the rest and of EOS

A note's tokens at positions < L are the same in every candidate row and the model is causal,
so the candidates' log-probabilities are the same quantities; they differ from one row per
candidate only by floating-point reordering (other matmul shapes, attention over a cache):
`tests/training/test_scoring.py` checks equal accuracy and every total and loss within
`atol=1e-4` (float32 sums of magnitude ~70; measured differences 1.5e-5) on the tiny models,
locally and through the swarm. The loss reuses the true label's candidate when the record's
completion is exactly `" " + label` (it is then the same row); otherwise the record's own
completion is one more continuation.

A model offers this through `PrefixModel`: `hf_prefix_model` (a Hugging Face model: its
`DynamicCache` repeated once per label, the labels of one length in one forward),
`remote_prefix_model` (the swarm: one inference session per batch, rewound to the prompt before
each label), or `logits_prefix_model` (any `(B, T) -> (B, T, V)` function; recomputes the
prompt: a reference).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from corolla.training.data import DataError, Evaluation, LogitsFn, Record

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from corolla.inference.client import RemoteModelForCausalLM

__all__ = [
    "LabelScores",
    "PrefixCache",
    "PrefixModel",
    "ScoreProgress",
    "evaluate_shared",
    "hf_prefix_model",
    "logits_prefix_model",
    "remote_prefix_model",
    "score_labels",
]

ScoreProgress = Callable[[int, int], None]  # (notes scored so far, notes in all)


class PrefixCache(Protocol):
    """A model that has run a batch of prompts `(B, L)` of one length and keeps their state."""

    def last_logits(self) -> torch.Tensor:
        """`(B, V)` logits at the prompts' last position (they predict the first completion token)."""
        ...

    def extend(self, ids: torch.Tensor) -> torch.Tensor:
        """`(C, B, K)` ids: C continuations of each prompt, each at positions `L..L+K-1`, each
        seeing only the prompt and itself -> their `(C, B, K, V)` logits."""
        ...


# (prompts (B, L), the most tokens one continuation will add) -> the prompts run, as a context
PrefixModel = Callable[[torch.Tensor, int], contextlib.AbstractContextManager[PrefixCache]]


@dataclass(frozen=True, kw_only=True, slots=True)
class _Row:
    prompt: list[int]  # prompt token ids, as `data.encode` makes them
    truth: int  # index of the true label
    own: list[int] | None  # the record's completion + EOS, when it is not its label's candidate


@dataclass(frozen=True, kw_only=True, slots=True)
class LabelScores:
    """Every (record, label) score of a held-out set."""

    totals: torch.Tensor  # (N, n_labels) float32: summed log-probability of " label" + EOS after each prompt
    losses: torch.Tensor  # (N,) float32: each record's mean cross-entropy over its completion and EOS
    truth: torch.Tensor  # (N,) long: the index of each record's true label

    def evaluation(self) -> Evaluation:
        correct = (self.totals.argmax(dim=1) == self.truth).float()
        chance = 1.0 / self.totals.shape[1]
        return Evaluation(loss=float(self.losses.mean()), accuracy=float(correct.mean()), chance=chance)


def evaluate_shared(
    prefix_model: PrefixModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    labels: Sequence[str],
    *,
    batch_size: int,
    max_length: int | None = None,
    progress: ScoreProgress | None = None,
) -> Evaluation:
    """`data.evaluate`'s loss and label accuracy, each prompt run once (see the module doc).

    `labels` must be non-empty (for the loss alone, `score_labels` with none). `batch_size`
    bounds the notes run together (each batch holds prompts of one length); `progress(done,
    total)` is called after each batch."""
    if not labels:
        raise DataError("labels=[] must name at least one label")
    scores = score_labels(
        prefix_model, tokenizer, records, labels, batch_size=batch_size, max_length=max_length, progress=progress
    )
    return scores.evaluation()


def score_labels(
    prefix_model: PrefixModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    labels: Sequence[str],
    *,
    batch_size: int,
    max_length: int | None = None,
    progress: ScoreProgress | None = None,
    workers: int = 1,
) -> LabelScores:
    """Every candidate's total log-probability and every record's loss (`evaluate_shared`).
    With no `labels`, the losses only (`totals` is `(N, 0)`, `truth` all -1). `workers`
    batches are scored at once (threads: for a model whose work is elsewhere, the swarm)."""
    if workers < 1:
        raise DataError(f"workers={workers} must be at least 1")
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} must be at least 1")
    if not records:
        raise DataError("no records to evaluate")
    if len(set(labels)) != len(labels):
        raise DataError(f"labels={list(labels)!r} must be distinct")
    eos: int | None = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to end a completion with")
    start: int = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    candidates = [[*tokenizer(f" {label}", add_special_tokens=False).input_ids, eos] for label in labels]
    rows: list[_Row] = []
    for index, record in enumerate(records):
        label = record.completion.strip()
        if labels and label not in labels:
            raise DataError(f"record {index} has completion {record.completion!r}, not one of labels {list(labels)!r}")
        prompt: list[int] = (list(tokenizer(record.prompt).input_ids) if record.prompt else []) or [start]
        truth = labels.index(label) if labels else -1
        own = None
        if not labels or record.completion != f" {label}":
            own = [*tokenizer(record.completion, add_special_tokens=False).input_ids, eos]
        longest = max([len(c) for c in candidates] + ([len(own)] if own is not None else []))
        if max_length is not None and len(prompt) + longest > max_length:
            raise DataError(
                f"record {index}: its prompt ({len(prompt)} tokens) and longest candidate completion "
                f"({longest} tokens with EOS) are longer than max_length={max_length}"
            )
        rows.append(_Row(prompt=prompt, truth=truth, own=own))

    totals = torch.zeros(len(rows), len(labels), dtype=torch.float32)
    losses = torch.zeros(len(rows), dtype=torch.float32)

    def score(batch: list[int]) -> list[int]:  # fills the batch's rows of `totals` and `losses`
        prompts = torch.tensor([rows[i].prompt for i in batch], dtype=torch.long)  # (B, L)
        longest = max([len(c) for c in candidates] + [len(rows[i].own or ()) for i in batch]) - 1
        own = any(rows[i].own is not None for i in batch)  # a completion that is not its label's candidate
        completions = [[tokens] * len(batch) for tokens in candidates]
        if own:
            completions.append([rows[i].own or candidates[rows[i].truth] for i in batch])
        with prefix_model(prompts, longest) as cache:
            sums = _continuations(cache, completions)  # (C, B)
        if candidates:
            totals[batch] = sums[: len(candidates)].t()
        if own:
            for k, i in enumerate(batch):
                if rows[i].own is not None:
                    losses[i] = -sums[-1, k] / len(rows[i].own or ())
        for i in batch:
            if rows[i].own is None:
                losses[i] = -totals[i, rows[i].truth] / len(candidates[rows[i].truth])
        return batch

    done = 0
    # Several batches at once keep a chain of servers busy (one computes while the next waits).
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for batch in pool.map(score, _batches(rows, batch_size)):
            done += len(batch)
            if progress is not None:
                progress(done, len(rows))
    truths = torch.tensor([row.truth for row in rows], dtype=torch.long)
    return LabelScores(totals=totals, losses=losses, truth=truths)


def _continuations(cache: PrefixCache, completions: Sequence[Sequence[list[int]]]) -> torch.Tensor:
    """(C, B) summed log-probability of each completion (its tokens and EOS) after its row's
    prompt; `completions[c][b]` is continuation c of row b. Continuations of one length run
    together (one `extend` per length: no work on padding); a continuation whose rows differ in
    length (a record's own completion) is right-padded: positions after a row's last token
    never reach an earlier one (causal), and are not summed."""
    first = F.log_softmax(cache.last_logits().float(), dim=-1).cpu()  # (B, V): predicts each first token
    sums = torch.zeros(len(completions), len(completions[0]))
    by_width: dict[int, list[int]] = {}
    for c, row in enumerate(completions):
        by_width.setdefault(max(len(tokens) for tokens in row), []).append(c)
    for width, group in sorted(by_width.items()):
        targets = torch.zeros(len(group), len(completions[0]), width, dtype=torch.long)
        mask = torch.zeros(len(group), len(completions[0]), width, dtype=torch.bool)
        for g, c in enumerate(group):
            for b, tokens in enumerate(completions[c]):
                targets[g, b, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                mask[g, b, : len(tokens)] = True
        picked = first.unsqueeze(0).expand(len(group), -1, -1).gather(2, targets[:, :, :1]).squeeze(2)  # (G, B)
        if width > 1:
            logits = cache.extend(targets[:, :, :-1])  # (G, B, width-1, V): each predicts the token after it
            logprobs = F.log_softmax(logits.float(), dim=-1).cpu()
            rest = logprobs.gather(-1, targets[:, :, 1:].unsqueeze(-1)).squeeze(-1)  # (G, B, width-1)
            picked = picked + torch.where(mask[:, :, 1:], rest, torch.zeros_like(rest)).sum(dim=2)
        sums[group] = picked
    return sums


def _batches(rows: Sequence[_Row], batch_size: int) -> Iterator[list[int]]:
    """Indices of rows, in batches of at most `batch_size` whose prompts have the same length."""
    by_length: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_length.setdefault(len(row.prompt), []).append(i)
    for length in sorted(by_length):
        group = by_length[length]
        for lo in range(0, len(group), batch_size):
            yield group[lo : lo + batch_size]


# --- prefix models ----------------------------------------------------------------------------


class _Recompute:
    """A `PrefixCache` without a cache: every call runs the prompt again (the reference)."""

    def __init__(self, logits_fn: LogitsFn, prompts: torch.Tensor) -> None:
        self.logits_fn = logits_fn
        self.prompts = prompts

    def last_logits(self) -> torch.Tensor:
        with torch.no_grad():
            return self.logits_fn(self.prompts)[:, -1]

    def extend(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            rows = [self.logits_fn(torch.cat([self.prompts, part], dim=1)) for part in ids]  # each (B, L+K, V)
        return torch.stack(rows)[:, :, self.prompts.shape[1] :]


def logits_prefix_model(logits_fn: LogitsFn) -> PrefixModel:
    """Any `(B, T) -> (B, T, V)` model as a `PrefixModel` that recomputes the prompt each time."""

    @contextlib.contextmanager
    def open_prefix(prompts: torch.Tensor, extra: int) -> Iterator[PrefixCache]:
        yield _Recompute(logits_fn, prompts)

    return open_prefix


class _HfCache:
    """A Hugging Face causal LM's `DynamicCache` of the prompts; the continuations run in one
    forward over a copy of it repeated once per continuation (rows `b * C + c`)."""

    def __init__(self, model: Any, prompts: torch.Tensor) -> None:
        self.model = model
        self.length = prompts.shape[1]
        with torch.no_grad():
            out = model(input_ids=prompts, use_cache=True, logits_to_keep=1)
        self.cache = out.cache  # transformers >= 5 names it `cache` (was past_key_values)
        self._last: torch.Tensor = out.logits[:, -1]

    def last_logits(self) -> torch.Tensor:
        return self._last

    def extend(self, ids: torch.Tensor) -> torch.Tensor:
        n, batch, width = ids.shape
        cache = copy.deepcopy(self.cache)  # the prompts' own stays as it is, for another call
        cache.batch_repeat_interleave(n)
        if cache.get_seq_length() != self.length:
            raise DataError(f"the model's cache holds {cache.get_seq_length()} tokens, not the prompt's {self.length}")
        rows = ids.permute(1, 0, 2).reshape(batch * n, width)  # (B*C, K): row b*C + c
        with torch.no_grad():
            out = self.model(input_ids=rows, cache=cache, use_cache=True)
        logits: torch.Tensor = out.logits
        return logits.reshape(batch, n, width, -1).permute(1, 0, 2, 3)


def hf_prefix_model(model: Any) -> PrefixModel:
    """A Hugging Face causal LM (or a PEFT model around one) as a `PrefixModel`."""

    @contextlib.contextmanager
    def open_prefix(prompts: torch.Tensor, extra: int) -> Iterator[PrefixCache]:
        yield _HfCache(model, prompts)

    return open_prefix


class _SessionCache:
    """The swarm's KV caches: one inference session, rewound to the prompt before each call."""

    def __init__(self, model: RemoteModelForCausalLM, session: Any, prompts: torch.Tensor) -> None:
        self.model = model
        self.session = session
        self.length = prompts.shape[1]
        with torch.no_grad():
            hidden = session.step(model.client_parts.embed(prompts, 0))
            self._last: torch.Tensor = model.client_parts.head(hidden[:, -1:])[:, -1]

    def last_logits(self) -> torch.Tensor:
        return self._last

    def extend(self, ids: torch.Tensor) -> torch.Tensor:
        out = []
        for part in ids:  # a session's batch is fixed: one continuation at a time, from the prompt
            self.session.rewind(self.length)
            with torch.no_grad():
                hidden = self.session.step(self.model.client_parts.embed(part, self.length))
                out.append(self.model.client_parts.head(hidden))
        return torch.stack(out)


def remote_prefix_model(model: RemoteModelForCausalLM) -> PrefixModel:
    """The swarm's model (with its adapter and spot checker) as a `PrefixModel`: one inference
    session per batch of prompts, as long as the prompts and the longest continuation."""

    @contextlib.contextmanager
    def open_prefix(prompts: torch.Tensor, extra: int) -> Iterator[PrefixCache]:
        batch, length = prompts.shape
        with model.inference_session(max_length=length + max(extra, 1), batch_size=batch) as session:
            yield _SessionCache(model, session, prompts)

    return open_prefix
