"""The one way tests run the command line: `python -m ddimctl` in a subprocess, offline."""

import os
import subprocess
import sys


def ddimctl(*args, cwd=None, check=True, env=None, torchrun=0, offline=True, prelude=None, timeout=300):
    """Run `ddimctl ARGS`; `prelude` is Python run first in the same process (to register a test
    feature extractor, or to break something on purpose)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    if offline:
        full_env["HF_HUB_OFFLINE"] = "1"  # no test may reach for the internet (the loopback Hub tests say otherwise)
    full_env.update(env or {})
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", "--standalone"] if torchrun else [sys.executable]
    entry = ["-c", f"{prelude}\nfrom ddimctl.cli import main\nmain()"] if prelude else ["-m", "ddimctl"]
    result = subprocess.run(
        [*launcher, *entry, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=full_env, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"ddimctl {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result


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

    from ddimctl.unet import PRESETS

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
