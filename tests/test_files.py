"""files.py: atomic writes that leave nothing behind, byte-identical reruns, and only ddimctl's own
temporaries ever cleaned."""

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ddimctl.io.files import LEDGER, atomic_save_safetensors


def test_the_same_tensors_and_metadata_give_the_same_bytes(tmp_path):
    """safetensors writes metadata in hash order, different on every save; ddimctl sorts it."""
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(2)}
    metadata = {f"key{i}": f"value {i} \u00e9" for i in range(12)}
    paths = [tmp_path / f"{i}.safetensors" for i in range(6)]
    for path in paths:
        atomic_save_safetensors(tensors, path, metadata)
    assert len({p.read_bytes() for p in paths}) == 1
    with safe_open(str(paths[0]), "pt") as f:
        assert f.metadata() == metadata
    assert all(torch.equal(v, load_file(str(paths[0]))[k]) for k, v in tensors.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LEDGER, *(p.name for p in paths)])  # no temporaries left


def dead_pid() -> int:
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def test_only_ddimctls_own_temporaries_of_gone_processes_are_removed(tmp_path):
    import os

    from ddimctl.io.files import atomic_path, remove_stale_temporaries

    pid = dead_pid()
    mine = tmp_path / f".latents.safetensors.ddimctl-{pid}-abcd1234.tmp"
    live = tmp_path / f".latents.safetensors.ddimctl-{os.getpid()}-abcd1234.tmp"
    users = [tmp_path / name for name in (
        ".photos.2024.old.tmp",  # a user's file that merely looks like a temporary
        ".x.20240101123456.part.tmp",  # a huge "process id": no crash, and not ours
        f".latents.safetensors.{pid}.abcd1234.tmp",  # the old pattern, which a user's file can match
        f".other.png.ddimctl-{pid}-abcd12.tmp",  # not exactly our form
    )]
    for path in [mine, live, *users]:
        path.write_bytes(b"x")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.txt"
    outside.write_text("a user's file")
    link = tmp_path / f".a.png.ddimctl-{pid}-abcd1234.tmp"
    link.symlink_to(outside)  # a link named like ours: never followed, never removed
    with atomic_path(tmp_path / "latents.safetensors") as tmp:  # a rerun of the write cleans its own target
        tmp.write_bytes(b"new")
    assert not mine.exists() and live.exists() and all(p.exists() for p in users)
    assert remove_stale_temporaries(tmp_path) == 0 and link.is_symlink() and outside.read_text() == "a user's file"
    assert (tmp_path / "latents.safetensors").read_bytes() == b"new"


def test_a_file_written_alone_carries_its_own_mark_and_leaves_no_ledger(tmp_path):
    """A grid, a single edited image and a latents file hold the digest of their content (a PNG text
    chunk, safetensors metadata): a rerun replaces ddimctl's own file, a user's file of the name is
    refused, and so is ddimctl's once changed; no ledger is left beside them. A folder of samples keeps
    its ledger."""
    from helpers import ddimctl
    from PIL import Image

    grid = ["sample", "--model", "digits", "-n", "4", "--steps", "2", "--out", "grid.png"]
    ddimctl(*grid, cwd=tmp_path)
    ddimctl("invert", str(tmp_path / "grid.png"), "--model", "digits", "--steps", "2", "--out", "z.safetensors",
            cwd=tmp_path)
    assert not (tmp_path / LEDGER).exists()
    ddimctl(*grid, "--seed", "1", cwd=tmp_path)  # its own file: replaced
    Image.open(tmp_path / "grid.png").convert("L").point(lambda v: 255 - v).save(tmp_path / "grid.png")  # changed since
    changed = ddimctl(*grid, cwd=tmp_path, check=False)
    assert changed.returncode == 1 and "did not write" in changed.stderr
    (tmp_path / "z.safetensors").write_bytes(b"a user's notes")
    refused = ddimctl("invert", str(tmp_path / "grid.png"), "--model", "digits", "--steps", "2", "--out", "z.safetensors",
                      cwd=tmp_path, check=False)
    assert refused.returncode == 1 and "did not write" in refused.stderr
    assert (tmp_path / "z.safetensors").read_bytes() == b"a user's notes"
    ddimctl("sample", "--model", "digits", "-n", "2", "--steps", "2", "--out", "s/", cwd=tmp_path)
    assert (tmp_path / "s" / LEDGER).is_file()
