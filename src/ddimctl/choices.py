"""The choices the command line offers, in a module that imports nothing: `ddimctl --help` and shell
completion list them, and the parser refuses what is not among them, without importing torch (seconds
on every Tab). The modules that implement them use these names (timesteps.SCHEMES, boundary.PRECISIONS,
train.py's schedules); samplers.SAMPLERS is a table of functions, held to SAMPLER_NAMES by
tests/test_cli.py."""

SAMPLER_NAMES = ("ddim", "dpm++2m", "dpm++3m", "unipc", "plms", "ipndm")
SKIP_SCHEMES = ("uniform", "quad", "logsnr", "karras", "ays", "trailing")  # the paper's two, then the later ones
ETA_SAMPLERS = ("ddim",)  # the samplers that take --eta and --sigma-hat (the others are deterministic ODE solvers)
PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16")
DEFAULT_STEPS = 50  # S when none is given (the one place this default is written)

# What a network learns to predict, by --prediction's names, each with schedule.PREDICTIONS' (diffusers') name.
PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
# Training's noise schedules by --schedule's names, each with its schedule.Schedule kind: DDPM's linear
# betas, or Nichol & Dhariwal's cosine alpha-bar.
NOISE_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
LR_SCHEDULES = ("constant", "cosine")  # constant after warm-up, or a half cosine down to 0 at the last step


def sampler_names() -> str:
    """The samplers as help and messages list them: ddim, dpm++2m, ..."""
    return ", ".join(SAMPLER_NAMES)
