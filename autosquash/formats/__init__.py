"""File formats at the bottom of the stack: GGUF tensor types and byte sizes, block codecs, GGUF files, and
autosquash's torch format (safetensors)."""
