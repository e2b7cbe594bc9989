"""Timesteps: the built-in schemes equal their definitions, explicit lists and tuned files are values
like any other, and tune-steps keeps what its method promises."""

import json
import math
from pathlib import Path

import pytest
from gaussian import MixtureEps
from helpers import ddimctl

from ddimctl.sampling import samplers, timesteps, tuning
from ddimctl import schedule
from ddimctl.errors import DdimctlError

ABAR = schedule.alphas_cumprod(schedule.linear_betas())


def _log_sigmas() -> list[float]:
    """log sigma_t = log sqrt((1 - abar_t) / abar_t) of DDPM's linear schedule, in plain floats from the
    betas up (the oracle: nothing of ddimctl's)."""
    out, abar = [], 1.0
    for i in range(1000):
        abar *= 1 - (1e-4 + (0.02 - 1e-4) * i / 999)
        out.append(0.5 * math.log((1 - abar) / abar))
    return out


LOG_SIGMA = _log_sigmas()


@pytest.mark.parametrize("steps", [1, 2, 5, 7, 10, 50, 333])
def test_trailing_equals_diffusers(steps):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    assert timesteps.scheme_sequence("trailing", steps, ABAR).tolist() == sorted(scheduler.timesteps.tolist())


def formula(scheme: str, u: float) -> float:
    """The scheme's target log sigma at u in [0, 1] (0: the noisiest end), written out once more."""
    high, low = LOG_SIGMA[-1], LOG_SIGMA[0]
    if scheme == "logsnr":  # uniform in lambda = -log sigma
        return -((-high) + u * ((-low) - (-high)))
    if scheme == "karras":
        rho = 7.0
        return rho * math.log(math.exp(high / rho) + u * (math.exp(low / rho) - math.exp(high / rho)))
    return math.log(math.tan(math.atan(math.exp(high)) + u * (math.atan(math.exp(low)) - math.atan(math.exp(high)))))


@pytest.mark.parametrize("scheme", ["logsnr", "karras", "ays"])
@pytest.mark.parametrize("steps", [2, 5, 10, 20])
def test_sigma_schemes_land_on_the_nearest_trained_timestep(scheme, steps):
    got = timesteps.scheme_sequence(scheme, steps, ABAR).tolist()
    want = sorted({min(range(1000), key=lambda t: abs(LOG_SIGMA[t] - formula(scheme, i / (steps - 1))))
                   for i in range(steps)})
    assert got == want
    assert got[-1] == 999 and got[0] == 0  # both ends of the schedule
    assert len(got) == steps  # no two points share a timestep at these S


def test_ays_and_karras_spend_their_steps_where_the_noise_is_low():
    """The point of both: more of the S steps at small sigma than logsnr puts there."""
    below = lambda scheme: sum(t < 200 for t in timesteps.scheme_sequence(scheme, 10, ABAR).tolist())  # noqa: E731
    assert below("karras") > below("uniform") and below("logsnr") > below("uniform")


def test_explicit_lists_in_either_order_and_their_errors():
    assert timesteps.parse_list("999,700,450,200,50") == (50, 200, 450, 700, 999)
    assert timesteps.parse_list("50,200,450") == (50, 200, 450)
    for bad in ("5,5,7", "1,3,2", "a,b", "-1,5", "1.5,3", "²,3", ""):
        with pytest.raises(ValueError):
            timesteps.parse_list(bad)
    settings = samplers.Settings("unipc", 5, "50,200,450,700,999")
    assert settings.timesteps(ABAR).tolist() == [50, 200, 450, 700, 999]
    with pytest.raises(DdimctlError, match="5 timesteps for steps 4"):
        samplers.Settings("unipc", 4, "50,200,450,700,999")
    with pytest.raises(DdimctlError, match="plms: one more call"):
        samplers.Settings("plms", 5, "50,200,450,700,999")
    assert samplers.Settings("plms", 6, "50,200,450,700,999").timesteps(ABAR).shape[0] == 5


def test_timesteps_on_the_command_line_follow_through_to_the_record(tmp_path):
    """The diffusers-style decreasing list works, --steps follows from it, and the folder record keeps
    the values themselves."""
    ddimctl("sample", "--model", "digits", "--sampler", "unipc", "--timesteps", "999,700,450,200,50", "-n", "2",
            "--out", "s/", cwd=tmp_path)
    record = json.loads((tmp_path / "s" / ".ddimctl-sample.json").read_text())
    assert (record["steps"], record["skip"]) == (5, "50,200,450,700,999")
    wrong = ddimctl("sample", "--model", "digits", "--timesteps", "999,700", "--skip", "quad", cwd=tmp_path, check=False)
    assert wrong.returncode == 1 and wrong.stderr.strip().splitlines()[-1] == "error: give --skip or --timesteps, not both"


def test_tuning_never_ends_worse_than_its_start_and_repeats_for_a_seed():
    """On the closed-form mixture: the search only keeps moves that lower the teacher error, so the
    result is at most the best built-in scheme's error (here clearly below it), and the same seed gives
    the same timesteps."""
    eps = MixtureEps(ABAR, [0.3, 0.7], [-0.6, 0.4], [0.1, 0.15])
    settings = samplers.Settings("dpm++2m", 4, "quad")
    runs = [tuning.tune(eps, ABAR, (1, 2, 2), settings, count=32, seed=5) for _ in range(2)]
    result = runs[0]
    assert result.timesteps == runs[1].timesteps
    assert result.error <= result.start_error * 0.9
    assert result.history == sorted(result.history, reverse=True)
    assert len(result.timesteps) == 4 and result.timesteps == sorted(set(result.timesteps)) and result.timesteps[-1] <= 999
    scheduled = {s: timesteps.scheme_sequence(s, 4, ABAR).tolist() for s in timesteps.SCHEMES}
    assert result.start_scheme in scheduled and result.history[0] == result.start_error


def test_a_tuned_file_is_used_for_its_model_and_sampler_only(tmp_path):
    from ddimctl.models import loading

    digits = loading.load_model("digits")
    tuned = {"format": "ddimctl-timesteps", "model": "digits", "weights_sha256": digits.weights_sha256,
             "sampler": "unipc", "steps": 3, "timesteps": [80, 400, 999]}
    (tmp_path / "t.json").write_text(json.dumps(tuned))
    ddimctl("sample", "--model", "digits", "--sampler", "unipc", "--skip", "t.json", "-n", "2", "--out", "s/", cwd=tmp_path)
    assert json.loads((tmp_path / "s" / ".ddimctl-sample.json").read_text())["skip"] == "80,400,999"
    other = ddimctl("sample", "--model", "digits", "--sampler", "dpm++2m", "--skip", "t.json", "-n", "2", "--out", "o.png",
                    cwd=tmp_path, check=False)
    assert other.returncode == 1 and "was tuned for the unipc sampler, not dpm++2m" in other.stderr
    (tmp_path / "t.json").write_text(json.dumps({**tuned, "weights_sha256": "0" * 64}))
    other = ddimctl("sample", "--model", "digits", "--sampler", "unipc", "--skip", "t.json", "-n", "2", "--out", "o.png",
                    cwd=tmp_path, check=False)
    assert other.returncode == 1 and "was tuned for model digits (weights 000000000000)" in other.stderr
    for bad, says in [({**tuned, "timesteps": [5, 5]}, "strictly"), ({**tuned, "format": "x"}, "not a timesteps file"),
                      ({**tuned, "weights_sha256": "nope"}, "not a sha256")]:
        (tmp_path / "t.json").write_text(json.dumps(bad))
        result = ddimctl("sample", "--model", "digits", "--skip", "t.json", "--out", "o.png", cwd=tmp_path, check=False)
        assert result.returncode == 1 and says in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o.png").exists()


def test_skip_tuned_takes_the_timesteps_ddimctl_ships(tmp_path):
    """The bundled digits model ships fitted 5-call timesteps; --skip tuned finds them by model,
    sampler and S, and says what to do where there are none."""
    shipped = json.loads((Path(timesteps.__file__).parents[1] / "bundled" / "tuned" / "digits-unipc-5.json").read_text())
    ddimctl("sample", "--model", "digits", "--sampler", "unipc", "--skip", "tuned", "-n", "2", "--out", "s/", cwd=tmp_path)
    record = json.loads((tmp_path / "s" / ".ddimctl-sample.json").read_text())
    assert record["skip"] == timesteps.canonical(shipped["timesteps"]) and record["steps"] == 5
    for args, says in [(["--sampler", "ddim"], "no tuned timesteps for ddim on digits in ddimctl's shipped files"),
                       (["--sampler", "unipc", "--steps", "7"], "are for --steps 5 or 10"),
                       (["--model", "../x", "--sampler", "unipc"], "registry models and in a model folder's tuned/")]:
        result = ddimctl("sample", *(["--model", "digits"] if "--model" not in args else []), *args, "--skip", "tuned",
                         "--out", "o.png", cwd=tmp_path, check=False)
        assert result.returncode == 1 and says in result.stderr, result.stderr


def test_explicit_timesteps_set_each_sweep_cells_calls():
    """sweep --timesteps without --steps: each sampler's S follows from the list (plms takes one more)."""
    from ddimctl import evaluate

    cells = evaluate.sweep_cells(["ddim", "plms", "unipc"], None, [0.0, 1.0], False, "0,250,500,750")
    assert [(c.sampler, c.steps, c.eta) for c in cells] == [("ddim", 4, 0.0), ("ddim", 4, 1.0), ("plms", 5, 0.0),
                                                             ("unipc", 4, 0.0)]
    assert all(c.skip == "0,250,500,750" for c in cells)


def test_a_model_folder_keeps_its_own_tuned_timesteps(tmp_path):
    """--skip tuned with a model or run folder: the folder's tuned/SAMPLER-S.json, held to its weights."""
    from ddimctl.models import loading

    ddimctl("export", "digits", tmp_path / "mine", cwd=tmp_path)
    mine = loading.load_model(str(tmp_path / "mine"))
    (tmp_path / "mine" / "tuned").mkdir()
    (tmp_path / "mine" / "tuned" / "unipc-3.json").write_text(json.dumps({
        "format": "ddimctl-timesteps", "model": mine.name, "weights_sha256": mine.weights_sha256, "sampler": "unipc",
        "steps": 3, "timesteps": [90, 420, 999]}))
    ddimctl("sample", "--model", tmp_path / "mine", "--sampler", "unipc", "--skip", "tuned", "-n", "2", "--out", "s/",
            cwd=tmp_path)
    assert json.loads((tmp_path / "s" / ".ddimctl-sample.json").read_text())["skip"] == "90,420,999"
    none = ddimctl("sample", "--model", tmp_path / "mine", "--sampler", "dpm++2m", "--skip", "tuned", "--out", "o.png",
                   cwd=tmp_path, check=False)
    assert none.returncode == 1 and "no tuned timesteps for dpm++2m" in none.stderr and "mine/tuned" in none.stderr
