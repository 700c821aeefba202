"""Interoperability with other frameworks' model formats (``interop.hf_detr``: HF transformers DETR families)."""
