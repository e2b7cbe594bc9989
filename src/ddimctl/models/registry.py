"""The registry of pretrained models: weights.toml (packaged), plus the user's $DDIMCTL_REGISTRY file."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

from . import layouts
from ..schedule import PAPER_SKIPS, PREDICTIONS
from ..errors import DdimctlError
from ..io.fields import Fields
from ..io.files import read_regular
from .unet import PRESETS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib



@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    architecture: str
    resolution: int
    schedule: dict
    skip: str
    license: str
    repo: str = ""
    revision: str = "main"
    file: str = ""
    sha256: str = ""
    params: int = 0
    bundled: str = ""  # a file inside the package instead of a Hub download
    prediction: str = "epsilon"  # what the network predicts (schedule.PREDICTIONS)
    extra: dict = field(default_factory=dict)

    @property
    def source(self) -> str:
        return "bundled" if self.bundled else f"hf://{self.repo}"


def registry_path() -> Path:
    """weights.toml: inside the installed package, or at the root of a source checkout."""
    packaged = resources.files("ddimctl").joinpath("weights.toml")
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[3] / "weights.toml"


@cache
def _registry_file() -> dict:
    return tomllib.loads(registry_path().read_text())


@cache
def registry() -> dict[str, ModelEntry]:
    """weights.toml, plus the models of the file named by $DDIMCTL_REGISTRY (a user's own list)."""
    data = dict(_registry_file())
    extra_file = os.environ.get("DDIMCTL_REGISTRY")
    if extra_file:
        try:
            extra = tomllib.loads(read_regular(extra_file).decode("utf-8"))
        except DdimctlError as e:
            raise DdimctlError(f"DDIMCTL_REGISTRY={extra_file}: {e}") from e
        except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as e:
            raise DdimctlError(f"DDIMCTL_REGISTRY={extra_file}: not a readable TOML file ({e})") from e
        for table in ("schedule", "models"):
            if not isinstance(extra.get(table, {}), dict):
                raise DdimctlError(
                    f"DDIMCTL_REGISTRY={extra_file}: [{table}] must be a table of entries, such as [models.NAME]"
                )
        data["schedule"] = {**data.get("schedule", {}), **extra.get("schedule", {})}
        data["models"] = {**data["models"], **extra.get("models", {})}
    schedules = {name: layouts.schedule_from(Fields(table, f"the registry's [schedule.{name}]")).to_dict()
                 for name, table in data.get("schedule", {}).items()}
    known = {f for f in ModelEntry.__dataclass_fields__ if f not in {"name", "schedule", "extra"}}
    entries = {}
    for name, raw in data["models"].items():
        check_entry(name, raw)
        raw = dict(raw)
        schedule_name = raw.pop("schedule", "ddpm-linear")
        if schedule_name not in schedules:
            raise DdimctlError(f"model {name!r} in the registry names an unknown schedule {schedule_name!r}")
        extra = {k: v for k, v in raw.items() if k not in known}
        notes = [k for k, v in extra.items() if k != "unet" and not isinstance(v, str)]
        if notes:  # other fields are notes for people (data_source, training_command, ...)
            raise DdimctlError(f"model {name!r} in the registry: {notes[0]} must be a string (a note), got {extra[notes[0]]!r}")
        entries[name] = ModelEntry(name=name, schedule=schedules[schedule_name],
                                   **{k: v for k, v in raw.items() if k in known}, extra=extra)
    return entries


# Fields every registry entry needs, and the type each field must have.
REQUIRED_FIELDS = ("description", "architecture", "resolution", "skip", "license")
FIELD_TYPES = {"resolution": int, "params": int, "description": str, "architecture": str, "skip": str,
               "license": str, "repo": str, "revision": str, "file": str, "sha256": str, "bundled": str, "schedule": str,
               "prediction": str}
TYPE_NAMES = {int: "an integer", str: "a string"}


NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")  # a model name is a folder name in the cache
REVISION = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")  # a branch, tag, commit or refs/pr/N
HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def safe_relative(path: str) -> bool:
    """A relative path of plain components: no '..', '.', empty part, backslash or drive."""
    parts = path.split("/")
    return bool(path) and "\\" not in path and ":" not in path and all(p not in ("", ".", "..") for p in parts)


def check_names(name: str, raw: dict) -> None:
    """The fields that become paths (the cache's folders, the Hub's URLs) are untrusted: each must
    be a plain name that cannot leave its root."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    where = f"model {name!r} in the registry"
    if not NAME.match(name) or name in (".", ".."):
        raise DdimctlError(f"{where}: a model name is letters, digits, '.', '_' and '-' (at most 96), starting "
                           f"with a letter or digit; rename it")
    if raw.get("repo"):
        try:
            validate_repo_id(raw["repo"])
        except HFValidationError:
            raise DdimctlError(f"{where}: repo {raw['repo']!r} is not a Hub repository id such as google/ddpm-cifar10-32") from None
    revision = raw.get("revision", "main")
    if not (REVISION.match(revision) and safe_relative(revision)):
        raise DdimctlError(f"{where}: revision {revision!r} is not a branch, tag or commit name")
    if raw.get("file") and not safe_relative(raw["file"]):
        raise DdimctlError(f"{where}: file {raw['file']!r} must be a path inside the repository (no '..', no leading '/')")
    if raw.get("bundled") and not (NAME.match(raw["bundled"]) and raw["bundled"] not in (".", "..")):
        raise DdimctlError(f"{where}: bundled {raw['bundled']!r} must be a file name in ddimctl's bundled folder")
    if raw.get("sha256") and not HEX64.match(raw["sha256"]):
        raise DdimctlError(f"{where}: sha256 must be 64 hexadecimal digits, got {raw['sha256']!r}")


def check_entry(name: str, raw) -> None:
    """One-line errors for a malformed registry entry (a user's DDIMCTL_REGISTRY file, say)."""
    where = f"model {name!r} in the registry"
    if not isinstance(raw, dict):
        raise DdimctlError(f"{where} is a {type(raw).__name__}, not a table; write it as [models.{name}] with its fields")
    missing = [f for f in REQUIRED_FIELDS if f not in raw]
    if missing:
        raise DdimctlError(f"{where} lacks {', '.join(missing)}; see weights.toml for a complete entry")
    for key, kind in FIELD_TYPES.items():
        if key in raw and (not isinstance(raw[key], kind) or isinstance(raw[key], bool)):
            raise DdimctlError(f"{where}: {key} must be {TYPE_NAMES[kind]}, got {raw[key]!r}")
    if not raw.get("bundled") and not (raw.get("repo") and raw.get("file")):
        raise DdimctlError(f"{where} needs repo and file (a Hub download) or bundled (a packaged file)")
    check_names(name, raw)
    fields = Fields(raw, where)
    fields.text("skip", choices=PAPER_SKIPS)
    fields.text("prediction", "epsilon", PREDICTIONS)
    fields.text("architecture", choices=tuple(PRESETS))
    resolution = fields.integer("resolution", low=1, high=layouts.MAX_RESOLUTION)
    if "unet" in raw:  # overrides of the architecture's fields
        unet = fields.table("unet")
        layouts.unet_config_from(Fields({**PRESETS[raw["architecture"]].to_dict(), "resolution": resolution,
                                         **unet.data}, unet.where))


def default_model() -> str:
    return _registry_file().get("default", "cifar10")
