"""Which timesteps a sampler walks: the named schemes, explicit lists, and schedules fitted to a model.

Every scheme gives S increasing integer timesteps of the model's own schedule (0..T-1), which the
samplers walk downwards before their last step to abar = 1. The paper's two (uniform, quad) are in
schedule.py; the others are defined on the noise level sigma_t = sqrt((1 - abar_t) / abar_t) and land on
the trained timestep whose log sigma is nearest:

- logsnr: uniform in lambda = -log sigma (DPM-Solver's recommended "logSNR" skip);
- karras: the EDM polynomial in sigma with rho = 7 (Karras et al. 2022);
- ays: Align Your Steps' closed-form KL-optimal schedule, uniform in arctan(sigma) (Sabour et al. 2024);
- trailing: diffusers' "trailing" spacing, round(T - i T / S) - 1.

A repeated timestep (possible when S approaches T) is a no-op step and is dropped, as for quad.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import choices
from ..schedule import PAPER_SKIPS, timestep_sequence
from ..errors import DdimctlError, param
from ..io.fields import Fields, is_whole_number, read_json_object

SCHEMES = choices.SKIP_SCHEMES
KARRAS_RHO = 7.0


def log_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """log sigma_t for every trained timestep (increasing in t)."""
    abar = alphas_cumprod.double()
    return 0.5 * (torch.log1p(-abar) - torch.log(abar))


def nearest_timesteps(targets: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The trained timesteps whose log sigma is nearest to each target log sigma, increasing, unique."""
    table = log_sigmas(alphas_cumprod)
    distance = (table[None, :] - targets.double()[:, None]).abs()
    return torch.unique(distance.argmin(dim=1))  # sorted


def _unit(steps: int) -> torch.Tensor:
    """0 .. 1 in `steps` points (one point: 0, the noisiest end)."""
    return torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)


def sigma_targets(scheme: str, steps: int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The log sigma each point of a sigma-defined scheme aims at, from the noisiest down."""
    table = log_sigmas(alphas_cumprod)
    low, high = float(table[0]), float(table[-1])
    u = _unit(steps)
    if scheme == "logsnr":
        return high + u * (low - high)
    if scheme == "karras":
        a, b = math.exp(high) ** (1 / KARRAS_RHO), math.exp(low) ** (1 / KARRAS_RHO)
        return KARRAS_RHO * torch.log(a + u * (b - a))
    if scheme == "ays":
        a, b = math.atan(math.exp(high)), math.atan(math.exp(low))
        return torch.log(torch.tan(a + u * (b - a)))
    raise ValueError(f"{scheme!r} is not a sigma-defined scheme")


def scheme_sequence(scheme: str, steps: int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The increasing timesteps of a named scheme for S = steps on this schedule."""
    train_steps = alphas_cumprod.shape[0]
    if not 1 <= steps <= train_steps:
        raise ValueError(f"steps must be between 1 and {train_steps}, got {steps}")
    if scheme in PAPER_SKIPS:
        return timestep_sequence(steps, train_steps, scheme)
    if scheme == "trailing":
        points = torch.arange(steps, dtype=torch.float64) * (train_steps / steps)
        return torch.unique(torch.round(train_steps - points).long() - 1)
    if scheme in ("logsnr", "karras", "ays"):
        return nearest_timesteps(sigma_targets(scheme, steps, alphas_cumprod), alphas_cumprod)
    raise ValueError(f"unknown skip scheme {scheme!r}; use one of {', '.join(SCHEMES)}, or explicit timesteps")


# --------------------------------------------------------------------------------------------
# Explicit timesteps: a list such as diffusers users write (999,700,450,200,50), kept in Settings as
# its canonical text (increasing, comma-separated), so records and files carry the values.


def parse_list(text: str) -> tuple[int, ...]:
    """Strictly monotone integer timesteps, in either direction, as an increasing tuple."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or not all(is_whole_number(p) for p in parts):
        raise ValueError(f"timesteps are whole numbers separated by commas, such as 999,700,450,200,50; got {text!r}")
    values = [int(p) for p in parts]
    if len(values) > 1 and not (all(a < b for a, b in zip(values, values[1:])) or all(a > b for a, b in zip(values, values[1:]))):
        raise ValueError(f"timesteps must be strictly increasing or strictly decreasing, got {text!r}")
    return tuple(sorted(values))


def is_list(skip: str) -> bool:
    return "," in skip or is_whole_number(skip)


def canonical(values) -> str:
    return ",".join(str(int(v)) for v in sorted(values))


def sequence(skip: str, steps: int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The timesteps of `skip`, a scheme name or an explicit list, for S = steps on this schedule."""
    if not is_list(skip):
        return scheme_sequence(skip, steps, alphas_cumprod)
    values = parse_list(skip)
    train_steps = alphas_cumprod.shape[0]
    if values[-1] >= train_steps:
        raise ValueError(f"timestep {values[-1]} is beyond the model's {train_steps} train steps (0..{train_steps - 1})")
    if len(values) != steps:
        raise ValueError(f"{len(values)} timesteps given for {steps} steps")
    return torch.tensor(values, dtype=torch.long)


def check(skip: str) -> None:
    """Raise ValueError unless `skip` is a scheme name or a well-formed explicit list."""
    if is_list(skip):
        parse_list(skip)
    elif skip not in SCHEMES:
        raise ValueError(f"unknown skip scheme {skip!r}; use one of {', '.join(SCHEMES)}, or explicit timesteps")


# --------------------------------------------------------------------------------------------
# Tuned files (`ddimctl tune-steps --out F.json`, used as `--skip F.json`): timesteps fitted to one
# model, named by its weights' sha256, and one sampler.

TUNED_FORMAT = "ddimctl-timesteps"


@dataclass(frozen=True)
class Tuned:
    where: str
    model: str
    weights_sha256: str
    sampler: str
    steps: int
    timesteps: tuple[int, ...]

    def check(self, model: str, weights_sha256: str, sampler: str) -> None:
        """Refuse timesteps fitted to another model or sampler."""
        if self.weights_sha256 != weights_sha256:
            raise DdimctlError(f"{self.where} was tuned for model {self.model} (weights {self.weights_sha256[:12]}), "
                               f"not {model} (weights {weights_sha256[:12]}); tune this model with `ddimctl tune-steps`")
        if self.sampler != sampler:
            raise DdimctlError(f"{self.where} was tuned for the {self.sampler} sampler, not {sampler}; pass "
                               f"{param('sampler')} {self.sampler} or tune {sampler}")


TUNED_FOLDER = "tuned"  # in a model or run folder: its own tune-steps files, named SAMPLER-S.json


def tuned_file(model: str, sampler: str, steps: int | None) -> Path:
    """The tuned timesteps `--skip tuned` takes for a model: those a model or run folder keeps in its
    tuned/ folder (SAMPLER-S.json), or those ddimctl ships for a registry model. Either way the file
    names the weights it was fitted to, and is refused for others (Tuned.check)."""
    from importlib import resources

    from ..models.registry import NAME

    if not NAME.match(sampler.replace("+", "p")):
        raise DdimctlError(f"{param('skip')} tuned: {sampler!r} is not a sampler name")
    folder = Path(model).expanduser()
    if folder.is_dir():
        shipped = sorted((folder / TUNED_FOLDER).glob(f"{sampler}-*.json"))
        where = f"{folder / TUNED_FOLDER}"
    elif NAME.match(model):
        bundled = Path(str(resources.files("ddimctl").joinpath("bundled", "tuned")))
        shipped = sorted(bundled.glob(f"{model}-{sampler}-*.json")) if bundled.is_dir() else []
        where = "ddimctl's shipped files"
    else:
        raise DdimctlError(f"{param('skip')} tuned: ddimctl finds tuned timesteps for registry models and in a model "
                           f"folder's {TUNED_FOLDER}/; for {model}, fit them with `ddimctl tune-steps` and pass --skip F.json")
    calls = {int(p.stem.rsplit("-", 1)[1]): p for p in shipped if is_whole_number(p.stem.rsplit("-", 1)[1])}
    if not calls:
        raise DdimctlError(f"{param('skip')} tuned: no tuned timesteps for {sampler} on {model} in {where}; fit them "
                           f"with `ddimctl tune-steps --model {model} --sampler {sampler} --out F.json`")
    if steps is None:  # the fewest calls: what tuning is for
        return calls[min(calls)]
    if steps not in calls:
        raise DdimctlError(f"{param('skip')} tuned: the tuned timesteps for {sampler} on {model} are for "
                           f"{param('steps')} {' or '.join(map(str, sorted(calls)))}; pass one of them, or fit S = {steps} "
                           f"with `ddimctl tune-steps`")
    return calls[steps]


def read_tuned(path: Path) -> Tuned:
    """A tune-steps file, every field checked (it is untrusted input like any other file)."""
    fields = Fields(read_json_object(path), str(path))
    if fields.data.get("format") != TUNED_FORMAT:
        raise DdimctlError(f"{path}: not a timesteps file of `ddimctl tune-steps` (its format is not {TUNED_FORMAT!r})")
    values = fields.integers("timesteps", low=0, high=100_000)
    try:
        parse_list(canonical(values))
        if list(values) != sorted(values):
            raise ValueError("timesteps must be increasing")
    except ValueError as e:
        raise DdimctlError(f"{path}: field 'timesteps': {e}") from e
    digest = fields.text("weights_sha256")
    if not (len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise DdimctlError(f"{path}: field 'weights_sha256' is not a sha256 in hexadecimal")
    return Tuned(str(path), fields.text("model"), digest, fields.text("sampler"), fields.integer("steps", low=1),
                 tuple(values))
