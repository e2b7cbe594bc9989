"""registry.py: weights.toml and a user's $DDIMCTL_REGISTRY file."""

import hashlib
import re
from importlib import resources

import pytest

from ddimctl.models import registry
from ddimctl import schedule
from ddimctl.errors import DdimctlError
from ddimctl.models.unet import PRESETS


@pytest.fixture()
def fresh_registry(monkeypatch):
    """registry() reads its files once per process: start and end each test with an empty cache."""
    registry.registry.cache_clear()
    yield monkeypatch
    registry.registry.cache_clear()


def test_every_packaged_entry_is_complete_and_usable(fresh_registry):
    fresh_registry.delenv("DDIMCTL_REGISTRY", raising=False)
    entries = registry.registry()
    assert registry.default_model() in entries
    for name, entry in entries.items():
        assert entry.architecture in PRESETS, name
        assert PRESETS[entry.architecture].resolution == entry.resolution, name
        assert entry.skip in schedule.PAPER_SKIPS, name
        assert schedule.Schedule.from_dict(entry.schedule).train_steps == 1000, name
        assert entry.bundled or (entry.repo.startswith("google/ddpm-") and entry.file), name
        assert entry.sha256 == "" or len(entry.sha256) == 64, name


def test_the_bundled_file_matches_its_recorded_hash(fresh_registry):
    entry = registry.registry()["digits"]
    data = resources.files("ddimctl").joinpath("bundled", entry.bundled).read_bytes()
    assert hashlib.sha256(data).hexdigest() == entry.sha256
    assert len(data) <= 10 * 2**20  # the size limit for the bundled model


def test_a_user_file_adds_models_and_schedules(fresh_registry, tmp_path):
    (tmp_path / "mine.toml").write_text(
        '[schedule.short]\nkind = "linear"\ntrain_steps = 500\nbeta_start = 0.0001\nbeta_end = 0.02\n'
        '[models.mine]\ndescription = "my model"\narchitecture = "tiny"\nresolution = 16\nskip = "quad"\n'
        'license = "MIT"\nrepo = "me/mine"\nfile = "m.safetensors"\nschedule = "short"\n'
    )
    fresh_registry.setenv("DDIMCTL_REGISTRY", str(tmp_path / "mine.toml"))
    entries = registry.registry()
    assert "digits" in entries and entries["mine"].schedule["train_steps"] == 500
    assert entries["mine"].source == "hf://me/mine"


@pytest.mark.parametrize(
    "text, message",
    [
        ('[models.x]\ndescription = "x"\n', "lacks architecture, resolution, skip, license"),
        ('[models.x]\ndescription = "x"\narchitecture = "tiny"\nresolution = true\nskip = "quad"\nlicense = "MIT"\n',
         "resolution must be an integer, got True"),
        ('[models.x]\ndescription = "x"\narchitecture = "tiny"\nresolution = 16\nskip = "quad"\nlicense = "MIT"\n',
         "needs repo and file (a Hub download) or bundled"),
    ],
)
def test_a_malformed_user_entry_is_named(fresh_registry, tmp_path, text, message):
    (tmp_path / "bad.toml").write_text(text)
    fresh_registry.setenv("DDIMCTL_REGISTRY", str(tmp_path / "bad.toml"))
    with pytest.raises(DdimctlError, match=f"^model 'x' in the registry.*{re.escape(message)}"):
        registry.registry()
