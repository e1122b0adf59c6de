"""Deployment files: GGUF for llama.cpp."""
