"""Phone cost: phone profiles (YAML, every constant sourced) and the memory/speed/energy model."""

from autosquash.cost.model import CostReport, estimate, file_tensors, format_report, kv_cache_bytes_per_token
from autosquash.cost.phone import PhoneProfile, list_phones, load_phone, shipped_phone_names

__all__ = [
    "CostReport",
    "PhoneProfile",
    "estimate",
    "file_tensors",
    "format_report",
    "kv_cache_bytes_per_token",
    "list_phones",
    "load_phone",
    "shipped_phone_names",
]
