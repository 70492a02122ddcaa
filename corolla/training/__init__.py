"""Federated DP fine-tuning of LoRA adapters through the swarm (`platform train`)."""

__all__: list[str] = []
