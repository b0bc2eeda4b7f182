"""Integrations with the Hugging Face stack, each imported on demand so the core needs only torch.

- :mod:`kbit.integrations.transformers`: ``KbitConfig`` for ``from_pretrained(..., quantization_config=...)``,
  4-bit checkpoints in bitsandbytes' format, loading bitsandbytes 4-bit checkpoints without bitsandbytes.
- :mod:`kbit.integrations.peft`: LoRA on kbit ``Linear4bit`` layers (QLoRA), merging into a float model,
  ``prepare_model_for_kbit_training``.

Both need the ``hf`` extra: ``pip install "kbit[hf]"``.
"""
