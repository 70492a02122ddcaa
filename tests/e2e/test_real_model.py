"""The real SmolLM2-135M-Instruct through three servers equals local `transformers` (fp32, rtol=0).

Blocks 0:10, 10:20 and 20:30 on three servers: one forward's logits equal the local
`AutoModelForCausalLM`'s within 1e-5, and greedy generation gives the local `generate()`'s
tokens: 64 new tokens of a plain prompt, and the reply to a chat-templated question up to the
generation config's EOS (`<|im_end|>`), where the local model stops; through the Python client
(given the `apply_chat_template` BatchEncoding as it is) and through `platform generate --chat`.
The default variant runs the servers in this process; the `slow` one runs three real
`platform serve` processes, `platform generate --chat` as a process, and each prompt the other
way too (the plain one to its EOS, 64 chat tokens past the EOS).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from corolla.inference.client import RemoteModelForCausalLM
from corolla.inference.device import DeviceKind
from corolla.inference.server.app import BlockServer, ServerConfig
from corolla.platform.cli import main
from corolla.platform.launch.servers import LocalServers

pytestmark = pytest.mark.e2e

ATOL = 1e-5
NEW_TOKENS = 64
SPANS = [(0, 10), (10, 20), (20, 30)]
PLAIN = "The patient presented with a fever of 39 degrees, a dry cough and"
CHAT = "What are the first signs of pneumonia in an elderly patient?"


@pytest.fixture(scope="module")
def local(smollm2: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(smollm2).eval()


@pytest.fixture(scope="module")
def tokenizer(smollm2: Path) -> Any:
    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def endpoints(smollm2: Path) -> Iterator[list[str]]:
    servers = [
        BlockServer(ServerConfig(model=smollm2, blocks=span, dht=False, device=DeviceKind.CPU)).start()
        for span in SPANS
    ]
    try:
        yield [s.endpoint for s in servers]
    finally:
        for server in servers:
            server.stop(grace=0)


def _chat(tokenizer: Any, text: str) -> Any:
    """What a transformers user passes: the BatchEncoding of the templated user message."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt"
    )


def _reply(tokenizer: Any, ids: torch.Tensor, prompt_len: int) -> str:
    return str(tokenizer.decode(ids[0, prompt_len:], skip_special_tokens=True))


@pytest.fixture(scope="module")
def chat_want(local: Any, tokenizer: Any) -> torch.Tensor:
    """Local `generate()` on the templated question: stops at the generation config's EOS."""
    return local.generate(**_chat(tokenizer, CHAT), max_new_tokens=NEW_TOKENS, do_sample=False)  # type: ignore[no-any-return]


def _check_model(
    model: RemoteModelForCausalLM, local: Any, tokenizer: Any, chat_want: torch.Tensor, *, full: bool
) -> None:
    """Logits of both prompts; 64 greedy tokens of the plain prompt (no EOS rule); the chat reply
    to its EOS. With `full`, also each prompt the other way (the plain one to EOS, 64 tokens of
    the chat one past its EOS)."""
    plain = tokenizer(PLAIN, return_tensors="pt")
    chat = _chat(tokenizer, CHAT)
    with torch.no_grad():
        for ids in (plain["input_ids"], chat["input_ids"]):
            torch.testing.assert_close(model(ids).logits, local(ids).logits, rtol=0, atol=ATOL)

    want = local.generate(**plain, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    assert want.shape[1] == plain["input_ids"].shape[1] + NEW_TOKENS
    assert torch.equal(model.generate(**plain, max_new_tokens=NEW_TOKENS, eos_token_id=None), want)

    prompt_len = chat["input_ids"].shape[1]
    assert chat_want.shape[1] - prompt_len >= 16, _reply(tokenizer, chat_want, prompt_len)  # a real reply
    assert torch.equal(model.generate(chat, max_new_tokens=NEW_TOKENS), chat_want)  # the BatchEncoding itself
    if chat_want.shape[1] < prompt_len + NEW_TOKENS:  # stopped early: at the EOS, as transformers does
        assert int(chat_want[0, -1]) == local.generation_config.eos_token_id
    if full:
        want = local.generate(**plain, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(model.generate(plain["input_ids"], max_new_tokens=NEW_TOKENS), want)
        want = local.generate(**chat, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
        assert torch.equal(model.generate(**chat, max_new_tokens=NEW_TOKENS, eos_token_id=None), want)


def test_three_servers_equal_local_transformers(
    endpoints: list[str], local: Any, tokenizer: Any, chat_want: torch.Tensor, smollm2: Path
) -> None:
    with RemoteModelForCausalLM.from_pretrained(smollm2, servers=endpoints) as model:
        _check_model(model, local, tokenizer, chat_want, full=False)


def test_generate_chat_prints_the_local_reply(
    endpoints: list[str], tokenizer: Any, chat_want: torch.Tensor, smollm2: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["generate", CHAT, "--chat", "--model", str(smollm2), "--max-new-tokens", str(NEW_TOKENS), "--insecure"]
    args += ["--device", "cpu"]  # the exactness checked here is the cpu's
    for endpoint in endpoints:
        args += ["--servers", endpoint]
    assert main(args) == 0
    prompt_len = _chat(tokenizer, CHAT)["input_ids"].shape[1]
    assert capsys.readouterr().out == _reply(tokenizer, chat_want, prompt_len) + "\n"


@pytest.mark.slow
def test_platform_serve_processes_equal_local_transformers(
    local: Any, tokenizer: Any, chat_want: torch.Tensor, smollm2: Path
) -> None:
    """The same checks through three `platform serve` processes, and `platform generate --chat`
    as a process of its own."""
    with LocalServers(smollm2, SPANS, torch_threads=1, start_timeout=300, extra_args=["--device", "cpu"]) as swarm:
        with RemoteModelForCausalLM.from_pretrained(smollm2, servers=swarm.endpoints) as model:
            _check_model(model, local, tokenizer, chat_want, full=True)
        command = [sys.executable, "-m", "corolla", "generate", CHAT, "--chat", "--model", str(smollm2)]
        command += ["--max-new-tokens", str(NEW_TOKENS), "--insecure", "--device", "cpu"]
        for endpoint in swarm.endpoints:
            command += ["--servers", endpoint]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    prompt_len = _chat(tokenizer, CHAT)["input_ids"].shape[1]
    assert result.stdout == _reply(tokenizer, chat_want, prompt_len) + "\n"
