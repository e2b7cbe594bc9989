"""ddimctl: DDIM (Song, Meng & Ermon, ICLR 2021) and fast solvers for DDPM image diffusion models.

    import ddimctl
    model = ddimctl.load_model("digits")              # a registry name, a checkpoint or a run folder
    x = ddimctl.sample(model, 16, sampler="dpm++2m", steps=10)   # (16, 1, 16, 16) in [-1, 1]

The pieces: ddimctl.ddim (the DDIM maths), ddimctl.solvers (DPM-Solver++, UniPC, PLMS, iPNDM),
ddimctl.samplers (the table of samplers and their settings), ddimctl.sampling (batches on a device),
ddimctl.weights (loading), ddimctl.train. The command line is `ddimctl --help`.
"""

__version__ = "0.1.0"

__all__ = ["load_model", "sample", "main"]


def __getattr__(name: str):
    # The package imports nothing heavy until asked (the command line starts faster).
    if name == "load_model":
        from .weights import load_model

        return load_model
    if name == "sample":
        from .sampling import generate

        return generate
    raise AttributeError(f"module 'ddimctl' has no attribute {name!r}")


def main() -> None:
    """The console script: Ctrl-C while torch is still being imported ends quietly, too."""
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        import sys

        print("interrupted", file=sys.stderr)
        sys.exit(130)
    run()
