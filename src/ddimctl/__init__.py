"""ddimctl: DDIM (Song, Meng & Ermon, ICLR 2021) and fast solvers for DDPM image diffusion models.

    import ddimctl
    model = ddimctl.load_model("digits")              # a registry name, a checkpoint or a run folder
    x = ddimctl.sample(model, 16, sampler="dpm++2m", steps=10)   # (16, 1, 16, 16) in [-1, 1]

The house: schedule.py on the ground (the noise schedule, predictions, the paper's timesteps); three
wings above it, each importing only downward: io/ (files, fields, images), models/ (the UNet, every
checkpoint family, loading, the model boundary) and sampling/ (ddim.py, the solvers, the table of
samplers, runners); train.py and distill.py (on the session.py they share), evaluate.py and bench.py
on top; cli/ is the command line.
"""

from importlib import import_module

__version__ = "0.1.0"

__all__ = ["load_model", "sample", "main"]

# Names the package hands out on first use, so that `import ddimctl` imports nothing heavy (the
# command line starts faster): the two calls, and the modules a library user reaches first.
_LAZY = {
    "load_model": ("ddimctl.models.loading", "load_model"),
    "sample": ("ddimctl.sampling.runners", "generate"),
    "schedule": ("ddimctl.schedule", None),
    "ddim": ("ddimctl.sampling.ddim", None),
    "solvers": ("ddimctl.sampling.solvers", None),
    "samplers": ("ddimctl.sampling.samplers", None),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'ddimctl' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    found = import_module(module)
    return getattr(found, attribute) if attribute else found


def main() -> None:
    """The console script: Ctrl-C while torch is still being imported ends quietly, too."""
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        import sys

        print("interrupted", file=sys.stderr)
        sys.exit(130)
    run()
