"""Records, JSONL input, tokenising for completion-only loss, and held-out scoring."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from corolla.errors import CorollaError
from corolla.training.clinical import synthetic_clinical
from corolla.training.data import (
    DataError,
    Evaluation,
    Record,
    encode,
    evaluate,
    load_jsonl,
    per_record_loss,
    write_jsonl,
)


@pytest.fixture(scope="session")
def tokenizer(tiny_llama: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_llama)


def test_data_error_is_a_usage_error() -> None:
    assert issubclass(DataError, CorollaError)
    assert DataError.exit_code == 2


@pytest.mark.parametrize("completion", ["", "   "])
def test_record_needs_a_completion(completion: str) -> None:
    with pytest.raises(DataError, match="completion"):
        Record(prompt="p", completion=completion)


# --- JSONL ---------------------------------------------------------------------------------


def test_jsonl_round_trip_and_both_forms(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"text": "fever and cough"}\n\n   \n{"prompt": "Q:", "completion": " A", "id": 7}\n', encoding="utf-8"
    )
    records = load_jsonl(path)
    assert records == [Record(prompt="", completion="fever and cough"), Record(prompt="Q:", completion=" A")]
    out = tmp_path / "out.jsonl"
    write_jsonl(records, out)
    assert load_jsonl(out) == records


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('"text"', "expected a JSON object, got str"),
        ("{}", "missing fields"),
        ('{"id": 3}', "missing fields"),
        ('{"prompt": "Q:"}', 'missing field "completion"'),
        ('{"completion": " A"}', 'missing field "prompt"'),
        ('{"text": "t", "prompt": "Q:", "completion": " A"}', "not both"),
        ('{"text": 3}', '"text" input should be a valid string'),
        ('{"prompt": "Q:", "completion": null}', 'missing field "completion"'),
        ('{"prompt": ["Q"], "completion": " A"}', '"prompt" input should be a valid string'),
        ('{"text": "  "}', '"text" is empty'),
        ('{"prompt": "Q:", "completion": ""}', '"completion" is empty'),
    ],
)
def test_jsonl_errors_name_the_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(f'{{"text": "ok"}}\n\n{line}\n{{"text": "after"}}\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    assert f"{path}:3: " in str(info.value)
    assert message in str(info.value)


def test_jsonl_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not UTF-8"):
        load_jsonl(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_jsonl_without_records_is_an_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="no records"):
        load_jsonl(path)


def test_jsonl_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing\.jsonl: cannot read"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_write_jsonl_is_one_object_per_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    write_jsonl([Record(prompt="é", completion=" x")], path)
    assert path.read_bytes() == '{"prompt": "é", "completion": " x"}\n'.encode()


# --- encode --------------------------------------------------------------------------------


def test_encode_layout_padding_and_mask(tokenizer: PreTrainedTokenizerBase) -> None:
    records = [
        Record(prompt="Symptoms: fever, cough. Diagnosis:", completion=" pneumonia"),
        Record(prompt="Diagnosis:", completion=" stroke"),
    ]
    batch = encode(records, tokenizer, max_length=64)
    n, t = batch.input_ids.shape
    assert (n, batch.loss_mask.shape, batch.input_ids.dtype, batch.loss_mask.dtype) == (
        2,
        (2, t),
        torch.long,
        torch.bool,
    )
    for i, record in enumerate(records):
        prompt = tokenizer(record.prompt).input_ids
        completion = tokenizer(record.completion, add_special_tokens=False).input_ids
        ids = [*prompt, *completion, tokenizer.eos_token_id]
        length = len(ids)
        assert batch.lengths[i] == length
        assert batch.input_ids[i, :length].tolist() == ids
        assert batch.input_ids[i, length:].tolist() == [tokenizer.pad_token_id] * (t - length)  # right padding
        # True exactly where the next token is a completion token or the EOS.
        expected = [len(prompt) - 1 <= p < length - 1 for p in range(t)]
        assert batch.loss_mask[i].tolist() == expected
    assert batch.lengths.max() == t  # padded to the longest record, not to max_length


def test_encode_plain_text_starts_with_bos(tokenizer: PreTrainedTokenizerBase) -> None:
    batch = encode([Record(prompt="", completion="fever")], tokenizer, max_length=None)
    assert batch.input_ids[0, 0] == tokenizer.bos_token_id
    assert batch.loss_mask[0, 0]  # the first text token is a target too


def test_encode_rejects_a_record_longer_than_max_length(tokenizer: PreTrainedTokenizerBase) -> None:
    records = [Record(prompt="a", completion=" b"), Record(prompt="fever " * 40, completion=" x")]
    with pytest.raises(DataError, match=r"record 1 is \d+ tokens .* longer than max_length=16"):
        encode(records, tokenizer, max_length=16)
    with pytest.raises(DataError, match="no records"):
        encode([], tokenizer, max_length=16)


_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)


@settings(max_examples=60, deadline=None)
@given(prompt=_text, completion=_text.filter(lambda s: s.strip() != ""))
def test_encode_targets_decode_to_the_completion(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str
) -> None:
    batch = encode(
        [Record(prompt="x", completion=" y"), Record(prompt=prompt, completion=completion)], tokenizer, max_length=None
    )
    targets = batch.input_ids[1, 1:][batch.loss_mask[1, :-1]].tolist()  # the tokens the loss is taken on
    assert targets[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(targets[:-1], clean_up_tokenization_spaces=False) == completion
    assert batch.input_ids[1, batch.lengths[1] :].eq(tokenizer.pad_token_id).all()


def test_per_record_loss_matches_a_loop(tokenizer: PreTrainedTokenizerBase) -> None:
    records = [Record(prompt="Diagnosis:", completion=" urinary tract infection"), Record(prompt="", completion="hi")]
    batch = encode(records, tokenizer, max_length=None)
    logits = torch.randn(*batch.input_ids.shape, 37 + len(tokenizer), generator=torch.Generator().manual_seed(0))
    got = per_record_loss(logits, batch)
    for i in range(len(records)):
        positions = batch.loss_mask[i].nonzero().squeeze(1)
        want = F.cross_entropy(logits[i, positions], batch.input_ids[i, positions + 1])
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-5)


# --- evaluate ------------------------------------------------------------------------------


def _oracle(tokenizer: PreTrainedTokenizerBase, records: list[Record]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A logits_fn that puts its mass on the true completion after each known prompt."""
    batch = encode(records, tokenizer, max_length=None)
    next_token: dict[tuple[int, ...], int] = {}
    for i in range(len(records)):
        ids = batch.input_ids[i, : batch.lengths[i]].tolist()
        for t in batch.loss_mask[i].nonzero().squeeze(1).tolist():
            next_token[tuple(ids[: t + 1])] = ids[t + 1]

    def logits_fn(input_ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*input_ids.shape, len(tokenizer))
        for b, row in enumerate(input_ids.tolist()):
            for t in range(len(row)):
                token = next_token.get(tuple(row[: t + 1]))
                if token is not None:
                    logits[b, t, token] = 30.0
        return logits

    return logits_fn


def test_evaluate_oracle_is_perfect_and_uniform_is_chance(tokenizer: PreTrainedTokenizerBase) -> None:
    data = synthetic_clinical(sites=1, records_per_site=8, test_records=32, seed=3)
    test = list(data.test)
    known = evaluate(_oracle(tokenizer, test), tokenizer, test, data.labels, batch_size=7)
    assert isinstance(known, Evaluation) and known.accuracy == known["accuracy"]
    assert known["accuracy"] == 1.0
    assert known["loss"] < 1e-6
    assert known["chance"] == 1 / len(data.labels)

    def uniform(input_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, len(tokenizer))

    flat = evaluate(uniform, tokenizer, test, data.labels, batch_size=16)
    # Uniform logits favour the label of fewest tokens; the test set is balanced, so that is chance.
    assert flat["accuracy"] == pytest.approx(flat["chance"])
    assert flat["loss"] == pytest.approx(math.log(len(tokenizer)), rel=1e-5)


def test_evaluation_fields_and_json_form() -> None:
    scores = Evaluation(loss=0.5, accuracy=0.25, chance=0.125)
    assert list(scores.as_dict().items()) == [("loss", 0.5), ("accuracy", 0.25), ("chance", 0.125)]
    assert dict(scores) == scores.as_dict() and len(scores) == 3  # the read-only mapping of the same keys
    assert scores["loss"] == scores.loss
    with pytest.raises(KeyError):
        scores["f1"]


def test_evaluate_rejects_an_unknown_label(tokenizer: PreTrainedTokenizerBase) -> None:
    records = [Record(prompt="Diagnosis:", completion=" flu")]
    with pytest.raises(DataError, match=r"record 0 has completion ' flu'"):
        evaluate(lambda ids: torch.zeros(*ids.shape, 8), tokenizer, records, ("stroke",), batch_size=4)
    with pytest.raises(DataError, match="batch_size=0"):
        evaluate(lambda ids: torch.zeros(*ids.shape, 8), tokenizer, records, ("flu",), batch_size=0)


def test_evaluate_checks_the_logits_shape(tokenizer: PreTrainedTokenizerBase) -> None:
    records = [Record(prompt="Diagnosis:", completion=" flu")]
    with pytest.raises(DataError, match="do not match input_ids"):
        evaluate(lambda ids: torch.zeros(1, 2, 8), tokenizer, records, ("flu",), batch_size=4)


def test_records_survive_json(tmp_path: Path) -> None:
    data = synthetic_clinical(sites=2, records_per_site=5, test_records=4, seed=1)
    write_jsonl(data.test, tmp_path / "t.jsonl")
    lines = (tmp_path / "t.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["completion"].strip() in data.labels for line in lines] == [True] * 4
    assert tuple(load_jsonl(tmp_path / "t.jsonl")) == data.test
