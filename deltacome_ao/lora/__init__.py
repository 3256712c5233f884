"""LoRA interoperability: share a delta as a PEFT LoRA adapter, and compress a LoRA adapter.

    peft_format.py   the PEFT adapter files (names, config, reading) and vLLM's constraints on them
    export.py        `export_lora(base, delta, out, ...)`: a delta artifact -> a PEFT / vLLM LoRA adapter
    importer.py      `compress_lora(base, adapter, out, ...)`: a PEFT LoRA adapter -> a delta artifact

See docs/lora.md.
"""

from __future__ import annotations

from .export import export_lora
from .importer import compress_lora
from .peft_format import AdapterFormatError, LoraAdapter, read_adapter, vllm_problems

__all__ = ["export_lora", "compress_lora", "read_adapter", "vllm_problems", "LoraAdapter", "AdapterFormatError"]
