"""autosquash: search per-layer compression plans that fit a language model onto a phone."""

__version__ = "0.1.0"
