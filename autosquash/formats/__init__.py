"""File formats at the bottom of the stack: GGUF tensor types and byte sizes, block layouts and decoders, GGUF
files, and autosquash's torch format (safetensors)."""
