"""Output key naming: LoRA key styles (``lora_keys``), text-encoder keys (``te_keys``),
diffusers names (``diffusers_keys``) and fused-parameter slices (``key_slice``)."""
