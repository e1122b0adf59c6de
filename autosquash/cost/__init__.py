"""Phone cost: device profiles (YAML, every constant sourced) and the memory/speed/energy model."""

from autosquash.cost.device import DeviceProfile, list_devices, load_device, shipped_device_names
from autosquash.cost.model import CostReport, estimate, file_tensors, format_report, kv_cache_bytes_per_token

__all__ = [
    "CostReport",
    "DeviceProfile",
    "estimate",
    "file_tensors",
    "format_report",
    "kv_cache_bytes_per_token",
    "list_devices",
    "load_device",
    "shipped_device_names",
]
