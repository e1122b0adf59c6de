"""Measuring quality: offline texts, per-trial proxies, LoRA healing."""
