"""Phone profiles: every constant of the cost model as a YAML field, each with its source."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from autosquash.errors import AutosquashError
from autosquash.yaml_io import load_yaml_model

# Fields that name a profile or set how its runtime runs rather than measure something; every other field
# needs a source.
_UNSOURCED = {"name", "description", "sources", "flash_attention", "ubatch_tokens", "mmap_weights"}


class PhoneProfile(BaseModel):
    """One phone: memory, bandwidth, compute, energy and battery constants (DESIGN.md §4)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    description: str = ""
    dram_bytes: int = Field(gt=0)
    # Share of DRAM one app may hold before the OS kills it (iOS jetsam, Android lmkd).
    app_memory_fraction: float = Field(gt=0, le=1)
    peak_bandwidth_bytes_per_s: float = Field(gt=0)
    # eta: the share of peak DRAM bandwidth that decoding actually reaches.
    bandwidth_efficiency: float = Field(gt=0, le=1)
    fixed_overhead_s_per_token: float = Field(ge=0)
    # What the runtime holds beside its weights, KV cache, compute and output buffers (code, threads, tables).
    runtime_fixed_bytes: int = Field(ge=0)
    # The runtime's settings that size its compute buffer: llama.cpp's flash attention (its default "auto" turns
    # it on for the CPU and Metal backends) and its micro-batch (n_ubatch, 512 by default).
    flash_attention: bool = True
    ubatch_tokens: int = Field(default=512, gt=0)
    # Whether the runtime maps the model file (llama.cpp's default) or reads it into buffers of its own
    # (`--no-mmap`; llama.rn's apps run so), which holds a tied token table twice.
    mmap_weights: bool = True
    # Decode speed once the phone is hot (continuous generation for minutes), as a share of its burst speed.
    sustained_speed_factor: float = Field(gt=0, le=1)
    # Sustained multiply-accumulates per second in prefill, where batched matmuls are compute-bound.
    peak_macs_per_s: float = Field(gt=0)
    dram_energy_j_per_byte: float = Field(gt=0)
    mac_energy_j: float = Field(ge=0)
    # Power drawn while generating that scales with time rather than with bytes or MACs.
    static_power_w: float = Field(ge=0)
    battery_mah: float = Field(gt=0)
    battery_voltage_v: float = Field(gt=0)
    # Field name -> where its value comes from (a URL, a document, or how it was fitted).
    sources: dict[str, str]

    @field_validator("sources")
    @classmethod
    def _every_constant_sourced(cls, v: dict[str, str]) -> dict[str, str]:
        constants = set(cls.model_fields) - _UNSOURCED
        unknown = sorted(set(v) - constants)
        if unknown:
            raise ValueError(
                f"sources name unknown fields {', '.join(unknown)}; expected some of {', '.join(sorted(constants))}"
            )
        missing = sorted(constants - {k for k, s in v.items() if s.strip()})
        if missing:
            raise ValueError(f"no source given for {', '.join(missing)}; every constant needs one")
        return v

    @property
    def app_memory_limit_bytes(self) -> int:
        """What one app may hold of the phone's DRAM."""
        return int(self.app_memory_fraction * self.dram_bytes)

    @property
    def battery_j(self) -> float:
        """Battery energy: capacity times nominal cell voltage (mAh * 3.6 = coulombs)."""
        return self.battery_mah * 3.6 * self.battery_voltage_v


def _profiles_dir() -> Path:
    return Path(str(resources.files("autosquash.cost") / "profiles"))


def shipped_phone_names() -> list[str]:
    """Names of the profiles that ship with autosquash, e.g. 'iphone-16'."""
    return sorted(p.stem for p in _profiles_dir().glob("*.yaml"))


def load_phone(name_or_path: str | Path) -> PhoneProfile:
    """A shipped phone profile by name, or a user's phone profile from a YAML file path."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        return load_yaml_model(PhoneProfile, text)
    names = shipped_phone_names()
    if text not in names:
        raise AutosquashError(
            f"unknown phone {text!r}; expected a phone profile name ({', '.join(names)}) or a YAML file path"
        )
    return load_yaml_model(PhoneProfile, _profiles_dir() / f"{text}.yaml")


def list_phones() -> list[PhoneProfile]:
    """Every shipped phone profile, by name."""
    return [load_phone(n) for n in shipped_phone_names()]
