"""Bad inputs and faults, each a real `ddimctl` command run on files these cases build.

Shared by tests/test_reliability.py (every case must be clean) and scripts/reliability_table.py
(docs/reliability.md). A case builds what it needs in a fresh folder and returns the command line;
`expect` is a fragment of the last line printed, `code` the exit status a clean run gives.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from helpers import ddimctl
from safetensors.torch import save_file

DATA = Path(__file__).parent / "data"
THREE = str(DATA / "digit-three.png")
DIGITS = ["--model", "digits"]


@dataclass
class Case:
    name: str
    build: Callable[[Path], list[str]]  # makes the files it needs in the folder; returns the arguments
    expect: str
    code: int = 1
    env: dict | None = None
    python: str | None = None  # run through `python -c` with this prelude instead of `-m ddimctl`
    leaves: Callable[[Path], list[str]] | None = None  # what the case must not leave behind (listed if found)
    also: str | None = None  # a fragment that must appear somewhere in stderr


def run_case(case: Case, folder: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return execute(case, folder, case.build(folder), timeout)


def execute(case: Case, folder: Path, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {"DDIMCTL_CACHE": str(folder / ".cache"), **(case.env or {})}
    return ddimctl(*args, cwd=folder, check=False, env=env, prelude=case.python, timeout=timeout)


def tiny_checkpoint(folder: Path, mutate: Callable[[dict], None] | None = None) -> str:
    from ddimctl.models.unet import PRESETS, UNet

    torch.manual_seed(0)
    state = UNet(PRESETS["tiny"]).state_dict()
    if mutate:
        mutate(state)
    save_file(state, str(folder / "tiny.safetensors"))
    (folder / "tiny.json").write_text(json.dumps({"unet": PRESETS["tiny"].to_dict()}))
    return str(folder / "tiny.safetensors")


def latents(folder: Path, tensor: torch.Tensor, name: str = "z.safetensors") -> str:
    save_file({"latents": tensor}, str(folder / name), metadata={"model": "digits", "steps": "2"})
    return name


def gray_pngs(folder: Path, count: int = 6) -> str:
    (folder / "data").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray((rng.random((16, 16)) * 255).astype("uint8"), "L").save(folder / "data" / f"{i}.png")
    return "data"


TRAIN = ["--preset", "tiny", "--batch-size", "2", "--sample-count", "0", "--warmup", "1"]


def trained_run(folder: Path, steps: int = 2) -> None:
    """A tiny run folder with checkpoints at every step (built in-process: fast)."""
    from ddimctl import train

    gray_pngs(folder)
    options = train.TrainOptions(data=str(folder / "data"), out=str(folder / "run"), preset="tiny", steps=steps,
                                 batch_size=2, save_every=1, keep=5, sample_count=0, warmup=1,
                                 unet={"in_channels": 1, "out_channels": 1})
    train.train(options, torch.device("cpu"))


def truncate_newest(folder: Path) -> None:
    newest = sorted((folder / "run" / "checkpoints").glob("*.safetensors"))[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])


def strip_optimizer(folder: Path) -> None:
    from safetensors import safe_open

    for path in (folder / "run" / "checkpoints").glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            kept = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("optim.")}
        save_file(kept, str(path), metadata={"step": meta["step"]})


def damage_metadata(folder: Path, **changed: str) -> None:
    """Rewrite the newest checkpoint's metadata (as a crash or a hand edit might leave it)."""
    from safetensors import safe_open

    newest = sorted((folder / "run" / "checkpoints").glob("*.safetensors"))[-1]
    with safe_open(str(newest), "pt") as f:
        meta, kept = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(kept, str(newest), metadata={**meta, **changed})


def original_layout_checkpoint(folder: Path, extra_key: str | None = None, drop_levels: bool = False) -> str:
    """The DDIM authors' layout (temb.dense...), with an unknown key or without its levels."""
    state = {"temb.dense.0.weight": torch.zeros(4, 2), "conv_in.weight": torch.zeros(2, 1, 3, 3),
             "mid.block_1.norm1.weight": torch.zeros(2)}
    if not drop_levels:
        state["down.0.block.0.conv1.weight"] = torch.zeros(2, 2, 3, 3)
    if extra_key:
        state[extra_key] = torch.zeros(2)
    save_file(state, str(folder / "orig.safetensors"))
    return "orig.safetensors"


def sixteen_bit(folder: Path) -> str:
    array = (np.asarray(Image.open(THREE), dtype=np.uint32) * 257).astype(np.uint16)  # 8 -> 16 bits exactly
    Image.fromarray(array).save(folder / "three16.png")
    return "three16.png"


def no_run_folder(name: str) -> Callable[[Path], list[str]]:
    return lambda folder: [name] if (folder / name).exists() else []


def temporaries(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob("*.tmp")]


def sidecar(folder: Path, content: bytes | str, name: str = "tiny.json") -> str:
    """The tiny checkpoint with its sidecar replaced by `content`."""
    path = tiny_checkpoint(folder)
    (folder / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def diffusers_folder(folder: Path, change: dict | None = None, scheduler: dict | None = None) -> str:
    """A diffusers-layout folder of the tiny UNet with `change` applied to its config.json."""
    from ddimctl.models.diffusers_format import diffusers_config
    from ddimctl.models.unet import PRESETS, UNet

    model = folder / "model"
    model.mkdir()
    torch.manual_seed(0)
    save_file(UNet(PRESETS["tiny"]).state_dict(), str(model / "diffusion_pytorch_model.safetensors"))
    (model / "config.json").write_text(json.dumps({**diffusers_config(PRESETS["tiny"]), **(change or {})}))
    if scheduler is not None:
        (model / "scheduler_config.json").write_text(json.dumps(scheduler))
    return "model"


def typed_weights(folder: Path, dtype: torch.dtype) -> str:
    return tiny_checkpoint(folder, lambda s: s.update({k: v.to(dtype) for k, v in s.items()}))


def someone_elses_photos(folder: Path) -> list[str]:
    (folder / "photos").mkdir()
    (folder / "photos" / "000000.png").write_bytes(b"a photo of a cat")
    return ["sample", *DIGITS, "-n", "2", "--steps", "2", "--out", "photos/"]


def photos_untouched(folder: Path) -> list[str]:
    return [] if (folder / "photos" / "000000.png").read_bytes() == b"a photo of a cat" else ["photos/000000.png"]


def users_temporaries(folder: Path) -> list[str]:
    (folder / "s").mkdir()
    for name in (".photos.2024.old.tmp", ".x.20240101123456.part.tmp"):
        (folder / "s" / name).write_text("mine")
    return ["sample", *DIGITS, "-n", "2", "--steps", "2", "--out", "s/"]


def users_temporaries_kept(folder: Path) -> list[str]:
    return [n for n in (".photos.2024.old.tmp", ".x.20240101123456.part.tmp") if not (folder / "s" / n).is_file()]


def nan_tiff(folder: Path) -> str:
    array = np.asarray(Image.open(THREE), dtype=np.float32) / 255
    array[3, 4] = np.nan
    Image.fromarray(array, "F").save(folder / "nan.tif")
    return "nan.tif"


def run_with_config(folder: Path, edit: Callable[[dict], None]) -> str:
    trained_run(folder)
    config = json.loads((folder / "run" / "config.json").read_text())
    edit(config)
    (folder / "run" / "config.json").write_text(json.dumps(config))
    return "run"


def record(folder: Path, content: str) -> list[str]:
    (folder / "s").mkdir()
    (folder / "s" / ".ddimctl-sample.json").write_text(content)
    return ["sample", *DIGITS, "-n", "2", "--steps", "2", "--out", "s/"]


FULL_DISK = (
    "import safetensors, ddimctl.io.files\n"
    "def full(*a, **k):\n"
    "    raise safetensors.SafetensorError('No space left on device (os error 28)')\n"
    "ddimctl.io.files.save_file = full\n"
    "import sys; sys.argv[0] = 'ddimctl'\n"
)

CASES = [
    # Devices and options
    Case("unsupported device", lambda f: ["sample", *DIGITS, "--device", "meta"], "'meta' is not a device", code=2),
    Case("CUDA asked for, none there", lambda f: ["sample", *DIGITS, "--device", "cuda"], "shows no NVIDIA GPU driver", code=2),
    Case("eta NaN", lambda f: ["sample", *DIGITS, "--eta", "nan"], "--eta must be between 0 and 1 (0: DDIM, 1: DDPM's posterior variance)"),
    Case("eta infinite", lambda f: ["sample", *DIGITS, "--eta", "inf"], "--eta must be between 0 and 1 (0: DDIM, 1: DDPM's posterior variance)"),
    Case("eta negative", lambda f: ["sample", *DIGITS, "--eta", "-1"], "--eta must be between 0 and 1 (0: DDIM, 1: DDPM's posterior variance)"),
    Case("eta huge", lambda f: ["sample", *DIGITS, "--eta", "1e308", "--out", "e.png"], "--eta must be between 0 and 1",
         leaves=lambda f: ["e.png"] if (f / "e.png").exists() else []),
    Case("a registry file that is not UTF-8", lambda f: (f / "reg.toml").write_bytes(b"\xff\xfe[x]") and ["models"],
         "not a readable TOML file", env={"DDIMCTL_REGISTRY": "reg.toml"}),
    Case("a sidecar asking for a network far larger than its weights", lambda f: sidecar(f, json.dumps({"unet": {
         "resolution": 2048, "base_channels": 4096, "channel_mult": [64, 64], "num_res_blocks": 64,
         "attention_resolutions": []}})) and
         ["sample", "--model", "tiny.safetensors", "-n", "1", "--out", "x.png"], "weights do not fit the UNet architecture"),
    Case("steps 0", lambda f: ["sample", *DIGITS, "--steps", "0"], "Invalid value for '--steps'", code=2),
    Case("steps above T", lambda f: ["sample", *DIGITS, "--steps", "5000"], "--steps must be between 1 and 1000"),
    Case("unknown skip", lambda f: ["sample", *DIGITS, "--skip", "cosine"], "uniform"),
    Case("no images", lambda f: ["sample", *DIGITS, "-n", "0"], "Invalid value for '--num'", code=2),
    Case("batch size 0", lambda f: ["sample", *DIGITS, "--batch-size", "0"], "Invalid value for '--batch-size'", code=2),
    Case("unknown precision", lambda f: ["sample", *DIGITS, "--precision", "int4"], "--precision must be one of"),
    Case("fp16 on a CPU", lambda f: ["sample", *DIGITS, "--precision", "fp16"], "needs a CUDA GPU"),
    Case("exact inversion tolerance NaN", lambda f: ["invert", THREE, *DIGITS, "--exact", "--tol", "nan"], "tolerance >= 0"),
    # Models and registries
    Case("unknown model", lambda f: ["sample", "--model", "nosuch"], "unknown model 'nosuch'"),
    Case("wrong-shape tensor beside a config",
         lambda f: ["sample", "--model", tiny_checkpoint(f, lambda s: s.update({"conv_in.weight": torch.zeros(32, 3, 5, 5)}))],
         "conv_in.weight has shape (32, 3, 5, 5)"),
    Case("NaN weights", lambda f: ["sample", "--model", tiny_checkpoint(f, lambda s: s["conv_out.bias"].fill_(float("nan")))],
         "NaN or infinite values (conv_out.bias)"),
    Case("registry entry missing fields", lambda f: ["models"], "lacks architecture, resolution, skip, license"),
    Case("registry resolution not a number", lambda f: ["models"], "resolution must be an integer, got 'sixteen'"),
    Case("registry models = 5", lambda f: ["models"], "[models] must be a table"),
    Case("registry not TOML", lambda f: ["models"], "not a readable TOML file"),
    Case("Hub host does not resolve", lambda f: ["sample", "--steps", "50", "--eta", "0"], "does not resolve (no network?)",
         env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://ddimctl-test.invalid"}),
    # Latents
    Case("latents with zero rows", lambda f: ["sample", *DIGITS, "--latents", latents(f, torch.zeros(0, 1, 16, 16))],
         "holds no latents (0 rows)"),
    Case("latents with NaN", lambda f: ["sample", *DIGITS, "--latents", latents(f, torch.full((2, 1, 16, 16), float("nan")))],
         "latent(s) 0, 1 hold NaN or infinite values"),
    Case("latents of another shape", lambda f: ["sample", *DIGITS, "--latents", latents(f, torch.zeros(2, 3, 8, 8))],
         "does not fit this model"),
    Case("latents not safetensors", lambda f: (f / "z.safetensors").write_text("hello") and ["sample", "--latents", "z.safetensors"],
         "not a safetensors file"),
    Case("latents file missing", lambda f: ["sample", *DIGITS, "--latents", "nothere.safetensors"], "no such file"),
    # Input images
    Case("image missing", lambda f: ["invert", "nothere.png", *DIGITS], "nothere.png: no such image file"),
    Case("not an image", lambda f: (f / "a.png").write_text("text") and ["invert", "a.png", *DIGITS], "not a readable image"),
    Case("truncated PNG", lambda f: (f / "t.png").write_bytes(Path(THREE).read_bytes()[:60]) and ["invert", "t.png", *DIGITS],
         "not a readable image"),
    Case("empty folder", lambda f: (f / "empty").mkdir() or ["invert", "empty", *DIGITS], "holds no images"),
    Case("16-bit grayscale PNG accepted", lambda f: ["reconstruct", sixteen_bit(f), *DIGITS, "--steps", "10",
                                                     "--exact", "--json"], '"mse"', code=0),
    # Outputs
    Case("grid output not an image name", lambda f: ["sample", *DIGITS, "--out", "x.txt"], "give an image file"),
    Case("output folder missing", lambda f: ["sample", *DIGITS, "--out", "no/where/x.png"], "folder no/where does not exist"),
    Case("latents output not .safetensors", lambda f: ["invert", THREE, *DIGITS, "--out", "z.bin"], "must end in .safetensors"),
    Case("reconstruct into a .txt", lambda f: ["reconstruct", THREE, *DIGITS, "--out", "r.txt"], "must end in .png"),
    Case("interpolate GIF name", lambda f: ["interpolate", THREE, THREE, *DIGITS, "--gif", "x.png"], "must end in .gif"),
    Case("rerun into a folder with another seed",
         lambda f: ddimctl("sample", *DIGITS, "-n", "2", "--steps", "2", "--out", "s/", cwd=f,
                           env={"DDIMCTL_CACHE": str(f / ".cache")})
         and ["sample", *DIGITS, "-n", "2", "--steps", "2", "--seed", "5", "--out", "s/"],
         "other settings (seed 0 (now 5))"),
    Case("safetensors write on a full disk", lambda f: ["invert", THREE, *DIGITS, "--steps", "2", "--out", "z.safetensors"],
         "No space left on device", python=FULL_DISK, leaves=temporaries),
    # Interpolate and edit
    Case("interpolate one image", lambda f: ["interpolate", THREE, *DIGITS], "takes two images"),
    Case("interpolate --seeds with one value", lambda f: ["interpolate", "--seeds", "1", *DIGITS], "two integers"),
    Case("interpolate one frame", lambda f: ["interpolate", THREE, THREE, *DIGITS, "--frames", "1"], "Invalid value for '--frames'",
         code=2),
    Case("interpolate 100000 frames into a strip", lambda f: ["interpolate", THREE, THREE, *DIGITS, "--frames", "100000"],
         "at most 256 frames"),
    Case("edit strength above 1", lambda f: ["edit", THREE, *DIGITS, "--strength", "1.5"], "between 0 and 1"),
    Case("edit mask missing", lambda f: ["edit", THREE, *DIGITS, "--strength", "0.5", "--mask", "m.png"], "no such image file"),
    Case("exact inversion with 0 iterations", lambda f: ["invert", THREE, *DIGITS, "--exact", "--max-iters", "0"],
         "at least 1 iteration"),
    # Training
    Case("train lr NaN", lambda f: ["train", gray_pngs(f), "--out", "run", "--lr", "nan", *TRAIN], "learning rate must be",
         leaves=no_run_folder("run")),
    Case("train lr negative", lambda f: ["train", gray_pngs(f), "--out", "run", "--lr", "-1", *TRAIN], "learning rate must be",
         leaves=no_run_folder("run")),
    Case("train EMA decay 1.5", lambda f: ["train", gray_pngs(f), "--out", "run", "--ema-decay", "1.5", *TRAIN],
         "EMA decay must be in [0, 1)", leaves=no_run_folder("run")),
    Case("train run folder under a file", lambda f: (f / "afile").write_text("") or ["train", gray_pngs(f), "--out", "afile/run", *TRAIN],
         "afile is a file, not a folder"),
    Case("train data folder missing", lambda f: ["train", "nodata", "--out", "run", *TRAIN], "folder nodata does not exist",
         leaves=no_run_folder("run")),
    Case("train over an existing run", lambda f: trained_run(f) or ["train", "data", "--out", "run", *TRAIN, "--steps", "4"],
         "already holds a run"),
    Case("resume with a truncated newest checkpoint", lambda f: trained_run(f) or truncate_newest(f) or
         ["train", "data", "--out", "run", *TRAIN, "--channels", "1", "--steps", "3", "--save-every", "1", "--keep", "5", "--resume"],
         "done in", code=0),
    Case("resume from checkpoints without optimizer state", lambda f: trained_run(f) or strip_optimizer(f) or
         ["train", "data", "--out", "run", *TRAIN, "--channels", "1", "--steps", "3", "--resume"],
         "holds no checkpoint that can be resumed from"),
    Case("resume when the newest checkpoint's step is not a number", lambda f: trained_run(f) or
         damage_metadata(f, step="two") or
         ["train", "data", "--out", "run", *TRAIN, "--channels", "1", "--steps", "3", "--save-every", "1", "--keep", "5",
          "--resume"], "done in", code=0, also="is not the 2 its name says"),
    Case("resume when the newest checkpoint's optimizer settings are damaged", lambda f: trained_run(f) or
         damage_metadata(f, param_groups='[{"lr": "x"}]') or
         ["train", "data", "--out", "run", *TRAIN, "--channels", "1", "--steps", "3", "--save-every", "1", "--keep", "5",
          "--resume"], "done in", code=0, also="param_groups"),
    Case("an --out file name of 255 bytes, the most a file system takes", lambda f: [
         "sample", *DIGITS, "-n", "1", "--steps", "2", "--out", "a" * 251 + ".png"], "wrote 1 image", code=0,
         leaves=temporaries),
    Case("resume with another dropout", lambda f: trained_run(f) or
         ["train", "data", "--out", "run", *TRAIN, "--channels", "1", "--steps", "3", "--dropout", "0.5", "--resume"],
         "dropout differ"),
    Case("a plain run given torchrun's variables by hand", lambda f: ["sample", *DIGITS, "-n", "1", "--out", "s/"],
         "TORCHELASTIC_RUN_ID missing", env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                                             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"},
         leaves=no_run_folder("s")),
    Case("an original-layout checkpoint with an unknown mid block", lambda f: ["sample", "--model",
         original_layout_checkpoint(f, "mid.block_3.norm1.weight"), "-n", "1", "--out", "x.png"], "mid.block_3"),
    Case("an original-layout checkpoint without levels", lambda f: ["sample", "--model",
         original_layout_checkpoint(f, drop_levels=True), "-n", "1", "--out", "x.png"], "without down.N keys"),
]

CASES += [
    # Files that are not ddimctl's own are never overwritten, adopted or deleted
    Case("sample into a folder of someone else's PNGs", someone_elses_photos, "that ddimctl did not write",
         leaves=photos_untouched),
    Case("a user's files named like temporaries", users_temporaries, "wrote 2 images", code=0, leaves=users_temporaries_kept),
    Case("registry revision with ..", lambda f: ["models"], "is not a branch, tag or commit name"),
    Case("registry name with ../", lambda f: ["models"], "a model name is letters, digits"),
    Case("registry file outside the repo", lambda f: ["models"], "must be a path inside the repository"),
    Case("registry unknown skip", lambda f: ["models"], "field 'skip' is 'cosine', expected one of uniform, quad"),
    Case("registry schedule of 10^9 steps", lambda f: ["models"], "field 'train_steps' is 1000000000, expected an integer from 1"),
    # Every file ddimctl reads is untrusted input
    Case("sidecar is a JSON list", lambda f: ["sample", "--model", sidecar(f, "[1, 2]")], "expected a JSON object {...}, found a list"),
    Case("sidecar not UTF-8", lambda f: ["sample", "--model", sidecar(f, b"\xff\xfe\x00{")], "not a UTF-8 text file"),
    Case("sidecar names an unknown UNet field", lambda f: ["sample", "--model", sidecar(f, '{"unet": {"wings": 2}}')],
         "unknown field 'wings'"),
    Case("sidecar with a negative resolution", lambda f: ["sample", "--model", sidecar(f, '{"unet": {"resolution": -16}}')],
         "field 'resolution' is -16, expected an integer from 1"),
    Case("sidecar with an unknown skip scheme", lambda f: ["sample", "--model", sidecar(f, '{"unet": {}, "skip": "cosine"}')],
         "field 'skip' is 'cosine'"),
    Case("sidecar schedule of 10^9 steps",
         lambda f: ["sample", "--model", sidecar(f, '{"unet": {}, "schedule": {"train_steps": 1000000000}}')],
         "field 'train_steps' is 1000000000"),
    Case("diffusers config with a wrong type", lambda f: ["sample", "--model", diffusers_folder(f, {"block_out_channels": "wide"})],
         "field 'block_out_channels' is 'wide', expected a non-empty list of integers"),
    Case("diffusers config with a non-square sample_size",
         lambda f: ["sample", "--model", diffusers_folder(f, {"sample_size": [16, 32]})], "is not square"),
    Case("scheduler config of 10^9 steps",
         lambda f: ["sample", "--model", diffusers_folder(f, scheduler={"num_train_timesteps": 10**9})],
         "field 'num_train_timesteps' is 1000000000"),
    Case("int8 weights", lambda f: ["sample", "--model", typed_weights(f, torch.int8)], "stored as int8"),
    Case("float8 weights", lambda f: ["sample", "--model", typed_weights(f, torch.float8_e4m3fn)], "stored as float8_e4m3fn"),
    Case("run config with a broken field", lambda f: ["sample", "--model", run_with_config(
        f, lambda c: c["unet"].update({"channel_mult": "1,2"}))], "field 'channel_mult' is '1,2'"),
    Case("sample-folder record is a list", lambda f: record(f, "[1]"), "is not a record ddimctl wrote"),
    Case("latents metadata with a wrong steps", lambda f: save_file({"latents": torch.zeros(1, 1, 16, 16)}, str(f / "z.safetensors"),
         metadata={"model": "digits", "steps": "many"}) or ["sample", "--latents", "z.safetensors"], "field 'steps' is 'many'"),
    Case("float TIFF with a NaN pixel", lambda f: ["invert", nan_tiff(f), *DIGITS], "NaN or infinite pixels"),
    # The environment and sizes checked before the work
    Case("WORLD_SIZE leaking into a plain run", lambda f: ["sample", *DIGITS, "-n", "2", "--steps", "2"],
         "WORLD_SIZE=2 is set but this is no torchrun launch", env={"WORLD_SIZE": "2"}),
    Case("a grid that cannot fit in memory", lambda f: ["sample", *DIGITS, "-n", "50000000", "--out", "g.png"],
         "write them one PNG each with --out FOLDER/"),
    Case("export on a full disk", lambda f: ["export", "digits", "exported"], "No space left on device", python=FULL_DISK,
         leaves=lambda f: [p.name for p in f.iterdir() if p.name.startswith((".exported", "exported"))]),
    Case("train resume with another learning rate", lambda f: trained_run(f) or
         ["train", "data", "--out", "run", "--steps", "3", "--lr", "0.1", "--resume"], "was trained with --lr"),
]

REGISTRIES = {
    "registry revision with ..": ('[models.evil]\ndescription = "x"\narchitecture = "tiny"\nresolution = 16\nskip = "uniform"\n'
                                  'license = "MIT"\nrepo = "a/b"\nrevision = "../../../../outside"\nfile = "m.safetensors"\n'),
    "registry name with ../": ('[models."../evil"]\ndescription = "x"\narchitecture = "tiny"\nresolution = 16\nskip = "uniform"\n'
                               'license = "MIT"\nrepo = "a/b"\nfile = "m.bin"\nsha256 = "' + "a" * 64 + '"\n'),
    "registry file outside the repo": ('[models.evil]\ndescription = "x"\narchitecture = "tiny"\nresolution = 16\nskip = "uniform"\n'
                                       'license = "MIT"\nrepo = "a/b"\nfile = "../../m.safetensors"\n'),
    "registry unknown skip": ('[models.odd]\ndescription = "x"\narchitecture = "tiny"\nresolution = 16\nskip = "cosine"\n'
                              'license = "MIT"\nrepo = "a/b"\nfile = "m.safetensors"\n'),
    "registry schedule of 10^9 steps": ('[schedule.huge]\ntrain_steps = 1000000000\n[models.odd]\ndescription = "x"\n'
                                        'architecture = "tiny"\nresolution = 16\nskip = "uniform"\nlicense = "MIT"\n'
                                        'repo = "a/b"\nfile = "m.safetensors"\nschedule = "huge"\n'),
    "registry entry missing fields": '[models.broken]\ndescription = "x"\nrepo = "a/b"\nfile = "m.safetensors"\n',
    "registry resolution not a number": (
        '[models.broken]\ndescription = "x"\narchitecture = "tiny"\nresolution = "sixteen"\nskip = "uniform"\n'
        'license = "MIT"\nrepo = "a/b"\nfile = "m.safetensors"\n'
    ),
    "registry models = 5": "models = 5\n",
    "registry not TOML": "this is [not toml\n",
}
for case in CASES:
    if case.name in REGISTRIES:
        case.env = {"DDIMCTL_REGISTRY": "my.toml"}  # relative to the case's folder
        case.build = (lambda text: lambda f: (f / "my.toml").write_text(text) and ["models"])(REGISTRIES[case.name])
    if case.name == "resume with a truncated newest checkpoint":
        case.also = "notice: removed step-00000002.safetensors: unreadable"


# --------------------------------------------------------------------------------------------
# One rule for every command that writes: a file ddimctl did not write is never overwritten,
# appended to, adopted or deleted. Each case puts a user's file where the command would write and
# runs the command; it must refuse before any work and leave the user's files as they were.

USERS_BYTES = b"a user's own file, not ddimctl's"


def users_files(folder: Path, names: list[str]) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(USERS_BYTES)


def users_files_untouched(names: list[str]) -> Callable[[Path], list[str]]:
    return lambda folder: [n for n in names if (folder / n).read_bytes() != USERS_BYTES]


def users_pipeline(folder: Path) -> list[str]:
    """What diffusers' save_pretrained writes for a DDIMPipeline: the four files an export writes too."""
    for name in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json"):
        users_files(folder / "pipe", [name])
    return ["export", tiny_checkpoint(folder), "pipe"]


def users_images_as_inputs(folder: Path) -> list[str]:
    (folder / "pics").mkdir()
    Image.open(THREE).save(folder / "pics" / "three.png")
    return ["edit", "pics/", "--out", "pics/", *DIGITS, "--strength", "0.2", "--steps", "2"]


def recorded_folder_with_users_image(folder: Path) -> list[str]:
    """A sample folder that ddimctl's run started, into which a user put a same-size 000003.png."""
    args = ["sample", *DIGITS, "-n", "5", "--steps", "2", "--out", "s/", "--seed", "3"]
    ddimctl(*args, "-n", "2", cwd=folder)
    ddimctl("sample", *DIGITS, "-n", "2", "--steps", "2", "--out", "other/", "--seed", "9", cwd=folder)
    (folder / "s" / "000003.png").write_bytes((folder / "other" / "000001.png").read_bytes())
    return args[:4] + ["5"] + args[5:]


def users_png_kept(folder: Path) -> list[str]:
    return [] if (folder / "s" / "000003.png").read_bytes() == (folder / "other" / "000001.png").read_bytes() else ["s/000003.png"]


OWNERSHIP = [
    ("sample grid over a user's file", ["grid.png"], ["sample", *DIGITS, "-n", "4", "--steps", "2", "--out", "grid.png"]),
    ("edit into a folder holding a user's file of the same name", ["out/digit-three.png"],
     ["edit", THREE, "--out", "out/", *DIGITS, "--strength", "0.2", "--steps", "2"]),
    ("edit over a user's single file", ["edited.png"],
     ["edit", THREE, "--out", "edited.png", *DIGITS, "--strength", "0.2", "--steps", "2"]),
    ("interpolate into a user's folder of photos", ["photos/000000.png"],
     ["interpolate", "--seeds", "1,2", *DIGITS, "--steps", "2", "--frames", "3", "--out", "photos/"]),
    ("interpolate strip over a user's file", ["interp.png"],
     ["interpolate", "--seeds", "1,2", *DIGITS, "--steps", "2", "--frames", "3", "--out", "interp.png"]),
    ("interpolate GIF over a user's file", ["mine.gif"],
     ["interpolate", "--seeds", "1,2", *DIGITS, "--steps", "2", "--frames", "3", "--out", "s.png", "--gif", "mine.gif"]),
    ("invert latents over a user's file", ["z.safetensors"], ["invert", THREE, *DIGITS, "--steps", "2", "--out", "z.safetensors"]),
    ("reconstruct picture over a user's file", ["r.png"],
     ["reconstruct", THREE, *DIGITS, "--steps", "2", "--out", "r.png"]),
    ("train into a folder with a user's train.log", ["mine/train.log"],
     ["train", "data", "--out", "mine", *TRAIN, "--channels", "1", "--steps", "2"]),
]

for name, names, args in OWNERSHIP:
    CASES.append(Case(name, (lambda names, args: lambda f: (gray_pngs(f), users_files(f, names), args)[-1])(names, args),
                      "ddimctl did not write", leaves=users_files_untouched(names)))
CASES += [
    Case("export over a user's own diffusers pipeline", users_pipeline, "that an export of ddimctl's did not write",
         leaves=users_files_untouched([f"pipe/{n}" for n in ("model_index.json", "unet/config.json",
                                                            "unet/diffusion_pytorch_model.safetensors",
                                                            "scheduler/scheduler_config.json")])),
    Case("edit a folder into itself", users_images_as_inputs, "ddimctl did not write",
         leaves=lambda f: [] if Image.open(f / "pics" / "three.png").tobytes() == Image.open(THREE).tobytes() else ["pics/three.png"]),
    Case("a user's image in a sample folder that ddimctl's run started", recorded_folder_with_users_image,
         "that ddimctl did not write (000003.png)", leaves=users_png_kept),
]

# Numbers that stop being numbers, and refusals that must come before the work
CASES += [
    Case("training whose loss goes NaN", lambda f: (gray_pngs(f), ["train", "data", "--out", "run", *TRAIN, "--channels", "1",
                                                                  "--steps", "4", "--lr", "1e30", "--warmup", "0"])[-1],
         "the training loss became", leaves=lambda f: [p.name for p in (f / "run" / "checkpoints").glob("*.safetensors")]),
    Case("--eta with --sigma-hat", lambda f: ["sample", *DIGITS, "--sigma-hat", "--eta", "0.5"], "is not used with --sigma-hat"),
    Case("DDIMCTL_PROGRESS_SECONDS=abc", lambda f: ["sample", *DIGITS, "-n", "2", "--steps", "2", "--out", "g.png"],
         "DDIMCTL_PROGRESS_SECONDS='abc' is not a number", leaves=lambda f: [p.name for p in f.glob("g.png")]),
    # option ranges the parser states: click's usage error, exit 2
    Case("--threads 100000", lambda f: ["--threads", "100000", "models"], "--threads", code=2),
    Case("bench --runs 0", lambda f: ["bench", "--model", "digits", "--runs", "0"], "--runs", code=2),
    Case("bench --batch-size 0", lambda f: ["bench", "--model", "digits", "--batch-size", "0"], "--batch-size", code=2),
    Case("train --sample-count 10^8", lambda f: (gray_pngs(f), ["train", "data", "--out", "run", "--sample-count", "100000000"])[-1],
         "--sample-count", code=2),
    Case("RUN@² as a model", lambda f: (trained_run(f), ["sample", "--model", "run@²", "-n", "1"])[-1], "unknown model"),
]
for case in CASES:
    if case.name == "DDIMCTL_PROGRESS_SECONDS=abc":
        case.env = {"DDIMCTL_PROGRESS_SECONDS": "abc"}
CASES += [
    Case("sample -n 10^12", lambda f: ["sample", *DIGITS, "-n", "1000000000000", "--out", "s/"], "more images than one run",
         leaves=lambda f: ["s"] if (f / "s").exists() else []),
    Case("--scale 100000", lambda f: ["sample", *DIGITS, "-n", "4", "--scale", "100000"], "--scale", code=2),
    Case("a failed sample leaves no folder it made", lambda f: ["sample", "--model", "no-such-model", "--out", "a/b/c/"],
         "unknown model", leaves=lambda f: ["a"] if (f / "a").exists() else []),
    Case("a FIFO as --model", lambda f: (__import__("os").mkfifo(f / "fifo.safetensors"),
                                        ["sample", "--model", "fifo.safetensors", "-n", "1"])[-1], "not a regular file"),
    Case("train on unreadable data writes no run folder", lambda f: ((f / "data").mkdir(), (f / "data" / "x.png").write_bytes(b"nope"),
                                                                     ["train", "data", "--out", "run", *TRAIN])[-1],
         "could be read as an image", leaves=lambda f: ["run"] if (f / "run").exists() else []),
]


# --------------------------------------------------------------------------------------------
# Round 5: one case per rule.

def fifo(folder: Path, name: str) -> str:
    import os

    os.mkfifo(folder / name)
    return name


def deep_json(folder: Path, name: str, depth: int = 200_000) -> str:
    (folder / name).write_text("[" * depth + "]" * depth)
    return name


def pipeline_folder(folder: Path, scheduler_link: str | None = None, index: str | None = None,
                     unet_class: str = "UNet2DModel") -> str:
    """The tiny UNet as a diffusers pipeline folder (model_index.json, unet/, scheduler/), with its
    scheduler config a link to `scheduler_link`, its model_index.json's text `index`, its UNet class."""
    from ddimctl.models.diffusers_format import diffusers_config
    from ddimctl.models.unet import PRESETS, UNet

    torch.manual_seed(0)
    (folder / "pipe" / "unet").mkdir(parents=True)
    (folder / "pipe" / "scheduler").mkdir()
    save_file(UNet(PRESETS["tiny"]).state_dict(), str(folder / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"))
    config = {**diffusers_config(PRESETS["tiny"]), "_class_name": unet_class}
    (folder / "pipe" / "unet" / "config.json").write_text(json.dumps(config))
    (folder / "pipe" / "model_index.json").write_text(index if index is not None else json.dumps(
        {"_class_name": "DDIMPipeline", "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "DDIMScheduler"]}))
    scheduler = folder / "pipe" / "scheduler" / "scheduler_config.json"
    if scheduler_link:
        scheduler.symlink_to(scheduler_link)
    else:
        scheduler.write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    return "pipe"


def held_by_another_process(path: str) -> str:
    """A prelude: another ddimctl process (as it holds a folder: an flock on it) writing into `path`."""
    return (f"import fcntl, os\nos.makedirs({path!r}, exist_ok=True)\n_held = os.open({path!r}, os.O_RDONLY)\n"
            f"fcntl.flock(_held, fcntl.LOCK_EX)\nimport sys; sys.argv[0] = 'ddimctl'\n")


def users_ledger(folder: Path) -> list[str]:
    (folder / "s").mkdir()
    (folder / "s" / ".ddimctl-files").write_bytes(USERS_BYTES)
    return ["sample", *DIGITS, "-n", "2", "--steps", "2", "--out", "s/"]


def other_architecture_checkpoint(folder: Path) -> list[str]:
    """A run whose newest checkpoint holds another UNet's tensors (as a hand copy might leave it)."""
    from ddimctl.models.unet import PRESETS, UNet

    trained_run(folder, steps=2)
    newest = sorted((folder / "run" / "checkpoints").glob("*.safetensors"))[-1]
    from safetensors import safe_open

    with safe_open(str(newest), "pt") as f:
        meta, kept = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if k.startswith("optim.")}
    other = UNet(PRESETS["tiny"]).state_dict()  # 3 channels: the run's UNet has 1
    kept.update({f"{p}.{k}": v.clone() for p in ("model", "ema") for k, v in other.items()})
    save_file(kept, str(newest), metadata=meta)
    return ["train", "data", "--out", "run", *TRAIN, "--steps", "4", "--resume"]


def exported_then_linked(folder: Path) -> list[str]:
    ddimctl("export", "digits", "first", cwd=folder)
    (folder / "link").symlink_to(folder / "first")
    return ["export", "digits", "link"]


def upper_case_safetensors(folder: Path) -> list[str]:
    (folder / "TINY.SAFETENSORS").write_bytes(Path(tiny_checkpoint(folder)).read_bytes())
    (folder / "TINY.json").write_bytes((folder / "tiny.json").read_bytes())
    return ["sample", "--model", "TINY.SAFETENSORS", "-n", "2", "--steps", "2", "--out", "g.png"]


CASES += [
    # 1. every file through one reader: regular files only, up to a size and a depth
    Case("--timesteps given a FIFO", lambda f: ["sample", *DIGITS, "--sampler", "unipc", "--timesteps", fifo(f, "t.json")],
         "is a FIFO, not a file ddimctl can read"),
    Case("--skip given a tuned file nested 200,000 levels deep",
         lambda f: ["sample", *DIGITS, "--sampler", "unipc", "--skip", deep_json(f, "t.json")], "nested more than 64 levels"),
    Case("a sidecar nested 200,000 levels deep", lambda f: ["sample", "--model", sidecar(f, "[" * 200_000 + "]" * 200_000)],
         "nested more than 64 levels"),
    Case("a scheduler config linked to /dev/zero", lambda f: ["sample", "--model", pipeline_folder(f, "/dev/zero"), "-n", "1"],
         "is a device, not a file ddimctl can read"),
    # 2. a folder recognised one way: pipeline and UNet classes by name
    Case("a local LDMPipeline folder", lambda f: ["sample", "--model", pipeline_folder(f, index=json.dumps(
        {"_class_name": "LDMPipeline", "unet": ["diffusers", "UNet2DModel"], "vqvae": ["diffusers", "VQModel"],
         "scheduler": ["diffusers", "DDIMScheduler"]})), "-n", "1"], "a LDMPipeline is not a pixel-space DDPM pipeline"),
    Case("a model_index.json that is not JSON", lambda f: ["sample", "--model", pipeline_folder(f, index="{oops"), "-n", "1"],
         "not valid JSON"),
    Case("a UNet2DConditionModel in unet/", lambda f: ["sample", "--model", pipeline_folder(f, unet_class="UNet2DConditionModel"),
                                                        "-n", "1"], "a UNet2DConditionModel is not a pixel-space UNet2DModel"),
    # 4. one writer per folder, every refusal before the work
    Case("a sample folder another process is writing", lambda f: ["sample", *DIGITS, "-n", "2", "--steps", "2", "--out", "s/"],
         "is being written by another ddimctl process", python=held_by_another_process("s"),
         leaves=lambda f: [p.name for p in (f / "s").iterdir()]),
    Case("a user's .ddimctl-files in a fresh output folder", users_ledger, ".ddimctl-files is not ddimctl's",
         leaves=lambda f: users_files_untouched(["s/.ddimctl-files"])(f) + [p.name for p in (f / "s").glob("*.png")]),
    # 5. messages that name the right thing
    Case("train --resume --prediction v into a folder with no run", lambda f: (gray_pngs(f), [
        "train", "data", "--out", "new", *TRAIN, "--steps", "1", "--prediction", "v", "--resume"])[-1], "done in", code=0),
    Case("latents inverted with classes decoded by an unconditional model", lambda f: (save_file(
        {"latents": torch.zeros(1, 1, 16, 16)}, str(f / "z.safetensors"),
        metadata={"model": "digits", "steps": "2", "classes": "[5]"}), ["sample", "--latents", "z.safetensors", *DIGITS])[-1],
         "were inverted with class labels (5)"),
    Case("--model with an empty @revision", lambda f: ["sample", "--model", "acme/pipe@"], "nothing follows '@'"),
    # 6. what the earlier rounds still found
    Case("resuming from a checkpoint of another architecture", other_architecture_checkpoint,
         "holds weights of another architecture"),
    Case("1-D latents holding NaN", lambda f: ["sample", "--latents", latents(f, torch.tensor([float("nan"), 1.0])), *DIGITS],
         "does not fit this model"),
    Case("sample --batch-size 200000", lambda f: ["sample", *DIGITS, "-n", "200000", "--batch-size", "200000", "--out", "s/"],
         "needs about", leaves=lambda f: ["s"] if (f / "s").exists() else []),
    Case("train --batch-size 1000000", lambda f: (gray_pngs(f), ["train", "data", "--out", "run", *TRAIN,
                                                                "--batch-size", "1000000"])[-1], "needs about",
         leaves=no_run_folder("run")),
    Case("a sidecar schedule without train_steps", lambda f: ["sample", "--model", sidecar(
        f, '{"unet": {}, "schedule": {"kind": "linear"}}')], "field 'train_steps'"),
    Case("export to a link to an earlier export", exported_then_linked, "is a link",
         leaves=lambda f: temporaries(f) + [p.name for p in f.glob(".link*")]),
    Case("a safetensors file named .SAFETENSORS", upper_case_safetensors, "wrote 2 images", code=0),
    Case("TORCHINDUCTOR_CACHE_DIR is a file", lambda f: ((f / "cache-file").write_text("x"), [
        "sample", *DIGITS, "-n", "1", "--steps", "1", "--compile", "--out", "g.png"])[-1], "is a file, not a folder",
         env=None),
]
for case in CASES:
    if case.name == "TORCHINDUCTOR_CACHE_DIR is a file":
        case.env = {"TORCHINDUCTOR_CACHE_DIR": "cache-file"}
