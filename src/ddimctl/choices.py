"""The choices the command line offers, in a module that imports nothing: `ddimctl --help` and shell
completion list them without importing torch (seconds on every Tab). The modules that implement them
use these names (timesteps.SCHEMES, boundary.PRECISIONS, samplers.DEFAULT_STEPS); samplers.SAMPLERS is a
table of functions, held to SAMPLER_NAMES by tests/test_cli.py."""

SAMPLER_NAMES = ("ddim", "dpm++2m", "dpm++3m", "unipc", "plms", "ipndm")
SKIP_SCHEMES = ("uniform", "quad", "logsnr", "karras", "ays", "trailing")  # the paper's two, then the later ones
PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")
DEFAULT_STEPS = 50  # S when none is given (the one place this default is written)


def sampler_names() -> str:
    """The samplers as help and messages list them: ddim, dpm++2m, ..."""
    return ", ".join(SAMPLER_NAMES)
