"""`ddimctl distill`: the loss, the student's timesteps and the teacher's points, the run's records,
`sample --model RUN` with no other flag, refusals, resume to the same bits, and teachers that predict
v or take class labels (the student starts as an exact copy of each)."""

import json
import time

import numpy as np
import pytest
import torch
from conftest import random_unet
from gaussian import GaussianEps
from helpers import ddimctl, killed_after_checkpoint
from PIL import Image
from safetensors.torch import load_file, save_file

from ddimctl import distill, schedule
from ddimctl.devices import WorkTimer
from ddimctl.io.files import sha256_of
from ddimctl.models import runs
from ddimctl.models.unet import PRESETS
from ddimctl.sampling import ddim, solvers

ABAR = schedule.alphas_cumprod(schedule.linear_betas())
GAUSSIAN = GaussianEps(ABAR, torch.tensor(0.3), torch.tensor(0.5))
QUICK = ["--batch-size", "4", "--teacher-steps", "3", "--sample-count", "2", "--warmup", "0"]


def test_the_loss_is_the_squared_error_of_the_landing_points():
    """Targets made by the student's own DDIM steps give 0; a noise off by 0.01 everywhere moves each
    landing point by 0.01 times the step's noise coefficient, sqrt(1 - abar_s) - sqrt(abar_s (1 -
    abar_t) / abar_t) (written out here), and the loss is the mean of their squares."""
    x_T = torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    student = (300, 700)
    x_300 = ddim.ddim_step(x_T, GAUSSIAN(x_T, torch.full((3,), 700)), float(ABAR[700]), float(ABAR[300]))
    clean = ddim.ddim_step(x_300, GAUSSIAN(x_300, torch.full((3,), 300)), float(ABAR[300]), 1.0)
    assert float(distill.student_loss(GAUSSIAN, x_T, [x_300, clean], ABAR, student)) < 1e-20
    off = lambda x, t: GAUSSIAN(x, t) + 0.01  # noqa: E731
    a700, a300 = float(ABAR[700]), float(ABAR[300])
    coefficients = [(1 - a300) ** 0.5 - (a300 * (1 - a700) / a700) ** 0.5, -((1 - a300) / a300) ** 0.5]
    expected = sum((0.01 * c) ** 2 for c in coefficients) / 2
    assert float(distill.student_loss(off, x_T, [x_300, clean], ABAR, student)) == pytest.approx(expected, rel=1e-9)


def test_the_teachers_share_counts_only_its_own_stretches():
    """The work timer behind "teacher N% of the time" sums the stretches it measures and nothing between
    them (on a CPU, the host's clock; a GPU's events are read the same way)."""
    timer = WorkTimer(torch.device("cpu"))
    started = time.perf_counter()
    for _ in range(2):
        with timer.measure():
            time.sleep(0.03)
        time.sleep(0.05)
    total = time.perf_counter() - started
    assert 0.06 <= timer.seconds <= total - 0.1


def test_on_a_gpu_the_teachers_share_is_read_from_events(monkeypatch):
    """On a GPU the timer records a pair of events around each stretch and sums their elapsed times
    when read (events stand in for CUDA's here: each stretch "takes" 5 ms); a process that never reads
    the total folds finished events as it goes instead of keeping them all."""

    class Event:
        clock = 0.0

        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            Event.clock += 5.0
            self.at = Event.clock

        def query(self):
            return True

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return end.at - self.at

    monkeypatch.setattr(torch.cuda, "Event", Event)
    timer = WorkTimer(torch.device("cuda"))
    for _ in range(200):
        with timer.measure():
            pass
    assert len(timer._pending) <= 65
    assert timer.seconds == pytest.approx(200 * 0.005)
    assert timer._pending == []


def test_the_students_timesteps_and_the_teachers_grid():
    assert distill.default_timesteps(1, 1000) == (700,)
    assert distill.default_timesteps(2, 1000) == (350, 700)
    assert distill.default_timesteps(4, 1000) == (175, 350, 525, 700)
    assert distill.default_timesteps(3, 4000) == (933, 1867, 2800)
    grid = distill.teacher_grid((350, 700), 4, ABAR)
    assert grid == [249, 350, 499, 700, 749, 999]  # trailing's 4 (the top at T - 1, where x_T is) and the student's


def test_the_teachers_points_are_its_own_trajectory():
    """At the student's lower timesteps and at the end: where DPM-Solver++(2M) over the grid passes, and
    with a fine grid the exact ODE's clean image of Gaussian data (a closed form)."""
    x_T = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grid = distill.teacher_grid((350, 700), 6, ABAR)
    passed = {}
    clean = solvers.sample_dpmpp_2m(GAUSSIAN, x_T, ABAR, grid, callback=lambda step: passed.update({step.timestep: step.x}))
    points = distill.teacher_points(GAUSSIAN, x_T, ABAR, grid, (350, 700))
    assert len(points) == 2 and torch.equal(points[1], clean)
    assert torch.equal(points[0], passed[grid[grid.index(350) + 1]])  # the step that starts above 350 lands on it
    fine = distill.teacher_points(GAUSSIAN, x_T, ABAR, distill.teacher_grid((350, 700), 200, ABAR), (350, 700))[1]
    # The probability-flow ODE of N(mu, s^2) data keeps (x - sqrt(abar) mu) / sqrt(abar s^2 + 1 - abar) fixed
    exact = 0.3 + 0.5 * (x_T - ABAR[999].sqrt() * 0.3) / (ABAR[999] * 0.25 + 1 - ABAR[999]).sqrt()
    assert float((fine - exact).abs().max()) < 1e-3


@pytest.fixture()
def teacher(tmp_path):
    """The tiny random UNet as a checkpoint with its sidecar: a teacher to distil quickly."""
    path = tmp_path / "teacher.safetensors"
    save_file(random_unet("tiny").state_dict(), str(path))
    path.with_suffix(".json").write_text(json.dumps({"unet": PRESETS["tiny"].to_dict()}))
    return path


def test_a_student_run_records_its_teacher_and_samples_with_its_own_calls(tmp_path, teacher):
    ddimctl("distill", "--model", teacher, "--steps", "2", "--updates", "2", "--save-every", "2", "--out", "student",
            *QUICK, cwd=tmp_path)
    record = json.loads((tmp_path / "student" / "config.json").read_text())
    assert record["student"] == {"teacher": "teacher.safetensors", "teacher_sha256": sha256_of(teacher), "steps": 2,
                                 "timesteps": [350, 700], "sampler": "ddim"}
    picture = Image.open(tmp_path / "student" / "samples" / "step-00000002.png")
    assert picture.width > 2 * picture.height  # the teacher's panel beside the student's
    done = ddimctl("sample", "--model", "student", "-n", "2", "--out", "s.png", cwd=tmp_path)
    assert "S=2, ddim, eta=0, skip=350,700" in done.stdout
    for refused, named in [(["sample", "--model", "student", "--steps", "5"], "leave out --steps"),
                           (["sample", "--model", "student", "--sampler", "unipc"], "leave out --sampler"),
                           (["invert", str(tmp_path / "s.png"), "--model", "student"], "no ODE to invert"),
                           (["tune-steps", "--model", "student", "--out", "t.json"], "no ODE to invert"),
                           (["distill", "--model", "student", "--out", "again"], "is a student already")]:
        result = ddimctl(*refused, cwd=tmp_path, check=False)
        assert result.returncode == 1 and named in result.stderr, (refused, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "again").exists()


def test_a_killed_run_resumes_to_the_straight_runs_bits(tmp_path, teacher):
    args = ["distill", "--model", teacher, "--steps", "2", "--updates", "4", "--save-every", "2", "--lr", "1e-3", *QUICK]
    ddimctl(*args, "--out", "straight", cwd=tmp_path)
    killed = ddimctl(*args, "--out", "resumed", cwd=tmp_path, check=False, prelude=killed_after_checkpoint(2))
    assert killed.returncode == -9
    ddimctl(*args, "--out", "resumed", "--resume", cwd=tmp_path)
    straight, resumed = (load_file(runs.checkpoint_files(tmp_path / name)[-1]) for name in ("straight", "resumed"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    halfway = load_file(runs.checkpoint_files(tmp_path / "straight")[0])  # the student did move in updates 3 and 4
    assert any(not torch.equal(halfway[k], straight[k]) for k in straight if k.startswith("ema."))
    other = ddimctl(*args, "--out", "resumed", "--resume", "--timesteps", "300,600", cwd=tmp_path, check=False)
    assert other.returncode == 1 and "was trained with --timesteps 350,700; resuming with 300,600" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1  # refused before anything is said or loaded


def test_the_student_learns_its_teachers_trajectories(tmp_path, teacher):
    """A few updates lower the loss on the teacher's points (the same trajectories every update)."""
    from ddimctl.models.loading import load_model

    loaded = load_model(str(teacher))
    options = distill.DistillOptions(str(teacher), str(tmp_path / "run"), steps=1, updates=1)
    student = distill.student_of(options, loaded)
    net = loaded.unet.train().requires_grad_(True)
    eps = distill.student_eps(net, loaded)
    x_T = distill.trajectory_noise(0, 0, range(8), loaded.image_shape)
    grid = distill.teacher_grid(student.timesteps, 4, loaded.alphas_cumprod)
    targets = distill.teacher_points(loaded.noise_model(torch.device("cpu")), x_T, loaded.alphas_cumprod, grid,
                                     student.timesteps)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = distill.student_loss(eps, x_T, targets, loaded.alphas_cumprod, student.timesteps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0] and losses == sorted(losses, reverse=True), losses


@pytest.mark.parametrize("kind", ["v_prediction", "class labels"])
def test_teachers_that_predict_v_or_take_classes_distil_from_an_exact_copy(tmp_path, kind):
    """The student starts as the teacher: after an update too small to move it, it samples at its two
    calls what the teacher's DDIM gives at the same timesteps, image for image (the classes from the
    same seed stream)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                 num_class_embeds=3 if kind == "class labels" else None).eval()
    scheduler = diffusers.DDIMScheduler(prediction_type="v_prediction" if kind == "v_prediction" else "epsilon",
                                        clip_sample=False)
    diffusers.DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    ddimctl("distill", "--model", "pipe", "--updates", "1", "--lr", "1e-30", "--out", "student", *QUICK, cwd=tmp_path)
    assert json.loads((tmp_path / "student" / "config.json").read_text())["prediction"] == scheduler.config.prediction_type
    ddimctl("sample", "--model", "student", "-n", "6", "--out", "student.png", "--scale", "1", cwd=tmp_path)
    ddimctl("sample", "--model", "pipe", "--timesteps", "350,700", "-n", "6", "--out", "teacher.png", "--scale", "1",
            cwd=tmp_path)
    ours, theirs = (torch.from_numpy(np.asarray(Image.open(tmp_path / f"{n}.png"))).int() for n in ("student", "teacher"))
    assert (ours - theirs).abs().max() <= 1


def test_a_student_exports_to_diffusers_when_ddim_scheduler_can_walk_its_timesteps(tmp_path, teacher):
    """Timesteps in a spacing of DDIMScheduler (499,999: trailing's for 2 calls) export, and
    DDIMPipeline's own loop at num_inference_steps = 2 gives the student's images; the default
    timesteps (350,700) are no spacing of its, and are refused by name."""
    diffusers = pytest.importorskip("diffusers")
    from ddimctl.models.loading import load_model
    from ddimctl.sampling import runners, samplers

    for name, extra in (("trailing", ["--timesteps", "499,999"]), ("default", [])):
        ddimctl("distill", "--model", teacher, "--updates", "1", "--out", name, *QUICK, *extra, cwd=tmp_path)
    done = ddimctl("export", "trailing", "exported", cwd=tmp_path)
    assert "num_inference_steps=2" in done.stdout
    refused = ddimctl("export", "default", "refused", cwd=tmp_path, check=False)
    assert refused.returncode == 1 and "not 350,700" in refused.stderr and not (tmp_path / "refused").exists()
    student = load_model(str(tmp_path / "trailing"))
    pipeline = diffusers.DDIMPipeline.from_pretrained(tmp_path / "exported")
    x_T = torch.randn(2, *student.image_shape, generator=torch.Generator().manual_seed(2))
    own = runners.settings_for(student, samplers.Settings(), steps_given=False)
    runner = runners.Runner.create(student, own, torch.device("cpu"))
    with torch.no_grad():
        ours = runner.sample(x_T, None)
        pipeline.scheduler.set_timesteps(2)
        theirs = x_T.clone()
        for t in pipeline.scheduler.timesteps:
            theirs = pipeline.scheduler.step(pipeline.unet(theirs, t).sample, t, theirs, eta=0.0).prev_sample
    assert sorted(pipeline.scheduler.timesteps.tolist()) == [499, 999]
    assert float((ours - theirs).abs().max()) < 1e-3
