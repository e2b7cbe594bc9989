"""Batched sampling, inversion and editing: the glue between a loaded model and the samplers.

Image i of a run depends only on (seed, i): its starting noise and every later noise draw come from
its own generator, and it is computed in the run's batch i // B whichever process or rerun computes
it, so any number of processes and any resume give the bytes of a straight run at the same batch
size B. Another batch size changes only the rounding inside the network's kernels (see README).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from . import ddim, samplers, timesteps
from .. import choices, seeds
from ..devices import check_batch_fits, pick_device, start_host_copy, to_device
from ..errors import DdimctlError, at_least, between, param
from ..models.loading import LoadedModel

ProgressFn = Callable[[int], None]  # called with the number of images that just had one model call


@dataclass(frozen=True)
class ExactInversion:
    """Settings of exact inversion (ddim.invert_exact): per-step tolerance and network-call cap."""

    tol: float = 1e-3
    max_iters: int = 4

    def __post_init__(self):
        if not (self.tol >= 0 and self.max_iters >= 1):
            raise DdimctlError(f"exact inversion needs a tolerance >= 0 and at least 1 iteration, got {self.tol} and {self.max_iters}")


def edit_steps(strength: float, steps: int) -> int:
    """How many of the S timesteps an edit of this strength walks (t0 is the last of them)."""
    check_settings(strength=strength)
    return round(strength * steps)


def in_batches(run: Callable[[torch.Tensor, range], torch.Tensor], x: torch.Tensor, batch: int) -> torch.Tensor:
    """run(rows of x, their indices) over batches of x (along the first axis); results on the CPU,
    checked to be finite."""
    out = torch.cat([run(x[start : start + batch], range(start, min(start + batch, len(x)))).cpu()
                     for start in range(0, x.shape[0], batch)])
    return check_finite(list(range(x.shape[0])), out)


def check_finite(indices: Sequence[int], x: torch.Tensor) -> torch.Tensor:
    """x, unless some rows hold NaN or infinite values: those must never become images."""
    bad = ~torch.isfinite(x.flatten(1)).all(1)
    if bad.any():
        which = [indices[i] for i in bad.nonzero().flatten().tolist()]
        raise DdimctlError(
            f"{len(which)} image(s) came out NaN or infinite (number {', '.join(map(str, which[:5]))}"
            f"{', ...' if len(which) > 5 else ''}), so none of this batch was written; the weights or inputs are broken, "
            f"or try {param('precision')} fp32"
        )
    return x


@dataclass
class Runner:
    """A model on a device with one sampling configuration (samplers.Settings, resolved for the
    model), ready to run batches of `batch` images."""

    model: LoadedModel
    settings: samplers.Settings
    device: torch.device
    eps_model: Callable[..., torch.Tensor] | None = None  # eps(x, t[, classes]): boundary.FastEps
    batch: int | None = None  # the batch size the eps model was prepared for, if any
    precision: str = "fp32"
    classes: torch.Tensor | None = None  # class-conditional models: image i's class label (image_classes)

    @classmethod
    def create(cls, model: LoadedModel, settings: samplers.Settings, device: torch.device, **kwargs) -> "Runner":
        """A runner over the model's network as it is (on `device` already); make_runner() makes a fast one."""
        return cls(model, settings_for(model, settings), device, **kwargs)

    def __post_init__(self):
        if self.model.student is not None:
            settings_for(self.model, self.settings)  # a student samples only as it was distilled to
        if (self.classes is None) != (self.model.class_count is None):
            raise DdimctlError(f"model {self.model.name!r} is {'not ' * (self.model.class_count is None)}class-conditional; "
                               f"class labels go with class-conditional models only (image_classes)")
        if self.eps_model is None:
            self.eps_model = self.model.noise_model(self.device)
        self._alphas_cumprod = self.model.alphas_cumprod
        self.timesteps = self.settings.timesteps(self._alphas_cumprod)

    @property
    def evaluations(self) -> int:
        """Network calls per image for one pass (sample or invert)."""
        return self.settings.network_calls(len(self.timesteps))

    def network(self, rows: Sequence[int] | None, progress: ProgressFn | None = None):
        """eps(x, t) for images `rows` of the run (their class labels bound, if the model takes them),
        telling progress() about every network call (whatever the sampler)."""
        eps_model = self.eps_model
        if self.classes is not None:
            if rows is None:
                raise ValueError("a class-conditional runner needs the run's image indices of its rows")
            labels = self.classes[list(rows)].to(self.device)
            eps_model = lambda x, t: self.eps_model(x, t, labels)  # noqa: E731
        if progress is None:
            return eps_model

        def counted(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            progress(x.shape[0])
            return eps_model(x, t)

        return counted

    def sample(self, x_T: torch.Tensor, generators: Sequence[torch.Generator] | None, progress: ProgressFn | None = None,
               rows: Sequence[int] | None = None):
        """x_0 of each x_T; rows: the run's image indices of x_T's rows (for their class labels)."""
        x = to_device(x_T.float(), self.device)
        gen = generators if self.settings.stochastic else None
        return self.settings.run(self.network(rows, progress), x, self._alphas_cumprod, self.timesteps, generator=gen)

    def invert(
        self, x_0: torch.Tensor, progress: ProgressFn | None = None, exact: ExactInversion | None = None,
        rows: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, int]:
        """x_T of x_0 along the DDIM ODE and the network calls per image it took: plain (S calls), or exact."""
        check_invertible(self.model)
        if self.settings.sampler != "ddim":
            raise ValueError(f"inversion follows the DDIM ODE; this sampler is set up for {self.settings.sampler}")
        x = x_0.to(self.device, torch.float32)
        callback = (lambda step: progress(step.x.shape[0])) if progress else None  # per step: exact takes more calls
        network = self.network(rows)
        if exact is None:
            return ddim.invert(network, x, self._alphas_cumprod, self.timesteps, callback), self.evaluations
        return ddim.invert_exact(
            network, x, self._alphas_cumprod, self.timesteps, exact.tol, exact.max_iters, callback=callback
        )

    def edit(
        self,
        x_0: torch.Tensor,
        strength: float,
        generators: Sequence[torch.Generator],
        mask: torch.Tensor | None = None,
        exact: ExactInversion | None = None,
        progress: ProgressFn | None = None,
        rows: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """SDEdit / inpainting of x_0 from t0 at fraction `strength` of this sampler's timesteps,
        decoded with its sampler: noise from the generators (image i's own), or the exact DDIM
        inversion to t0 when `exact` is given."""
        check_invertible(self.model)
        timesteps = self.timesteps[: edit_steps(strength, len(self.timesteps))]
        x = x_0.to(self.device, torch.float32)
        start = None
        if exact is not None and len(timesteps):
            start, _ = ddim.invert_exact(self.network(rows), x, self._alphas_cumprod, timesteps, exact.tol, exact.max_iters)
        mask = mask.to(self.device, torch.float32) if mask is not None else None
        return ddim.edit(self.network(rows, progress), x, self._alphas_cumprod, timesteps, mask, generator=list(generators),
                         x_start=start, sample_fn=self.settings.spec.function, **self.settings.options())

    def sample_indices(
        self,
        indices: Sequence[int],
        seed: int,
        batch_size: int,
        latents: torch.Tensor | None = None,
        progress: ProgressFn | None = None,
        count: int | None = None,
    ) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Yield (indices, x_0 on the CPU) batch by batch for images `indices` of a run of `count`
        (default: up to the largest index); latents[i] replaces image i's noise.

        Batches are the run's own (aligned_batches): every image is computed in the same batch, at
        the same position, whatever subset is asked for, so a resumed or sharded run gives the bytes
        of a straight run.
        """
        count = count if count is not None else (max(indices) + 1 if len(indices) else 0)
        return self.run_batches(aligned_batches(indices, batch_size, count), indices, seed, latents, progress)

    def run_batches(
        self,
        batches: Sequence[Sequence[int]],
        indices: Sequence[int],
        seed: int,
        latents: torch.Tensor | None = None,
        progress: ProgressFn | None = None,
    ) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Yield (indices, x_0 on the CPU) of each of the run's `batches` (lists of image indices, as
        aligned_batches or a folder plan made them), keeping the images of `indices`. On CUDA the work
        is queued one batch ahead: while the caller handles batch k (encoding PNGs), the GPU already
        runs batch k + 1, and batch k reaches host memory asynchronously. On the CPU each batch is
        handed over as soon as it is done."""
        wanted = set(indices)
        waiting = None  # (indices, rows, wait for x_0 on the host) of the previous batch, on CUDA
        for members in map(list, batches):
            generators = seeds.image_generators(seed, members)
            x_T = seeds.initial_noise(generators, self.model.image_shape) if latents is None else latents[members]
            x_0 = self.sample(x_T, generators, progress, members)
            rows = [j for j, i in enumerate(members) if i in wanted]
            picked = [members[j] for j in rows]
            if waiting is not None:
                yield waiting[0], check_finite(waiting[0], waiting[1]())
                waiting = None
            if x_0.is_cuda:
                waiting = (picked, start_host_copy(x_0[rows] if len(rows) < len(members) else x_0))
            else:
                yield picked, check_finite(picked, x_0[rows] if len(rows) < len(members) else x_0)
        if waiting is not None:
            yield waiting[0], check_finite(waiting[0], waiting[1]())


def settings_for(model: LoadedModel, settings: samplers.Settings, steps_given: bool = True) -> samplers.Settings:
    """The settings a run of `model` samples with, resolved for it (Settings.for_model). A distilled
    student samples with its own calls, timesteps and sampler only, the ones it learnt (steps_given
    False: settings.steps is a default, not asked for); asking for others is refused."""
    student = model.student
    if student is None:
        return settings.for_model(model.train_steps, model.skip)
    own = samplers.Settings(student.sampler, student.steps, timesteps.canonical(student.timesteps), clip=settings.clip,
                            clip_sample=settings.clip_sample)
    asked = [(param("steps"), steps_given and settings.steps != own.steps),
             (param("skip"), settings.skip not in (None, own.skip)), (param("sampler"), settings.sampler != own.sampler),
             (param("eta"), settings.eta != 0), (param("sigma_hat"), settings.sigma_hat)]
    if any(wrong for _, wrong in asked):
        raise DdimctlError(f"{model.name} is a student distilled for {student.steps} call(s) of {student.sampler} at timesteps "
                           f"{own.skip}, and samples with those only: leave out {next(n for n, wrong in asked if wrong)} "
                           f"(or sample its teacher, {student.teacher})")
    return own


def check_invertible(model: LoadedModel) -> None:
    """Inversion, reconstruction, interpolation, editing and tuned timesteps follow the model's ODE; a
    distilled student has none."""
    if model.student is not None:
        raise DdimctlError(f"{model.name} is a {model.student.steps}-call student: it maps noise to images in those calls, "
                           f"with no ODE to invert, edit or tune along; use its teacher, {param('model')} "
                           f"{model.student.teacher}")


def aligned_batches(indices: Sequence[int], batch_size: int, count: int) -> list[list[int]]:
    """The batches that compute images `indices` of a run of `count` images: batch k holds images
    k B .. (k + 1) B - 1 (the last one fewer), and every batch holding a wanted image is computed
    whole. Numerical kernels may round differently for another batch shape or position (oneDNN on
    AVX2 does), so this is what makes resumed and sharded runs repeat a straight run exactly."""
    cells = sorted({i // batch_size for i in indices})
    return [list(range(k * batch_size, min((k + 1) * batch_size, count))) for k in cells]


# --------------------------------------------------------------------------------------------
# The rules for a run's other values, each written once (samplers.Settings checks the sampler's).
# The CLI checks what it can before loading a model; make_runner() checks again for every caller.


MAX_IMAGES = 100_000_000  # 2,000 of the paper's 50,000-image FID sets


def check_settings(
    *,
    batch_size: int | None = None,
    num: int | None = None,
    strength: float | None = None,
    frames: int | None = None,
) -> None:
    """Raise DdimctlError naming the first value (of those given) that no run can use."""
    if batch_size is not None:
        at_least("batch_size", batch_size, 1)
    if num is not None:
        at_least("num", num, 1)
        if num > MAX_IMAGES:
            raise DdimctlError(f"{param('num')} {num:,} is more images than one run can finish (at most {MAX_IMAGES:,}); "
                               f"split the work over several {param('seed')} values")
    if strength is not None:
        between("strength", strength, 0, 1)
    if frames is not None:
        at_least("frames", frames, 2)


def image_classes(model: LoadedModel, count: int, given: Sequence[int] | None = None, seed: int | None = None) -> torch.Tensor | None:
    """The class label of each of a run's `count` images for a class-conditional model (None for an
    unconditional one): `given` (one class for all, or one per image), else each image's own draw from
    (seed, i); without a seed the classes must be given."""
    classes = model.class_count
    if classes is None:
        if given is not None:
            raise DdimctlError(f"{param('class')}: model {model.name!r} is not class-conditional; leave it out")
        return None
    if given is None:
        if seed is None:
            raise DdimctlError(f"model {model.name!r} is class-conditional ({classes} classes): give {param('class')} N, "
                               f"or a list with one class per image")
        return seeds.image_classes(seed, range(count), classes)
    if len(given) not in (1, count):
        raise DdimctlError(f"{param('class')} lists {len(given)} classes for {count} images; give one class, or one per image")
    wrong = [c for c in given if not 0 <= c < classes]
    if wrong:
        raise DdimctlError(f"{param('class')} {wrong[0]} is not a class of model {model.name!r}: its classes are 0 to {classes - 1}")
    return torch.tensor(list(given) * (count if len(given) == 1 else 1), dtype=torch.long)


# --------------------------------------------------------------------------------------------
# A sampler ready for a run: device, precision, batch size, and compiling when it pays.


def run_precision(precision: str, device: torch.device, settings: samplers.Settings) -> str:
    """The precision a run of `settings` (resolved) takes: boundary.resolve_precision's, except fp32 where
    half precision would show in the images (Settings.half_precision_ok): every sampler keeps its
    quality whatever precision is asked for."""
    from ..models import boundary

    resolved = boundary.resolve_precision(precision, device)
    return "fp32" if resolved in ("bf16", "fp16") and not settings.half_precision_ok else resolved


def make_runner(
    model: LoadedModel,
    settings: samplers.Settings,
    device: str = "auto",
    *,
    precision: str = "auto",
    compile_model: bool | None = None,
    batch_size: int | None = None,
    count: int | None = None,
    reuse: Runner | None = None,
    classes: torch.Tensor | None = None,
    notify: Callable[[str], None] = lambda message: None,
) -> Runner:
    """A runner on the chosen device and precision; its `batch` is the batch size to run with (at
    most `count`, the run's images, whatever the number of processes: batches are the run's own).
    compile_model None compiles on CUDA when this process's share of the work repays it; `reuse`
    shares another runner's prepared (compiled) network, so a sweep compiles once; `classes` are the
    run's class labels (image_classes). The model itself is never changed. notify() hears what was
    decided."""
    from .. import distributed
    from ..models import boundary

    check_settings(batch_size=batch_size)
    world = distributed.from_env()
    dev = distributed.local_device(pick_device(device), world)
    settings = settings_for(model, settings)  # resolved here, once: Runner takes it as it is
    asked, precision = precision, run_precision(precision, dev, settings)
    if boundary.resolve_precision(asked, dev) != precision:
        notify(f"{settings.sampler} at {settings.steps} calls on the uniform grid runs its network in fp32: half precision's "
               f"rounding grows into visible grain there (not from {settings.spec.half_precision_uniform_from} calls, "
               f"nor with another {param('skip')})")
    if reuse is not None:
        return Runner(model, settings, dev, eps_model=reuse.eps_model, batch=reuse.batch, precision=reuse.precision,
                      classes=classes)
    batch = batch_size or boundary.auto_batch_size(model.unet, dev, precision)
    if count:
        batch = min(batch, count)
    check_batch(model, batch, None, dev)
    use_compile = compile_model
    share = math.ceil(count / world.size) if count else None
    if compile_model is None:
        use_compile = dev.type == "cuda" and (share is None or boundary.worth_compiling(model.unet, share * settings.steps))
        if dev.type == "cuda" and not use_compile:
            notify(f"{share} images x {settings.steps} steps: too little work to repay compiling the UNet ({param('compile')} forces it)")
    eps = model.noise_model(dev, precision, boundary.DEFAULT_COMPILE_MODE if use_compile else None, batch)
    if use_compile:
        notify(f"compiling the UNet for {precision} batches of {batch} (once per run)")
        notify(f"compiled in {boundary.warm_up(eps, (batch, *model.image_shape), dev):.1f}s")
    runner = Runner(model, settings, dev, eps_model=eps, batch=batch, precision=precision, classes=classes)
    walked = len(runner.timesteps) + settings.spec.extra_calls
    if walked != settings.steps:
        notify(f"{settings.skip} skip with S={settings.steps} has {len(runner.timesteps)} distinct timesteps")
    return runner


def check_batch(model: LoadedModel, batch_size: int | None, count: int | None, device: torch.device) -> None:
    """Refuse a batch of `model`'s images (at most `count`) that does not fit in `device`'s free memory,
    before anything is written or allocated (None: chosen later, to fit)."""
    if batch_size:
        check_batch_fits(model.config.activation_bytes(), min(batch_size, count or batch_size), device)


def invert_batches(
    runner: Runner, x_0: torch.Tensor, exact: ExactInversion | None = None, progress: ProgressFn | None = None
) -> tuple[torch.Tensor, int]:
    """Latents of x_0 (on the CPU) and the most network calls per image any batch took."""
    calls = []

    def invert(x: torch.Tensor, rows: range) -> torch.Tensor:
        latents, evaluations = runner.invert(x, progress, exact, rows)
        calls.append(evaluations)
        return latents

    return in_batches(invert, x_0, runner.batch or len(x_0)), max(calls)


def decode_batches(runner: Runner, x_T: torch.Tensor, progress: ProgressFn | None = None) -> torch.Tensor:
    """x_0 of each latent (on the CPU); a deterministic sampler (ddim at eta = 0 or a solver)."""
    if runner.settings.stochastic:
        raise ValueError("decoding latents needs a deterministic sampler (eta = 0, no sigma-hat)")
    return in_batches(lambda x, rows: runner.sample(x, None, progress, rows), x_T, runner.batch or len(x_T))


def sample_batches(
    runner: Runner, count: int, seed: int, x_T: torch.Tensor | None = None, progress: ProgressFn | None = None
) -> torch.Tensor:
    """Images 0..count-1 of a run (on the CPU), for a grid."""
    batch = runner.batch or count
    return torch.cat([x0 for _, x0 in runner.sample_indices(list(range(count)), seed, batch, x_T, progress)])


def edit_batches(
    runner: Runner,
    x_0: torch.Tensor,
    strength: float,
    seed: int,
    mask: torch.Tensor | None = None,
    exact: ExactInversion | None = None,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """Runner.edit over batches; image i's noise from (seed, i). Results on the CPU, checked finite."""
    parts, batch = [], runner.batch or len(x_0)
    for start in range(0, x_0.shape[0], batch):
        rows = range(start, min(start + batch, x_0.shape[0]))
        generators = seeds.image_generators(seed, rows)
        parts.append(runner.edit(x_0[start : start + batch], strength, generators, mask, exact, progress, rows).cpu())
    return check_finite(list(range(x_0.shape[0])), torch.cat(parts))


def seed_latents(seed_list: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """x_T of image 0 of each seed: the latents `interpolate --seeds` blends."""
    return torch.cat([seeds.initial_noise(seeds.image_generators(s, [0]), shape) for s in seed_list])


def interpolation_alphas(frames: int) -> list[float]:
    """Evenly spaced from 0 (the first end) to 1 (the second), both ends included."""
    return torch.linspace(0, 1, frames).tolist()


def interpolation_latents(ends: torch.Tensor, alphas: Sequence[float]) -> torch.Tensor:
    """Slerp between the two latents `ends` at each alpha (0: the first, 1: the second)."""
    return torch.cat([ddim.slerp(ends[:1], ends[1:], a) for a in alphas])


def generate(
    model: LoadedModel | str,
    num: int = 16,
    *,
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float = 0.0,
    skip: str | None = None,
    seed: int = 0,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int | None = None,
    classes: Sequence[int] | None = None,
    clip: bool = False,
    clip_sample: bool = False,
) -> torch.Tensor:
    """`num` images from a model (a LoadedModel, or anything `--model` takes) as (N, C, H, W) on the
    CPU: image i depends only on (seed, i). Precision as `--precision` (auto: bf16 on GPUs, fp32 on
    CPUs). steps None: choices.DEFAULT_STEPS network calls, or a student's own. A class-conditional
    model takes `classes` (one, or one per image; default: each image's own draw); clip clips the
    predicted x0 at every step (ddim.clipping_x0), clip_sample in DDIM's update only (diffusers' way).
    ddimctl.sample is this function."""
    from ..models.loading import load_model

    loaded = load_model(model) if isinstance(model, str) else model
    check_settings(num=num)
    labels = image_classes(loaded, num, classes, seed)
    asked = samplers.Settings(sampler, steps or choices.DEFAULT_STEPS, skip, eta, clip=clip, clip_sample=clip_sample)
    runner = make_runner(loaded, settings_for(loaded, asked, steps_given=steps is not None), device, precision=precision,
                         compile_model=False, batch_size=batch_size, count=num, classes=labels)
    return sample_batches(runner, num, seed)
