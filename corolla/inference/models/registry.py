"""Which family serves which Hugging Face `model_type`."""

from __future__ import annotations

from transformers import PretrainedConfig

from corolla.inference.errors import ModelLoadError
from corolla.inference.models.family import ModelFamily
from corolla.inference.models.gpt2 import GPT2Family
from corolla.inference.models.llama import LlamaFamily

FAMILIES: tuple[ModelFamily, ...] = (LlamaFamily(), GPT2Family())


def family_for(config: PretrainedConfig) -> ModelFamily:
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = sorted(t for f in FAMILIES for t in f.model_types)
    raise ModelLoadError(f"model_type {model_type!r} is not supported; supported: {', '.join(supported)}")
