"""Phone profiles: the shipped ones load, and a malformed user file names its file and field."""

from pathlib import Path

import pytest
import yaml

from autosquash.cost import PhoneProfile, list_phones, load_phone, shipped_phone_names
from autosquash.errors import AutosquashError
from autosquash.yaml_io import dump_yaml_model

SHIPPED = {"iphone-16", "pixel-9-pro", "galaxy-s24-ultra", "galaxy-s25-ultra", "oneplus-12", "midrange-6gb"}


def test_every_shipped_profile_loads_with_its_own_name() -> None:
    assert SHIPPED <= set(shipped_phone_names())
    for phone in list_phones():
        assert isinstance(phone, PhoneProfile)
        assert phone.name in shipped_phone_names()
        assert load_phone(phone.name) == phone


def test_battery_energy_of_iphone_16() -> None:
    # DESIGN.md §4: 3561 mAh is about 49 kJ; 2 % covers the nominal-voltage choice (3.85 V).
    assert load_phone("iphone-16").battery_j == pytest.approx(49_000, rel=0.02)


def test_unknown_name_lists_the_shipped_profiles() -> None:
    with pytest.raises(AutosquashError) as e:
        load_phone("nokia-3310")
    assert "nokia-3310" in str(e.value)
    for name in SHIPPED:
        assert name in str(e.value)


def _user_profile(tmp_path: Path, edit: dict) -> Path:
    """A copy of the iPhone 16 profile with some fields changed (None removes one)."""
    data = load_phone("iphone-16").model_dump() | {"name": "my-phone"}
    for key, value in edit.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    path = tmp_path / "my-phone.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_user_profile_loads_from_a_path(tmp_path: Path) -> None:
    path = _user_profile(tmp_path, {"dram_bytes": 12 * 2**30})
    phone = load_phone(str(path))
    assert phone.name == "my-phone" and phone.dram_bytes == 12 * 2**30
    assert load_phone(path) == phone


def test_profile_round_trips_through_yaml(tmp_path: Path) -> None:
    phone = load_phone("galaxy-s25-ultra")
    dump_yaml_model(phone, tmp_path / "copy.yaml")
    assert load_phone(str(tmp_path / "copy.yaml")) == phone


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ({"dram_bytes": None}, "dram_bytes"),  # missing
        ({"peak_bandwidth_bytes_per_s": "fast"}, "peak_bandwidth_bytes_per_s"),  # wrong type
        ({"gpu_cores": 5}, "gpu_cores"),  # unknown field
        ({"bandwidth_efficiency": 1.5}, "bandwidth_efficiency"),  # out of range
        ({"sources": {"dram_bytes": "spec sheet"}}, "sources"),  # constants without a source
    ],
)
def test_malformed_profile_names_file_and_field(tmp_path: Path, edit: dict, field: str) -> None:
    path = _user_profile(tmp_path, edit)
    with pytest.raises(AutosquashError) as e:
        load_phone(str(path))
    assert str(path) in str(e.value)
    assert repr(field) in str(e.value)


def test_missing_source_names_the_constant(tmp_path: Path) -> None:
    sources = dict(load_phone("iphone-16").sources)
    del sources["battery_mah"]
    with pytest.raises(AutosquashError, match="battery_mah"):
        load_phone(str(_user_profile(tmp_path, {"sources": sources})))


def test_missing_file_is_an_autosquash_error(tmp_path: Path) -> None:
    with pytest.raises(AutosquashError, match="nothing.yaml"):
        load_phone(str(tmp_path / "nothing.yaml"))
