"""Hugging Face checkpoint targets: one file per model family, all written through writer.write_hf."""
