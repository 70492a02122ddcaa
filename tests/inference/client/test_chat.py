"""Chat prompts: `generate` takes what `tokenizer.apply_chat_template` returns, as `transformers`
does, and `platform generate --chat` prints the reply the local model gives to the templated prompt.

The tiny Llama is copied with a chat template of its own (it ships none); the real SmolLM2's
template is exercised in tests/e2e/test_real_model.py.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corolla.inference.client import RemoteModelForCausalLM
from corolla.inference.device import DeviceKind
from corolla.inference.errors import BadRequestError
from corolla.inference.server import BlockServer
from corolla.platform.cli import main

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)
MESSAGES = [{"role": "user", "content": "fever and cough for three days"}]


@pytest.fixture(scope="module")
def chat_llama(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a chat template (`chat_template.jinja`, as `save_pretrained` writes it)."""
    directory = tmp_path_factory.mktemp("chat-llama") / "model"
    shutil.copytree(tiny_llama, directory)
    (directory / "chat_template.jinja").write_text(TEMPLATE)
    return directory


@pytest.fixture
def remote(chat_llama: Path, start_server: Callable[..., BlockServer]) -> Iterator[RemoteModelForCausalLM]:
    servers = [start_server(chat_llama, span, device=DeviceKind.CPU) for span in [(0, 2), (2, 4)]]
    with RemoteModelForCausalLM.from_pretrained(chat_llama, servers=[s.endpoint for s in servers]) as model:
        yield model


def test_generate_takes_the_chat_template_encoding_as_transformers_does(
    remote: RemoteModelForCausalLM, chat_llama: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(chat_llama)
    encoding = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt")
    assert not isinstance(encoding, torch.Tensor)  # transformers 5 returns a BatchEncoding here
    local = AutoModelForCausalLM.from_pretrained(chat_llama).eval()
    want = local.generate(**encoding, max_new_tokens=12, do_sample=False)
    assert want.shape[1] > encoding["input_ids"].shape[1]
    assert torch.equal(remote.generate(**encoding, max_new_tokens=12), want)
    assert torch.equal(remote.generate(encoding, max_new_tokens=12), want)
    assert torch.equal(remote.generate(encoding["input_ids"], max_new_tokens=12), want)


def test_a_padded_prompt_is_refused_not_ignored(remote: RemoteModelForCausalLM) -> None:
    ids = torch.tensor([[5, 6, 7], [0, 8, 9]])
    with pytest.raises(BadRequestError, match="attention_mask has padding"):
        remote.generate(input_ids=ids, attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]), max_new_tokens=2)
    with pytest.raises(BadRequestError, match="without input_ids"):
        remote.generate({"attention_mask": torch.ones(1, 3)}, max_new_tokens=2)
    with pytest.raises(BadRequestError, match="integer token ids"):
        remote.generate(ids.float(), max_new_tokens=2)


def test_generate_chat_prints_only_the_reply_of_the_local_model(
    chat_llama: Path, start_server: Callable[..., BlockServer], capsys: pytest.CaptureFixture[str]
) -> None:
    servers = [start_server(chat_llama, span, device=DeviceKind.CPU) for span in [(0, 2), (2, 4)]]
    prompt = MESSAGES[0]["content"]
    args = ["generate", prompt, "--chat", "--model", str(chat_llama), "--max-new-tokens", "12", "--insecure"]
    args += ["--device", "cpu"]  # compared with the local model on the cpu
    for server in servers:
        args += ["--servers", server.endpoint]
    assert main(args) == 0
    got = capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(chat_llama)
    encoding = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt")
    local = AutoModelForCausalLM.from_pretrained(chat_llama).eval()
    want_ids = local.generate(**encoding, max_new_tokens=12, do_sample=False)[0, encoding["input_ids"].shape[1] :]
    assert got == tokenizer.decode(want_ids, skip_special_tokens=True) + "\n"
    assert "<user>" not in got and prompt not in got


def test_generate_chat_without_a_template_is_one_line_exit_4(
    tiny_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before any server is reached (the endpoint given does not exist)."""
    args = ["generate", "hi", "--chat", "--model", str(tiny_llama), "--servers", "127.0.0.1:1", "--insecure"]
    assert main(args) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"platform generate: {tiny_llama} has no chat template")
