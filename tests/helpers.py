"""The one way tests run the command line: `ddimctl ARGS`, in this process unless a process is the
point (torchrun, a prelude, the Hub's environment variables), always offline unless told otherwise.

In-process runs call ddimctl.cli.main exactly as the console script does, with the arguments,
working folder, environment and standard streams of the run swapped in and put back afterwards, so
a test sees the same exit code, stdout and stderr as from a subprocess, without paying ~3 s of
interpreter and torch start-up per call.
"""

import contextlib
import io
import os
import subprocess
import sys
import traceback


class Result:
    def __init__(self, args, returncode, stdout, stderr):
        self.args, self.returncode, self.stdout, self.stderr = args, returncode, stdout, stderr


def ddimctl(*args, cwd=None, check=True, env=None, torchrun=0, offline=True, prelude=None, timeout=300,
            subprocess_run=False):
    """Run `ddimctl ARGS`; `prelude` is Python run first in the same process (to register a test
    feature extractor, or to break something on purpose). subprocess_run forces a fresh process."""
    args = [str(a) for a in args]
    env = dict(env or {})
    in_subprocess = subprocess_run or torchrun or prelude or any(k.startswith("HF_") for k in env) or not offline
    result = (_subprocess(args, cwd, env, torchrun, offline, prelude, timeout) if in_subprocess
              else _in_process(args, cwd, env))
    if check and result.returncode != 0:
        raise AssertionError(f"ddimctl {' '.join(args)} failed:\n{result.stderr}")
    return result


def _subprocess(args, cwd, env, torchrun, offline, prelude, timeout):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    full_env.setdefault("OMP_NUM_THREADS", "1")  # one thread per test process: no spinning on shared cores
    if offline:
        full_env["HF_HUB_OFFLINE"] = "1"  # no test may reach for the internet (the loopback Hub tests say otherwise)
    full_env.update(env)
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", "--standalone"] if torchrun else [sys.executable]
    entry = ["-c", f"{prelude}\nfrom ddimctl.cli import main\nmain()"] if prelude else ["-m", "ddimctl"]
    return subprocess.run([*launcher, *entry, *args], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=timeout)


def _in_process(args, cwd, env):
    import torch
    from huggingface_hub import constants

    from ddimctl.models import registry
    from ddimctl.cli import main

    saved_env, saved_cwd, saved_argv, saved_offline = dict(os.environ), os.getcwd(), sys.argv, constants.HF_HUB_OFFLINE
    saved_threads = torch.get_num_threads()  # --threads sets them for the process
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        os.environ.update(env)
        constants.HF_HUB_OFFLINE = True  # read once at import by huggingface_hub: set it for this run
        for cached in (registry.registry, registry._registry_file):
            cached.cache_clear()  # a run's DDIMCTL_REGISTRY or files, not an earlier test's
        if cwd is not None:
            os.chdir(cwd)
        sys.argv = ["ddimctl", *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # what a subprocess would print before dying
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        constants.HF_HUB_OFFLINE = saved_offline
        torch.set_num_threads(saved_threads)
        for cached in (registry.registry, registry._registry_file):
            cached.cache_clear()
    return Result(["ddimctl", *args], code, out.getvalue(), err.getvalue())


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in last, last


def diffusers_unet(preset: str):
    """diffusers' UNet2DModel in the layout of one of ddimctl's presets (random weights)."""
    import diffusers

    from ddimctl.models.unet import PRESETS

    c = PRESETS[preset]
    widths = [c.base_channels * m for m in c.channel_mult]
    attn = [c.resolution >> i in c.attention_resolutions for i in range(len(widths))]
    return diffusers.UNet2DModel(
        sample_size=c.resolution,
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        block_out_channels=tuple(widths),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        layers_per_block=c.num_res_blocks,
        attention_head_dim=None,
        norm_num_groups=c.norm_groups,
        norm_eps=c.norm_eps,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
    ).eval()


def killed_after_checkpoint(step: int) -> str:
    """A prelude for ddimctl(): a real SIGKILL straight after the checkpoint of `step` is written,
    the moment a resume must survive (train and distill save through runs.save_checkpoint)."""
    return f"""
import os, signal
from ddimctl.models import runs
_save = runs.save_checkpoint
def _save_then_die(run_dir, step, *args):
    path = _save(run_dir, step, *args)
    if step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
    return path
runs.save_checkpoint = _save_then_die
"""
