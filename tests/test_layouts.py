"""layouts.py and loading.py: every accepted checkpoint layout, renamed and loaded; bad files refused."""

import json
import re

import pytest
import torch
from conftest import DATA, random_unet
from helpers import diffusers_unet
from safetensors.torch import save_file

from ddimctl.models import layouts, loading
from ddimctl.models.unet import PRESETS, UNet

diffusers = pytest.importorskip("diffusers")


def original_layout(state: dict, levels: int = 4) -> dict:
    """Rename a diffusers-layout state dict to the original DDPM layout (the inverse of what
    ddimctl's loading does, written independently here with regular expressions)."""
    rules = [
        (r"^time_embedding\.linear_1\.", "temb.dense.0."),
        (r"^time_embedding\.linear_2\.", "temb.dense.1."),
        (r"^conv_norm_out\.", "norm_out."),
        (r"^mid_block\.resnets\.0\.", "mid.block_1."),
        (r"^mid_block\.resnets\.1\.", "mid.block_2."),
        (r"^mid_block\.attentions\.0\.", "mid.attn_1."),
        (r"^down_blocks\.(\d+)\.resnets\.", r"down.\1.block."),
        (r"^down_blocks\.(\d+)\.attentions\.", r"down.\1.attn."),
        (r"^down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
        (r"^up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{levels - 1 - int(m.group(1))}.block."),
        (r"^up_blocks\.(\d+)\.attentions\.", lambda m: f"up.{levels - 1 - int(m.group(1))}.attn."),
        (r"^up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{levels - 1 - int(m.group(1))}.upsample."),
        (r"\.time_emb_proj\.", ".temb_proj."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
        (r"\.group_norm\.", ".norm."),
        (r"\.to_q\.", ".q."),
        (r"\.to_k\.", ".k."),
        (r"\.to_v\.", ".v."),
        (r"\.to_out\.0\.", ".proj_out."),
    ]
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        if re.search(r"\.attn(_1|\.\d+)\.(q|k|v|proj_out)\.weight$", key):
            value = value[:, :, None, None]  # the original uses 1x1 convolutions
        out[key] = value.clone()
    return out


def test_cifar10_names_and_shapes_match_the_hub_checkpoint():
    listed = {}
    for line in (DATA / "cifar10-keys.txt").read_text().splitlines():
        name, shape = line.split("\t")
        listed[name] = json.loads(shape)
    listed = layouts.to_diffusers_names({k: torch.empty(v) for k, v in listed.items()})
    with torch.device("meta"):
        ours = {k: list(v.shape) for k, v in UNet(PRESETS["cifar10"]).state_dict().items()}
    assert ours == {k: list(v.shape) for k, v in listed.items()}


def test_original_layout_names_and_shapes_match_the_published_list():
    with torch.device("meta"):
        state = UNet(PRESETS["cifar10"]).state_dict()
    listed = {}
    for line in (DATA / "cifar10-keys-original.txt").read_text().splitlines():
        name, shape = line.split("\t")
        listed[name] = json.loads(shape)
    assert {k: list(v.shape) for k, v in original_layout(state).items()} == listed


def test_every_accepted_layout_loads_to_identical_outputs(tmp_path):
    model = random_unet("cifar10", seed=2)
    state = model.state_dict()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([5, 700])
    with torch.no_grad():
        expected = model(x, t)

    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for k, v in state.items():
        for new, old in legacy_names.items():
            k = k.replace(f".{new}.", f".{old}.")
        legacy[k] = v
    original = original_layout(state)
    assert any(k.startswith("temb.dense") for k in original)
    assert original["mid.attn_1.q.weight"].shape == (256, 256, 1, 1)

    files = {}
    save_file(state, str(tmp_path / "diffusers.safetensors"))
    files["diffusers safetensors"] = tmp_path / "diffusers.safetensors"
    save_file(legacy, str(tmp_path / "legacy.safetensors"))
    files["legacy attention names"] = tmp_path / "legacy.safetensors"
    torch.save(state, tmp_path / "model.bin")
    files["pickle .bin"] = tmp_path / "model.bin"
    torch.save(original, tmp_path / "original.pth")
    files["original layout"] = tmp_path / "original.pth"
    ema = {f"module.{k}": v for k, v in original.items()}
    junk = {f"module.{k}": torch.zeros_like(v) for k, v in original.items()}
    torch.save([junk, {"state": {}, "param_groups": []}, 12, 3400, ema], tmp_path / "ckpt.pth")
    files["DDIM authors' list checkpoint (EMA last)"] = tmp_path / "ckpt.pth"

    folder = tmp_path / "diffusers_folder"
    folder.mkdir()
    save_file(legacy, str(folder / "diffusion_pytorch_model.safetensors"))
    diffusers_unet("cifar10").save_config(folder)
    files["diffusers folder"] = folder

    for what, path in files.items():
        loaded = loading.load_model(str(path))
        assert loaded.config.resolution == 32, what
        with torch.no_grad():
            got = loaded.unet(x, t)
        assert torch.equal(got, expected), what


def test_wrong_weights_give_a_clear_error(tmp_path):
    state = random_unet("tiny").state_dict()
    del state["conv_out.bias"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    (tmp_path / "broken.json").write_text(json.dumps({"unet": PRESETS["tiny"].to_dict()}))
    with pytest.raises(loading.DdimctlError, match="do not fit"):
        loading.load_model(str(tmp_path / "broken.safetensors"))


def test_pickles_with_code_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"conv_in.weight": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(loading.DdimctlError, match="not a loadable checkpoint"):
        loading.load_model(str(tmp_path / "evil.bin"))
