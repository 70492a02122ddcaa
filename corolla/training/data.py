"""Training records: JSONL input, tokenising for completion-only loss, held-out scoring.

A record is a prompt and a completion; the loss covers only the completion (and the EOS
that ends it). Plain text is a record with an empty prompt. Sequences are right-padded and
no attention mask is passed to the model: it is causal, so a real token never attends to
the padding after it, and padded positions are never targets.

Token layout of one record (`encode`):

    [start?] prompt_ids  completion_ids  EOS  PAD ... PAD
    `start` is BOS (EOS if the tokenizer has none) and is added only when the prompt
    tokenises to nothing, so that the first completion token is predicted too.

`loss_mask[i, t]` is True exactly when `input_ids[i, t + 1]` is a completion token or the
final EOS, i.e. when the logits at position `t` are scored (the usual next-token shift).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from corolla.errors import CorollaError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class DataError(CorollaError):
    """Training or evaluation data is missing, malformed, or does not fit the model."""

    exit_code = 2  # bad input, like a usage error


@dataclass(frozen=True, kw_only=True, slots=True)
class Record:
    prompt: str  # context the model conditions on; "" for plain text
    completion: str  # what the model learns to produce after the prompt

    def __post_init__(self) -> None:
        for name in ("prompt", "completion"):
            if not isinstance(getattr(self, name), str):
                raise DataError(f"{name}={getattr(self, name)!r} must be a string")
        if not self.completion.strip():
            raise DataError(f"completion={self.completion!r} must not be empty")


class _JsonRecord(BaseModel):
    """One JSONL line: `{"text": ...}` or `{"prompt": ..., "completion": ...}`; other keys are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")

    text: str | None = None
    prompt: str | None = None
    completion: str | None = None

    @model_validator(mode="after")
    def _one_form(self) -> _JsonRecord:
        pair = self.prompt is not None or self.completion is not None
        if self.text is not None and pair:
            raise ValueError('give either "text" or "prompt" and "completion", not both')
        if self.text is None and not pair:
            raise ValueError('missing fields: give "text", or "prompt" and "completion"')
        if pair and (self.prompt is None or self.completion is None):
            raise ValueError(f'missing field "{"prompt" if self.prompt is None else "completion"}"')
        if self.text is not None and not self.text.strip():
            raise ValueError('"text" is empty')
        if self.completion is not None and not self.completion.strip():
            raise ValueError('"completion" is empty')
        return self

    def record(self) -> Record:
        if self.text is not None:
            return Record(prompt="", completion=self.text)
        return Record(prompt=self.prompt or "", completion=self.completion or "")


def load_jsonl(path: str | Path) -> list[Record]:
    """Read records from a JSONL file; blank lines are skipped, every other line must be a record."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    records: list[Record] = []
    for number, line in enumerate(raw.splitlines(), start=1):
        where = f"{path}:{number}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})") from exc
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON: {exc.msg} at column {exc.colno}") from exc
        if not isinstance(value, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(value).__name__}")
        try:
            records.append(_JsonRecord.model_validate(value).record())
        except ValidationError as exc:
            raise DataError(f"{where}: {_describe(exc)}") from exc
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        if error["type"] == "value_error":  # our own check: the message without pydantic's prefix
            parts.append(str(error["ctx"]["error"]))
        else:
            field = ".".join(str(p) for p in error["loc"])
            parts.append(f'"{field}" {error["msg"].lower()} (got {error["input"]!r})')
    return "; ".join(parts)


def write_jsonl(records: Sequence[Record], path: str | Path) -> None:
    """Write one `{"prompt", "completion"}` object per line; `load_jsonl` reads it back unchanged."""
    lines = [json.dumps({"prompt": r.prompt, "completion": r.completion}, ensure_ascii=False) for r in records]
    try:
        Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8", newline="\n")
    except OSError as exc:
        raise DataError(f"{path}: cannot write: {exc.strerror or exc}") from exc


@dataclass(frozen=True, kw_only=True, slots=True)
class EncodedBatch:
    input_ids: torch.Tensor  # (N, T) long, right-padded with the pad id (EOS if the tokenizer has none)
    loss_mask: torch.Tensor  # (N, T) bool: True where the *next* token is a completion token or its EOS
    lengths: torch.Tensor  # (N,) long: real tokens per row; positions >= length are padding

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.loss_mask.shape != self.input_ids.shape:
            raise DataError(
                f"input_ids {tuple(self.input_ids.shape)} and loss_mask {tuple(self.loss_mask.shape)} "
                "must have the same (N, T) shape"
            )
        if self.lengths.shape != self.input_ids.shape[:1]:
            raise DataError(f"lengths {tuple(self.lengths.shape)} must be ({self.input_ids.shape[0]},)")


def encode(records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, *, max_length: int | None) -> EncodedBatch:
    """Tokenise records for completion-only training, padded to the longest; see the module docstring.

    The prompt is tokenised as the tokenizer does by default (as `platform generate` does at
    inference), the completion without special tokens, and the two are concatenated, so the
    completion tokens are exactly what follows the prompt. A record longer than `max_length`
    raises `DataError`: cutting a prompt would silently change what the model is taught.
    """
    if not records:
        raise DataError("no records to encode")
    if max_length is not None and max_length < 2:
        raise DataError(f"max_length={max_length} must be at least 2")
    eos: int | None = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to end a completion with")
    pad: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    start: int = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    rows: list[tuple[list[int], int]] = []  # (token ids, number of prompt tokens)
    for index, record in enumerate(records):
        prompt: list[int] = list(tokenizer(record.prompt).input_ids) if record.prompt else []
        prompt = prompt or [start]
        completion: list[int] = list(tokenizer(record.completion, add_special_tokens=False).input_ids)
        ids = prompt + completion + [eos]
        if max_length is not None and len(ids) > max_length:
            raise DataError(
                f"record {index} is {len(ids)} tokens ({len(prompt)} prompt, {len(completion)} completion, "
                f"1 EOS), longer than max_length={max_length}"
            )
        rows.append((ids, len(prompt)))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (ids, n_prompt) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        loss_mask[i, n_prompt - 1 : len(ids) - 1] = True  # logits at t predict ids[t + 1]
    lengths = torch.tensor([len(ids) for ids, _ in rows], dtype=torch.long)
    return EncodedBatch(input_ids=input_ids, loss_mask=loss_mask, lengths=lengths)


def completion_token_logprobs(logits: torch.Tensor, batch: EncodedBatch) -> torch.Tensor:
    """(N, T) log-probability of each next token under `logits` (N, T, V); 0 where not scored."""
    if logits.shape[:2] != batch.input_ids.shape:
        raise DataError(f"logits {tuple(logits.shape)} do not match input_ids {tuple(batch.input_ids.shape)}")
    logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (N, T-1, V)
    targets = batch.input_ids[:, 1:].to(logits.device).unsqueeze(-1)  # (N, T-1, 1)
    picked = logprobs.gather(-1, targets).squeeze(-1)  # (N, T-1)
    scored = torch.where(batch.loss_mask[:, :-1].to(logits.device), picked, torch.zeros_like(picked))
    return F.pad(scored, (0, 1))


def per_record_loss(logits: torch.Tensor, batch: EncodedBatch) -> torch.Tensor:
    """(N,) mean cross-entropy over each record's completion tokens: the per-sample loss for DP-SGD."""
    counts = batch.loss_mask.sum(dim=1).to(logits.device)  # (N,), at least 1: the EOS is always scored
    return -completion_token_logprobs(logits, batch).sum(dim=1) / counts


LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # input_ids (B, T) long -> logits (B, T, V)


@dataclass(frozen=True, kw_only=True, slots=True)
class Evaluation(Mapping[str, float]):
    """Held-out scores of a model (what `evaluate` returns).

    Read the fields; `as_dict()` is the JSON form, `{"loss", "accuracy", "chance"}` in that
    order. It is also a read-only mapping of those same three keys, so `scores["loss"]` and
    `dict(scores)` give what the plain dict this replaced gave.
    """

    loss: float  # mean over records of `per_record_loss` (each a mean over its completion tokens, nats)
    accuracy: float  # fraction of records whose true label has the highest log-probability, in [0, 1]
    chance: float  # 1 / number of labels: the accuracy of a guess

    def as_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "accuracy": self.accuracy, "chance": self.chance}

    def __getitem__(self, key: str) -> float:
        return self.as_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(self.as_dict())


def evaluate(
    logits_fn: LogitsFn,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    labels: Sequence[str],
    *,
    batch_size: int,
    max_length: int | None = None,
) -> Evaluation:
    """Held-out loss and label accuracy of any causal LM given as `logits_fn`.

    `loss` is the mean over records of `per_record_loss`. `accuracy` is the fraction of
    records whose true label (`completion.strip()`) has the highest total log-probability,
    completion tokens and EOS, among the completions `" " + label` after the same prompt.
    The sum favours labels of fewer tokens when the model is unsure (with uniform logits,
    the shortest label always wins); with a balanced test set that is still chance level.
    """
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} must be at least 1")
    if not records:
        raise DataError("no records to evaluate")
    if not labels or len(set(labels)) != len(labels):
        raise DataError(f"labels={list(labels)!r} must be non-empty and distinct")
    truth: list[int] = []
    for index, record in enumerate(records):
        label = record.completion.strip()
        if label not in labels:
            raise DataError(f"record {index} has completion {record.completion!r}, not one of labels {list(labels)!r}")
        truth.append(labels.index(label))
    candidates = [Record(prompt=r.prompt, completion=f" {label}") for r in records for label in labels]

    def scores(batch_records: Sequence[Record]) -> tuple[torch.Tensor, torch.Tensor]:
        out_sum: list[torch.Tensor] = []  # (n,) each: summed completion log-probability
        out_loss: list[torch.Tensor] = []  # (n,) each: per-record loss
        for lo in range(0, len(batch_records), batch_size):
            batch = encode(batch_records[lo : lo + batch_size], tokenizer, max_length=max_length)
            with torch.no_grad():
                logits = logits_fn(batch.input_ids)
            out_sum.append(completion_token_logprobs(logits, batch).sum(dim=1).cpu())
            out_loss.append(per_record_loss(logits, batch).cpu())
        return torch.cat(out_sum), torch.cat(out_loss)

    _, losses = scores(records)
    totals, _ = scores(candidates)
    predicted = totals.view(len(records), len(labels)).argmax(dim=1)
    correct = (predicted == torch.tensor(truth, dtype=torch.long)).float()
    return Evaluation(loss=float(losses.mean()), accuracy=float(correct.mean()), chance=1.0 / len(labels))
