"""`RemoteModelForCausalLM`: a causal LM whose blocks run in the swarm.

It behaves like the local `transformers` model for what Corolla needs: `forward`
returns `.logits` (and `.loss` given labels), `generate` does greedy or sampled
decoding with the same logits processors and stopping rule as `transformers`, and can
stream tokens to a `transformers` streamer. Only the embeddings, the final norm and
the LM head are loaded here; the blocks are the servers'.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.modeling_outputs import CausalLMOutput

from corolla.inference.client.adapter import LoraAdapter
from corolla.inference.client.adapter_sync import AdapterSync
from corolla.inference.client.auditor import WorkAuditor
from corolla.inference.client.routing import BanList
from corolla.inference.client.sequential import RemoteSequential
from corolla.inference.client.session import InferenceSession
from corolla.inference.client.swarm import Swarm
from corolla.inference.errors import BadRequestError
from corolla.inference.models.checkpoint import Checkpoint
from corolla.inference.security import TlsConfig

_UNSET: Any = object()


class RemoteModelForCausalLM(nn.Module):
    def __init__(
        self,
        checkpoint: Checkpoint,
        swarm: Swarm,
        *,
        wire_dtype: torch.dtype | None = None,
        spot_checker: WorkAuditor | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        """`device` ("cpu", "cuda", or `resolve_device(DeviceKind.AUTO)`) holds the embeddings and the
        head and runs them; hidden states cross it to the cpu for the wire and back."""
        super().__init__()
        self.checkpoint = checkpoint
        self.config = checkpoint.config
        self.swarm = swarm
        self.wire_dtype = wire_dtype
        self.device = torch.device(device)
        self.client_parts = checkpoint.load_client(device=self.device)
        self.num_blocks = checkpoint.num_blocks
        self.blocks = RemoteSequential(swarm, num_blocks=self.num_blocks, wire_dtype=wire_dtype)
        self.adapter: LoraAdapter | None = None
        self.spot_checker: WorkAuditor | None = None
        if spot_checker is not None:
            self.use_spot_checker(spot_checker)
        try:
            self.generation_config = GenerationConfig.from_pretrained(checkpoint.path)
        except OSError:
            self.generation_config = GenerationConfig.from_model_config(self.config)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        initial_peers: Sequence[str] = (),
        servers: Sequence[str] = (),
        model_id: str | None = None,
        wire_dtype: torch.dtype | None = None,
        bans: BanList | None = None,
        timeout: float = 60.0,
        tls: TlsConfig | None = None,
        spot_checker: WorkAuditor | None = None,
        device: torch.device | str = "cpu",
    ) -> RemoteModelForCausalLM:
        """Load the client parts of the checkpoint at `path` and join the swarm through
        `initial_peers` (DHT multiaddrs) or fixed `servers` (gRPC endpoints). With `tls`
        (this node's identity), every channel is mutual TLS and only certified servers count.
        With `spot_checker`, see `use_spot_checker`."""
        checkpoint = Checkpoint.open(path)
        swarm = Swarm(
            model_id=model_id or checkpoint.model_id,
            initial_peers=initial_peers,
            servers=servers,
            bans=bans,
            timeout=timeout,
            tls=tls,
        )
        return cls(checkpoint, swarm, wire_dtype=wire_dtype, spot_checker=spot_checker, device=device)

    def use_adapter(self, adapter: LoraAdapter | None) -> None:
        """Apply `adapter` (client-held LoRA weights) in every forward, backward and generation
        from now on; None goes back to the base model."""
        self.adapter = adapter
        self.blocks.adapter = None if adapter is None else AdapterSync(adapter, model_id=self.swarm.model_id)

    def use_spot_checker(self, checker: WorkAuditor | None) -> None:
        """Audit a sample of every forward, backward and generation step from now on with
        `checker`, and route around the nodes its reputation book quarantines; None stops both."""
        self.spot_checker = checker
        self.blocks.spot_checker = checker
        if checker is not None:
            checker.attach(self.swarm.router)
        else:
            self.swarm.router.exclude = None
            self.swarm.router.invalidate()

    def load_adapter(self, directory: str | Path) -> LoraAdapter:
        """Load a PEFT LoRA adapter directory and apply it (see `use_adapter`)."""
        adapter = LoraAdapter.load_peft(directory, self.checkpoint)
        self.use_adapter(adapter)
        return adapter

    def close(self) -> None:
        self.swarm.close()

    def __enter__(self) -> RemoteModelForCausalLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- forward -----------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> CausalLMOutput:
        """`(B, T)` ids -> logits `(B, T, V)`; with `labels`, the shifted cross-entropy
        (label -100 ignored) as `transformers` computes it."""
        hidden = self.client_parts.embed(input_ids.to(self.device))
        hidden = self.blocks(hidden.cpu()).to(self.device)  # the wire is on the cpu; autograd follows the moves
        logits = self.client_parts.head(hidden)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                labels[:, 1:].to(self.device).reshape(-1),
                ignore_index=-100,
            )
        return CausalLMOutput(loss=loss, logits=logits)

    # -- generation --------------------------------------------------------------------------

    def inference_session(self, *, max_length: int, batch_size: int = 1) -> InferenceSession:
        return InferenceSession(
            self.swarm,
            start=0,
            end=self.num_blocks,
            max_length=max_length,
            batch_size=batch_size,
            wire_dtype=self.wire_dtype,
            adapter=self.blocks.adapter,
            spot_checker=self.spot_checker,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | Mapping[str, Any] | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | list[int] | None = _UNSET,
        pad_token_id: int | None = _UNSET,
        streamer: Any = None,
        generator: torch.Generator | None = None,
        session: InferenceSession | None = None,
    ) -> torch.LongTensor:
        """Prompt `(B, T)` -> `(B, T + new)` ids. Greedy unless `do_sample`. Sequences that
        hit EOS (by default the generation config's, as in `transformers`) are padded while the
        others go on; all finished ends the loop early.

        The prompt is what a tokenizer gives, as `transformers` takes it: an `input_ids` tensor,
        `**encoding` (`input_ids=`, `attention_mask=`), or the encoding itself, e.g. what
        `tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")`
        returns. An attention mask must be all ones: prompts are not padded here."""
        input_ids = _prompt_ids(input_ids, attention_mask)
        if max_new_tokens < 0:
            raise BadRequestError(f"max_new_tokens={max_new_tokens} must be non-negative")
        eos = self.generation_config.eos_token_id if eos_token_id is _UNSET else eos_token_id
        eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), dtype=torch.long)
        pad = self.generation_config.pad_token_id if pad_token_id is _UNSET else pad_token_id
        if pad is None and len(eos_ids):
            pad = int(eos_ids[0])
        warpers = LogitsProcessorList()
        if do_sample:
            if temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(temperature))
            if top_k:
                warpers.append(TopKLogitsWarper(top_k))
            if top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p))
        batch, prompt_len = input_ids.shape
        own_session = session is None
        if session is None:
            session = self.inference_session(max_length=prompt_len + max_new_tokens, batch_size=batch)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        ids = input_ids
        unfinished = torch.ones(batch, dtype=torch.bool)
        step_input = input_ids
        try:
            for _ in range(max_new_tokens):
                hidden = self.client_parts.embed(step_input.to(self.device), session.position)
                hidden = session.step(hidden.cpu()).to(self.device)
                scores = self.client_parts.head(hidden[:, -1:])[:, -1].to("cpu", torch.float32)
                if do_sample:
                    scores = warpers(ids, scores)  # type: ignore[arg-type]
                    probs = nn.functional.softmax(scores, dim=-1)
                    tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
                else:
                    tokens = torch.argmax(scores, dim=-1)
                if len(eos_ids) and pad is not None:
                    tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad))
                ids = torch.cat([ids, tokens[:, None].to(ids.device)], dim=1)  # on the prompt's device
                if streamer is not None:
                    streamer.put(tokens.cpu())
                if len(eos_ids):
                    unfinished &= ~torch.isin(tokens, eos_ids)
                    if not unfinished.any():
                        break
                step_input = tokens[:, None]
        finally:
            if own_session:
                session.close()
            if streamer is not None:
                streamer.end()
        return ids  # type: ignore[return-value]


def _prompt_ids(inputs: torch.Tensor | Mapping[str, Any] | None, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The `(B, T)` prompt ids of `generate`'s arguments; a mask with padding is refused, not ignored."""
    if isinstance(inputs, Mapping):  # a BatchEncoding or a plain dict of the tokenizer's outputs
        if "input_ids" not in inputs:
            raise BadRequestError(f"generate got a mapping without input_ids (keys: {sorted(inputs)})")
        if attention_mask is None:
            attention_mask = inputs.get("attention_mask")
        inputs = inputs["input_ids"]
    if not isinstance(inputs, torch.Tensor):
        raise BadRequestError(
            f"generate needs input_ids as a (batch, tokens) tensor of token ids, got {type(inputs).__name__}"
        )
    if inputs.dim() != 2 or inputs.shape[1] == 0:
        raise BadRequestError(f"input_ids must be (batch, tokens) with tokens > 0, got {tuple(inputs.shape)}")
    if inputs.is_floating_point() or inputs.is_complex():
        raise BadRequestError(f"input_ids must hold integer token ids, got {inputs.dtype}")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(inputs.shape):
            raise BadRequestError(
                f"attention_mask {tuple(attention_mask.shape)} must have the shape of input_ids {tuple(inputs.shape)}"
            )
        if not bool((attention_mask == 1).all()):
            raise BadRequestError(
                "attention_mask has padding (zeros): the swarm generates unpadded prompts only; "
                "generate prompts of different lengths one at a time"
            )
    return inputs
