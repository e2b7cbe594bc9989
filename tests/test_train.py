"""`ddimctl train`: the loss, resume bit-identity after a real SIGKILL, DDP on gloo, export, bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ddimctl, killed_after_checkpoint
from PIL import Image
from safetensors.torch import load_file

from ddimctl.models import runs, loading
from ddimctl import schedule, session, train
from ddimctl.distributed import World


def run(*args, cwd, env=None, check=True, torchrun=0, prelude=None):
    return ddimctl(*args, cwd=cwd, env=env, check=check, torchrun=torchrun, prelude=prelude)


@pytest.fixture()
def data_dir(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "data" / "nested"
    folder.mkdir(parents=True)
    for i in range(12):
        Image.fromarray((rng.random((20, 24)) * 255).astype("uint8"), "L").save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return tmp_path / "data"


TINY = ["--preset", "tiny", "--channels", "1", "--batch-size", "4", "--sample-steps", "2", "--warmup", "2", "--lr", "1e-3",
        "--ema-decay", "0.9"]


def checkpoint_tensors(run_dir):
    return load_file(runs.checkpoint_files(run_dir)[-1])


def test_loss_is_mse_of_noise_prediction():
    abar = schedule.alphas_cumprod(schedule.linear_betas()).float()
    x0 = torch.randn(4, 1, 8, 8)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 10, 500, 999])
    perfect = lambda x, t_: (x - abar[t_].sqrt().view(-1, 1, 1, 1) * x0) / (1 - abar[t_]).sqrt().view(-1, 1, 1, 1)  # noqa: E731
    assert train.diffusion_loss(perfect, x0, t, noise, abar) < 1e-8
    zero = lambda x, t_: torch.zeros_like(x)  # noqa: E731
    assert train.diffusion_loss(zero, x0, t, noise, abar) == pytest.approx(float(noise.pow(2).mean()))


@pytest.mark.parametrize("prediction", ["sample", "v_prediction"])
def test_the_loss_of_x0_and_v_prediction_is_zero_for_the_perfect_network(prediction):
    """The target the loss trains is the one the model boundary turns back into the noise."""
    abar = schedule.Schedule(kind="squaredcos_cap_v2").alphas_cumprod().float()
    x0, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    noise = torch.randn_like(x0)
    a = abar[t].view(-1, 1, 1, 1)
    perfect = {"sample": lambda x, t_: x0, "v_prediction": lambda x, t_: a.sqrt() * noise - (1 - a).sqrt() * x0}[prediction]
    assert train.diffusion_loss(perfect, x0, t, noise, abar, prediction) < 1e-10
    eps_model = train.diffusion_loss(lambda x, t_: noise, x0, t, noise, abar, prediction)
    assert eps_model > 0.1  # a network predicting the noise is wrong for these targets
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    assert torch.allclose(schedule.noise_from_prediction(prediction, x_t, perfect(x_t, t), a), noise, atol=1e-4)


def test_a_v_prediction_cosine_run_is_recorded_loaded_and_exported(data_dir, tmp_path):
    """train --prediction v --schedule cosine: the run says so, --model RUN loads it with both, and its
    export carries them in diffusers' scheduler config; a resume cannot change them."""
    run("train", data_dir, "--out", "v", "--steps", 2, "--save-every", 2, *TINY, "--prediction", "v", "--schedule",
        "cosine", cwd=tmp_path)
    record = json.loads((tmp_path / "v" / "config.json").read_text())
    assert record["prediction"] == "v_prediction" and record["schedule"]["kind"] == "squaredcos_cap_v2"
    loaded = loading.load_model(str(tmp_path / "v"))
    assert loaded.prediction == "v_prediction" and loaded.schedule["kind"] == "squaredcos_cap_v2"
    run("export", tmp_path / "v", tmp_path / "exported", cwd=tmp_path)
    scheduler = json.loads((tmp_path / "exported" / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["prediction_type"], scheduler["beta_schedule"]) == ("v_prediction", "squaredcos_cap_v2")
    changed = run("train", data_dir, "--out", "v", "--steps", 4, *TINY, "--prediction", "eps", "--resume",
                  cwd=tmp_path, check=False)
    assert changed.returncode == 1 and "--prediction" in changed.stderr and "Traceback" not in changed.stderr
    refused = run("train", data_dir, "--out", "w", "--steps", 2, *TINY, "--prediction", "score", cwd=tmp_path, check=False)
    assert refused.returncode != 0 and "--prediction score: choose eps, v, x0" in refused.stderr and not (tmp_path / "w").exists()


def test_schedules_and_data_order():
    assert session.learning_rate(0, 1e-3, 10) == pytest.approx(1e-4)
    assert session.learning_rate(50, 1e-3, 10) == pytest.approx(1e-3)
    # the half cosine after warm-up: the base rate, half of it halfway, 0 at the last step
    cosine = [session.learning_rate(step, 1e-3, 10, 110, "cosine") for step in (10, 60, 110)]
    assert cosine == pytest.approx([1e-3, 0.5e-3, 0.0], abs=1e-12)
    assert session.ema_decay(0, 0.9999) == pytest.approx(0.1)
    assert session.ema_decay(10**7, 0.9999) == 0.9999
    # Each epoch visits every image once; two processes split each batch without overlap.
    seen = torch.cat([train.batch_indices(10, s, 5, 0, World()) for s in range(2)])
    assert sorted(seen.tolist()) == list(range(10))
    halves = [train.batch_indices(10, 3, 4, 0, World(rank=r, size=2)) for r in range(2)]
    assert torch.equal(torch.sort(torch.cat(halves))[0], torch.sort(train.batch_indices(10, 3, 4, 0, World()))[0])


def test_resume_after_kill_is_bit_identical(data_dir, tmp_path):
    result = run("train", data_dir, "--out", "straight", "--steps", 6, "--save-every", 3, *TINY, cwd=tmp_path)
    assert "skipped 1 unreadable file(s): nested/broken.png" in result.stderr
    killed = run("train", data_dir, "--out", "resumed", "--steps", 6, "--save-every", 3, *TINY, cwd=tmp_path,
                 prelude=killed_after_checkpoint(3), check=False)
    assert killed.returncode == -9  # a real SIGKILL straight after the step-3 checkpoint
    assert [p.name for p in runs.checkpoint_files(tmp_path / "resumed")] == ["step-00000003.safetensors"]
    # What a kill between writing the next checkpoint and renaming it leaves: a full-size temporary
    # of a process that is gone (written here as atomic_path names it, with the dead process's id).
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    ckpts = tmp_path / "resumed" / "checkpoints"
    orphan = ckpts / f".step-00000006.safetensors.ddimctl-{gone.pid}-abcd1234.tmp"
    orphan.write_bytes((ckpts / "step-00000003.safetensors").read_bytes())
    again = run("train", data_dir, "--out", "resumed", "--steps", 6, "--save-every", 3, *TINY, "--resume", cwd=tmp_path)
    assert "resuming from step-00000003.safetensors (step 3)" in again.stderr
    assert not orphan.exists() and not list(ckpts.glob("*.tmp"))
    a, b = checkpoint_tensors(tmp_path / "straight"), checkpoint_tensors(tmp_path / "resumed")
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # Two labelled panels from the same x_T: eta 0 as `sample` gives it, and eta 1 with x0 clipped (train.GRID_PANELS):
    # 16 tiles of 16 px in 4 x 4 (74 px), two panels (154 x 78 px), enlarged 4 times, under a 14 px band of labels.
    picture = np.asarray(Image.open(tmp_path / "straight" / "samples" / "step-00000006.png"))
    assert picture.shape[:2] == (4 * 78 + 14, 4 * 154)
    left, right = picture[14 + 8 : 14 + 4 * 76, 8 : 4 * 76], picture[14 + 8 : 14 + 4 * 76, 4 * 78 : 4 * 152]
    assert np.abs(left.astype(int) - right.astype(int)).mean() > 1  # the panels are not the same samples
    # the kill came between the step-3 checkpoint and its grid: the resume draws the missing grid
    grid = "samples/step-00000003.png"
    assert (tmp_path / "resumed" / grid).read_bytes() == (tmp_path / "straight" / grid).read_bytes()
    log = (tmp_path / "straight" / "train.log").read_text()
    assert "step=6 loss=" in log and "images_per_s=" in log


def test_run_dir_is_a_model_and_exports_to_diffusers(data_dir, tmp_path):
    run("train", data_dir, "--out", "r", "--steps", 2, "--save-every", 2, *TINY, cwd=tmp_path)
    loaded = loading.load_model(str(tmp_path / "r"))
    ema = {k[4:]: v for k, v in checkpoint_tensors(tmp_path / "r").items() if k.startswith("ema.")}
    assert all(torch.equal(loaded.unet.state_dict()[k], v) for k, v in ema.items())
    run("sample", "--model", "r", "-n", 2, "--steps", 3, "--out", "s.png", cwd=tmp_path)
    assert Image.open(tmp_path / "s.png").mode == "L"

    run("export", "r", "exported", cwd=tmp_path)
    diffusers = pytest.importorskip("diffusers")
    pipeline = diffusers.DDIMPipeline.from_pretrained(tmp_path / "exported")
    ref = diffusers.UNet2DModel.from_pretrained(tmp_path / "exported", subfolder="unet").eval()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 900])
    with torch.no_grad():
        assert (ref(x, t).sample - loaded.unet(x, t)).abs().max() < 1e-5
        assert (pipeline.unet(x, t).sample - loaded.unet(x, t)).abs().max() < 1e-5
    scheduler = diffusers.DDIMScheduler.from_pretrained(tmp_path / "exported", subfolder="scheduler")
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.beta_end == 0.02
    assert not scheduler.config.clip_sample
    # And ddimctl reads its own export back.
    back = loading.load_model(str(tmp_path / "exported"))
    assert all(torch.equal(back.unet.state_dict()[k], v) for k, v in loaded.unet.state_dict().items())


def test_ddp_on_two_gloo_processes_and_its_resume(data_dir, tmp_path):
    """Two gloo processes train straight to step 4; a copy of the run cut back to its step-2
    checkpoint resumes to step 4 under DDP again and ends with the same bits."""
    import shutil

    common = ["train", data_dir, "--save-every", 2, *TINY, "--sample-count", 0]
    straight = run(*common, "--out", "ddp", "--steps", 4, cwd=tmp_path, torchrun=2)
    assert straight.stderr.count("training a ") == 1  # only rank 0 talks
    assert [p.name for p in runs.checkpoint_files(tmp_path / "ddp")] == ["step-00000002.safetensors", "step-00000004.safetensors"]
    shutil.copytree(tmp_path / "ddp", tmp_path / "ddp2")
    (tmp_path / "ddp2" / "checkpoints" / "step-00000004.safetensors").unlink()
    run(*common, "--out", "ddp2", "--steps", 4, "--resume", cwd=tmp_path, torchrun=2)
    a, b = checkpoint_tensors(tmp_path / "ddp"), checkpoint_tensors(tmp_path / "ddp2")
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    single = run(*common, "--out", "one", "--steps", 4, cwd=tmp_path)
    assert single.returncode == 0


def test_sharded_and_resumed_sampling_write_the_bytes_of_a_straight_run(tiny_checkpoint, tmp_path):
    """Image i is computed in the run's own batch i // B whichever process computes it, and a rerun
    recomputes whole batches: at one batch size, any number of processes and any resume give the
    bytes of a straight run (eta = 1, so the per-image noise streams are exercised too). The CPU's
    kernels may give the same bytes at any batch position, so the batch alignment itself is held by
    tests/test_sampling.py::test_any_subset_of_a_run_is_computed_in_the_runs_own_batches, whose network
    leaks the batch into its output."""
    args = ["sample", "--model", tiny_checkpoint, "-n", 5, "--steps", 3, "--eta", "1", "--batch-size", 2]
    run(*args, "--out", "one/", cwd=tmp_path)
    run(*args, "--out", "two/", cwd=tmp_path, torchrun=2)
    names = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert names == sorted(p.name for p in (tmp_path / "two").glob("*.png")) and len(names) == 5
    for lost in ("000001.png", "000004.png"):  # as a kill leaves them: missing, or cut short
        (tmp_path / "two" / lost).write_bytes(b"")
    run(*args, "--out", "two/", cwd=tmp_path, torchrun=2)
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def two_nodes(args, cwd):
    """`ddimctl ARGS` as two machines run it: two torchrun launchers of one process each, meeting at a
    c10d rendezvous on loopback (what two Slurm nodes do with --rdzv-endpoint=HEAD:PORT)."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("HF_")}, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=ddimctl-test", "-m", "ddimctl", *map(str, args)]
    nodes = [subprocess.Popen(launcher, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), [err for _, err in outputs]
    return outputs


def test_two_nodes_sample_and_train_as_one_machine_does(tiny_checkpoint, data_dir, tmp_path):
    """Across machines: sample writes a straight run's bytes, and train the weights two processes on
    one machine give."""
    args = ["sample", "--model", tiny_checkpoint, "-n", 5, "--steps", 3, "--eta", "1", "--batch-size", 2]
    run(*args, "--out", "one/", cwd=tmp_path)
    two_nodes([*args, "--out", "nodes/"], tmp_path)
    names = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert sorted(p.name for p in (tmp_path / "nodes").glob("*.png")) == names and len(names) == 5
    assert all((tmp_path / "one" / n).read_bytes() == (tmp_path / "nodes" / n).read_bytes() for n in names)
    common = ["train", data_dir, "--save-every", 2, "--steps", 2, *TINY, "--sample-count", 0]
    run(*common, "--out", "local", cwd=tmp_path, torchrun=2)
    two_nodes([*common, "--out", "nodes-run"], tmp_path)
    a, b = checkpoint_tensors(tmp_path / "local"), checkpoint_tensors(tmp_path / "nodes-run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_shards_hold_a_straight_runs_images_and_fid_takes_them_together(tiny_checkpoint, tmp_path):
    """sample --shard I/N for batch schedulers without a rendezvous: each shard its own folder, the
    run's batches k with k % N == I; their union is the straight run's bytes, a shard resumes as
    itself, and fid's union of the folders refuses a name twice."""
    from ddimctl import evaluate
    from ddimctl.errors import DdimctlError

    args = ["sample", "--model", tiny_checkpoint, "-n", 7, "--steps", 3, "--eta", "1", "--batch-size", 2]
    run(*args, "--out", "one/", cwd=tmp_path)
    for i in range(3):
        run(*args, "--shard", f"{i}/3", "--out", f"shard{i}/", cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "shard1").glob("*.png")) == ["000002.png", "000003.png"]  # batch 1
    (tmp_path / "shard0" / "000006.png").unlink()  # as a kill leaves it
    again = run(*args, "--shard", "0/3", "--out", "shard0/", cwd=tmp_path)
    assert "wrote 1 image" in again.stdout
    union = evaluate.union_folder([tmp_path / f"shard{i}" for i in range(3)], tmp_path)
    names = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert sorted(p.name for p in union.iterdir()) == names and len(names) == 7
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (union / name).read_bytes(), name
    with pytest.raises(DdimctlError, match="is in both"):
        (tmp_path / "again").mkdir()
        evaluate.union_folder([tmp_path / "one", tmp_path / "shard1"], tmp_path / "again")
    other = run(*args, "--shard", "1/3", "--out", "shard0/", cwd=tmp_path, check=False)
    assert other.returncode == 1 and "shard 0/3 (now 1/3)" in other.stderr
    unsized = run("sample", "--model", tiny_checkpoint, "--shard", "0/2", "--out", "x/", cwd=tmp_path, check=False)
    assert unsized.returncode == 1 and "needs --batch-size" in unsized.stderr


def test_another_batch_size_changes_at_most_a_rounding(tiny_checkpoint, tmp_path):
    """Across batch sizes the network's kernels may round differently (oneDNN on AVX2 CPUs does, by
    about 1e-5): the README promises pixels within 1/255, nearly all identical."""
    args = ["sample", "--model", tiny_checkpoint, "-n", 6, "--steps", 3, "--eta", "1"]
    run(*args, "--out", "a/", cwd=tmp_path)
    run(*args, "--out", "b/", "--batch-size", 4, cwd=tmp_path)
    a, b = (np.stack([np.asarray(Image.open(p), dtype=np.int16) for p in sorted((tmp_path / d).glob("*.png"))])
            for d in ("a", "b"))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1
    assert (a == b).mean() >= 0.99


@pytest.mark.parametrize(
    "setup,args,fragment",
    [
        ("missing", [], "does not exist"),
        ("empty", [], "holds no images"),
        ("data", ["--resolution", "15"], "resolution 15 is not divisible by 2, as 2 levels of downsampling need"),
        ("data", ["--resolution", "12"], "matches no level"),
        ("data", ["--channel-mult", "1,x"], "--channel-mult takes positive integers"),
        ("data", ["--dropout", "2"], "dropout must be in [0, 1), got 2.0"),
    ],
)
def test_bad_input(data_dir, tmp_path, setup, args, fragment):
    (tmp_path / "empty").mkdir()
    folder = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "data": data_dir}[setup]
    result = run("train", folder, "--out", "r", "--steps", 2, *TINY, *args, cwd=tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and fragment in result.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_existing_run_is_never_overwritten(data_dir, tmp_path):
    run("train", data_dir, "--out", "r", "--steps", 2, "--save-every", 2, *TINY, cwd=tmp_path)
    before = checkpoint_tensors(tmp_path / "r")
    result = run("train", data_dir, "--out", "r", "--steps", 2, *TINY, cwd=tmp_path, check=False)
    assert result.returncode == 1 and "pass --resume" in result.stderr
    other = run("train", data_dir, "--out", "r", "--steps", 4, *TINY, "--base-channels", "64", "--resume", cwd=tmp_path, check=False)
    assert other.returncode == 1 and "another architecture or dropout (base_channels differ)" in other.stderr
    after = checkpoint_tensors(tmp_path / "r")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["unet"]["base_channels"] == 32


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A full disk in the middle of a save: the old checkpoint survives and no temporary file stays."""
    from ddimctl.io import files as files_module
    from ddimctl.models.unet import PRESETS, UNet

    model = UNet(PRESETS["tiny"])
    ema = UNet(PRESETS["tiny"])
    optimizer = torch.optim.AdamW(model.parameters())
    first = runs.save_checkpoint(tmp_path, 1, model, ema, optimizer, keep=3)
    saved = first.read_bytes()

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files_module, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        runs.save_checkpoint(tmp_path, 2, model, ema, optimizer, keep=1)
    assert [p.name for p in runs.checkpoint_files(tmp_path)] == ["step-00000001.safetensors"]
    assert first.read_bytes() == saved
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.suffix == ".tmp"]


def test_unwritable_run_dir_is_a_one_line_error(data_dir, tmp_path):
    (tmp_path / "afile").write_text("")
    result = run("train", data_dir, "--out", "afile/run", "--steps", 2, *TINY, cwd=tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot create the run folder afile/run: afile is a file, not a folder"), last
    assert "training a" not in result.stderr  # refused before any work


def test_channels_follow_the_data_unless_given(data_dir, tmp_path):
    """The fixture's images are all grayscale: a 3-channel preset trains a 1-channel model."""
    result = run("train", data_dir, "--out", "gray", "--steps", 1, "--preset", "tiny", "--batch-size", 4,
                 "--sample-count", 0, cwd=tmp_path)
    assert "1 channel: every image is grayscale" in result.stderr
    assert json.loads((tmp_path / "gray" / "config.json").read_text())["unet"]["in_channels"] == 1
    Image.fromarray(np.zeros((8, 8, 3), dtype="uint8"), "RGB").save(data_dir / "colour.png")
    result = run("train", data_dir, "--out", "rgb", "--steps", 1, "--preset", "tiny", "--batch-size", 4,
                 "--sample-count", 0, cwd=tmp_path)
    assert "3 channels: RGB images found" in result.stderr


def test_fine_tuning_starts_from_the_given_weights(data_dir, tmp_path, tiny_checkpoint):
    """--init: the model's architecture (RGB here, though the data is grayscale) and its weights as the
    start; one step at a tiny learning rate leaves them all but unchanged (a fresh start would not)."""
    run("train", data_dir, "--out", "ft", "--init", tiny_checkpoint, "--steps", 1, "--save-every", 1, "--batch-size", 4,
        "--lr", "1e-9", "--warmup", 0, "--sample-count", 0, "--seed", 5, cwd=tmp_path)
    start = load_file(tiny_checkpoint)
    tuned = loading.load_model(str(tmp_path / "ft"))
    assert tuned.config.in_channels == 3
    assert max(float((tuned.unet.state_dict()[k] - v).abs().max()) for k, v in start.items()) < 1e-6
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["train"]["init"] == str(tiny_checkpoint)


def test_fine_tuning_reads_the_initial_weights_once(data_dir, tmp_path, tiny_checkpoint, monkeypatch):
    """--init's checkpoint is read for the checks before any work, and that reading is what trains."""
    calls = []
    real = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda spec, **kw: calls.append(spec) or real(spec, **kw))
    run("train", data_dir, "--out", "ft", "--init", tiny_checkpoint, "--steps", 1, "--batch-size", 4, "--sample-count", 0,
        cwd=tmp_path)
    assert calls == [str(tiny_checkpoint)]


def test_fine_tuning_keeps_the_architecture(data_dir, tmp_path, tiny_checkpoint):
    result = run("train", data_dir, "--out", "r", "--init", tiny_checkpoint, "--preset", "tiny", "--channels", 1,
                 cwd=tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --init {tiny_checkpoint} fixes the architecture (3 channel(s), 16x16); leave out --preset, --channels")
    assert not (tmp_path / "r").exists()


def test_a_hopeless_cpu_run_says_so_before_it_starts(tmp_path):
    """A CIFAR-10 preset for ten million steps on a CPU: a warning with the estimate and what is
    quicker, before any work (here the data then turn out unreadable, so nothing is trained)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "broken.png").write_bytes(b"\x89PNG not really")
    result = run("train", tmp_path / "data", "--out", "r", "--preset", "cifar10", "--steps", 10_000_000, "--channels", 3,
                 "--device", "cpu", cwd=tmp_path, check=False)
    warning = next(line for line in result.stderr.splitlines() if line.startswith("warning: about"))
    assert "days on this CPU" in warning and "a smaller --preset" in warning
    assert result.returncode == 1 and not (tmp_path / "r").exists()


def test_ctrl_c_leaves_a_log_that_says_where_the_run_stopped(data_dir, tmp_path):
    """train.log ends with the step and the checkpoint a resume starts from; a log (not a terminal)
    gets plain progress lines, not a dump of bars."""
    import os
    import signal
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ddimctl", "train", str(data_dir), "--out", "r", "--steps", "100000",
                             "--save-every", "2", *TINY], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((tmp_path / "r" / "checkpoints").glob("*.safetensors")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and "Traceback" not in err and "━" not in err
    last = (tmp_path / "r" / "train.log").read_text().strip().splitlines()[-1]
    assert last.startswith("interrupted at step ") and "newest checkpoint step-" in last
