"""Every sampler by name, with one signature, and the one value that says how to sample.

A sampler is a plain function over tensors of the signature `SamplerFunction` states: it walks the
increasing `timesteps` downwards and returns the clean image (abar = 1). A new sampler is one such
function (in ddim.py or solvers.py), one row of SAMPLERS and its name in choices.SAMPLER_NAMES (which
the command line lists without importing torch).

`Settings` (sampler, steps, skip, eta, sigma-hat) is built and checked once, wherever it comes from,
and carried whole through preparation, the Runner, the sample-folder record, the latents file and
the sweep. `steps` is always the number of network calls per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from .. import choices
from . import ddim, solvers, timesteps
from ..errors import DdimctlError, between, one_of, param


class SamplerFunction(Protocol):
    """The one signature of every sampler (ddim.sample's): eps_model(x, t) the noise prediction,
    generator one per image (stochastic samplers only), callback(ddim.Step) after each step,
    keep_known(t, x) to paste known pixels back (inpainting), options the sampler's own (eta)."""

    def __call__(self, eps_model: ddim.EpsModel, x_T: torch.Tensor, alphas_cumprod: torch.Tensor,
                 timesteps: torch.Tensor | Sequence[int], *, generator: ddim.Generator = None,
                 callback: ddim.StepCallback | None = None, keep_known: ddim.KeepKnown = None, **options) -> torch.Tensor: ...


@dataclass(frozen=True)
class SamplerSpec:
    function: SamplerFunction
    summary: str
    extra_calls: int = 0  # network calls beyond one per timestep (PLMS's first step)
    min_steps: int = 1
    takes_eta: bool = False  # DDIM's eta and sigma-hat
    default_skip: str | None = None  # None: the model's (the paper's choice for DDIM); else measured (README)
    # Adams-Bashforth in the noise on the uniform grid grows bf16/fp16 rounding of the early calls
    # into visible grain below this many calls (digits: +3-15% neighbour contrast at 8-15 calls, none at 20)
    half_precision_uniform_from: int = 1


SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec(ddim.sample, "DDIM (Song et al. 2021), any eta; eta = 0 is the ODE's Euler step", takes_eta=True),
    # The multistep solvers in lambda take quad: uniform's last interval (T/S -> 0) is a huge step in
    # lambda, where their extrapolation misfires (digits, 5 calls: 2M 1.44 uniform, 0.37 quad).
    "dpm++2m": SamplerSpec(solvers.sample_dpmpp_2m, "DPM-Solver++(2M), second-order multistep (Lu et al. 2022)",
                           default_skip="quad"),
    "dpm++3m": SamplerSpec(solvers.sample_dpmpp_3m, "DPM-Solver++(3M), third-order multistep (Lu et al. 2022)",
                           default_skip="quad"),
    "unipc": SamplerSpec(solvers.sample_unipc, "UniPC, order-2 predictor-corrector, bh2 (Zhao et al. 2023)",
                         default_skip="quad"),
    "plms": SamplerSpec(solvers.sample_plms, "PLMS of PNDM (Liu et al. 2022), its first step two calls",
                        extra_calls=1, min_steps=3, default_skip="uniform", half_precision_uniform_from=20),
    "ipndm": SamplerSpec(solvers.sample_ipndm, "iPNDM (Zhang & Chen 2023), fourth-order Adams-Bashforth",
                         default_skip="quad", half_precision_uniform_from=20),
}


@dataclass(frozen=True)
class Settings:
    """How to sample: which sampler, S network calls per image, the timesteps (a scheme of
    timesteps.SCHEMES or an explicit list as text; None: the sampler's default for the model),
    DDIM's eta and sigma-hat, and whether the predicted x0 is clipped: with the noise it implies (clip:
    ddim.clipping_x0, any sampler), or in DDIM's update only, the network's noise kept (clip_sample:
    diffusers' DDIMScheduler's default)."""

    sampler: str = "ddim"
    steps: int = choices.DEFAULT_STEPS
    skip: str | None = None
    eta: float = 0.0
    sigma_hat: bool = False
    clip: bool = False
    clip_sample: bool = False

    def __post_init__(self):
        one_of("sampler", self.sampler, tuple(SAMPLERS))
        spec = SAMPLERS[self.sampler]
        if not isinstance(self.steps, int) or self.steps < spec.min_steps:
            why = f" for {self.sampler} (its first step takes two network calls)" if spec.min_steps > 1 else ""
            raise DdimctlError(f"{param('steps')} must be at least {spec.min_steps}{why}, got {self.steps}")
        if self.skip is not None:
            try:
                timesteps.check(self.skip)
            except ValueError as e:
                raise DdimctlError(f"{param('skip')}: {e}") from e
            walked = self.steps - spec.extra_calls
            if timesteps.is_list(self.skip) and len(timesteps.parse_list(self.skip)) != walked:
                raise DdimctlError(f"{len(timesteps.parse_list(self.skip))} timesteps for {param('steps')} {self.steps}"
                                   f"{' (plms: one more call than timesteps)' if spec.extra_calls else ''}; "
                                   f"leave out {param('steps')}: it follows from the timesteps")
        # beyond 1, sigma_t^2 can exceed 1 - abar of the next step, and the step has no real solution
        between("eta", self.eta, 0, 1, " (0: DDIM, 1: DDPM's posterior variance)")
        if self.sigma_hat and self.eta != 0:
            raise DdimctlError(f"{param('eta')} is not used with {param('sigma_hat')} (DDPM's larger variance replaces "
                               f"eta's); leave one of them out")
        if not spec.takes_eta and (self.eta != 0 or self.sigma_hat or self.clip_sample):
            what = param("eta") if self.eta != 0 else param("sigma_hat") if self.sigma_hat else param("clip_sample")
            why = "takes no clipping of that kind" if what == param("clip_sample") else "is deterministic"
            raise DdimctlError(f"{what} is a setting of the ddim sampler; {self.sampler} {why} (leave it out)")
        if self.clip and self.clip_sample:
            raise DdimctlError(f"{param('clip')} and {param('clip_sample')} clip two ways: {param('clip')} steps with the "
                               f"noise of the clipped x0, {param('clip_sample')} keeps the network's; give one")

    @property
    def spec(self) -> SamplerSpec:
        return SAMPLERS[self.sampler]

    @property
    def half_precision_ok(self) -> bool:
        """Whether a bf16 or fp16 network leaves these samples as fp32 would, to the eye (skip resolved)."""
        return self.skip != "uniform" or self.steps >= self.spec.half_precision_uniform_from

    @property
    def stochastic(self) -> bool:
        """Whether the sampler draws noise on the way (so it needs each image's generator)."""
        return self.sigma_hat or self.eta > 0

    def for_model(self, train_steps: int, model_skip: str) -> Settings:
        """These settings for a model with T = train_steps: the skip filled in, S checked against T."""
        between("steps", self.steps - self.spec.extra_calls, 1, train_steps, " (the model's train steps)")
        return replace(self, skip=self.skip or self.spec.default_skip or model_skip)

    def timesteps(self, alphas_cumprod: torch.Tensor) -> torch.Tensor:
        """The increasing timestep sub-sequence the sampler walks on this schedule (skip resolved)."""
        if self.skip is None:
            raise ValueError("Settings.timesteps needs a resolved skip: call for_model() first")
        try:
            return timesteps.sequence(self.skip, self.steps - self.spec.extra_calls, alphas_cumprod)
        except ValueError as e:
            raise DdimctlError(f"{param('skip')} {self.skip}: {e}") from e

    def network_calls(self, timesteps: int) -> int:
        """Network calls per image for a walk over this many timesteps."""
        return timesteps + (self.spec.extra_calls if timesteps > 1 else 0)

    def options(self) -> dict:
        """The keyword options the sampler's function takes beyond the common ones."""
        return {"eta": self.eta, "sigma_hat": self.sigma_hat, "clip_sample": self.clip_sample} if self.spec.takes_eta else {}

    def run(self, eps_model, x_T: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps, *, generator=None,
            callback=None, keep_known=None) -> torch.Tensor:
        if self.clip:
            eps_model = ddim.clipping_x0(eps_model, alphas_cumprod)
        return self.spec.function(eps_model, x_T, alphas_cumprod, timesteps, generator=generator, callback=callback,
                                  keep_known=keep_known, **self.options())

    @property
    def eta_text(self) -> str:
        """eta as records, labels and summaries write it: 0, 0.2, 1."""
        return f"{self.eta:g}"

    def record(self) -> dict:
        """The settings as a folder record or latents file writes them (strings and bools; clip only
        when on, so records written before it existed still match)."""
        return {"sampler": self.sampler, "steps": self.steps, "skip": self.skip, "eta": self.eta_text,
                "sigma_hat": self.sigma_hat, **({"clip": True} if self.clip else {}),
                **({"clip_sample": True} if self.clip_sample else {})}

    def label(self) -> str:
        """A row name: the sampler, and for DDIM its eta (or sigma-hat)."""
        if self.sampler != "ddim":
            return self.sampler
        return "ddim sigma-hat" if self.sigma_hat else f"ddim eta={self.eta_text}"

    def describe(self) -> str:
        """For summary lines: S=20, ddim, eta=0, skip=uniform."""
        extra = f", eta={self.eta_text}" if self.spec.takes_eta else ""
        extra += ", sigma-hat" if self.sigma_hat else ""
        clipped = ", x0 clipped" if self.clip else ", x0 clipped in the update" if self.clip_sample else ""
        return f"S={self.steps}, {self.sampler}{extra}, skip={self.skip}{clipped}"


def steps_from(skip: str | None, sampler: str) -> int | None:
    """The network calls S that explicit timesteps take with this sampler (None for a scheme)."""
    if skip is None or not timesteps.is_list(skip):
        return None
    spec = SAMPLERS.get(sampler)
    return len(timesteps.parse_list(skip)) + (spec.extra_calls if spec else 0)
