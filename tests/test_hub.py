"""Hub downloads against a loopback server speaking the resolve protocol: no test touches the internet."""

import hashlib
import io

import pytest
import torch
from conftest import random_unet
from helpers import ddimctl
from hub_server import FakeHub
from safetensors.torch import save

from ddimctl.models import families, loading, registry
from ddimctl.errors import DdimctlError

REPO = "test-org/ddpm-tiny"


def entry(file="diffusion_pytorch_model.safetensors", sha256="", repo=REPO, name="tiny-hub") -> registry.ModelEntry:
    return registry.ModelEntry(
        name=name,
        description="test",
        architecture="tiny",
        resolution=16,
        schedule=dict(families.DEFAULT_SCHEDULE),
        skip="uniform",
        license="MIT",
        repo=repo,
        file=file,
        sha256=sha256,
    )


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("DDIMCTL_CACHE", str(tmp_path / "ddimctl-cache"))
    model = random_unet("tiny")
    content = save(model.state_dict())
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    with FakeHub() as server:
        server.add(REPO, "diffusion_pytorch_model.safetensors", content)
        server.add(REPO, "diffusion_pytorch_model.bin", buffer.getvalue())
        server.model = model
        server.sha = {
            "diffusion_pytorch_model.safetensors": hashlib.sha256(content).hexdigest(),
            "diffusion_pytorch_model.bin": hashlib.sha256(buffer.getvalue()).hexdigest(),
        }
        yield server


def same_weights(a, b) -> bool:
    return all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_first_download_then_cache_hit(hub, tmp_path):
    cache = str(tmp_path / "hf")
    e = entry(sha256=hub.sha["diffusion_pytorch_model.safetensors"])
    assert not loading.is_cached(e, cache)
    loaded = loading.load_registered(e, hub_cache=cache, endpoint=hub.endpoint)
    assert same_weights(loaded.unet, hub.model)
    gets = [r for r in hub.requests if r[0] == "GET"]
    assert len(gets) == 1
    assert loading.is_cached(e, cache)
    assert list((tmp_path / "hf").glob("models--test-org--ddpm-tiny/blobs/*"))

    # Second run: no file transfer (at most a HEAD to check for a newer revision).
    loading.load_registered(e, hub_cache=cache, endpoint=hub.endpoint)
    assert len([r for r in hub.requests if r[0] == "GET"]) == 1


def test_pickle_is_verified_then_converted_once_to_safetensors(hub, tmp_path):
    cache = str(tmp_path / "hf")
    e = entry(file="diffusion_pytorch_model.bin", sha256=hub.sha["diffusion_pytorch_model.bin"])
    loaded = loading.load_registered(e, hub_cache=cache, endpoint=hub.endpoint)
    assert same_weights(loaded.unet, hub.model)
    converted = loading.converted_path(e, e.sha256)
    assert converted.is_file() and converted.suffix == ".safetensors"
    # Later runs read the safetensors without asking the Hub at all.
    count = len(hub.requests)
    again = loading.load_registered(e, hub_cache=cache, endpoint="http://127.0.0.1:9")
    assert same_weights(again.unet, hub.model)
    assert len(hub.requests) == count
    # A conversion cut short (a crash, a full disk) is removed and redone from the verified download.
    converted.write_bytes(converted.read_bytes()[:100])
    heard = []
    redone = loading.load_registered(e, hub_cache=cache, endpoint=hub.endpoint, notify=heard.append)
    assert same_weights(redone.unet, hub.model) and "damaged conversion" in heard[0]
    assert loading.load_registered(e, hub_cache=cache, endpoint=hub.endpoint).weights_sha256 == e.sha256


def test_sha256_mismatch_deletes_the_file_and_says_so(hub, tmp_path):
    cache = tmp_path / "hf"
    e = entry(sha256="0" * 64)
    with pytest.raises(DdimctlError, match=r"sha256 .* expected 0000.*deleted") as info:
        loading.load_registered(e, hub_cache=str(cache), endpoint=hub.endpoint)
    assert "tiny-hub" in str(info.value) and "\n" not in str(info.value)
    assert not [p for p in cache.rglob("*") if p.is_file() and "blobs" in p.parts]
    assert not loading.is_cached(e, str(cache))


def test_missing_file_and_unknown_repo(hub, tmp_path):
    with pytest.raises(DdimctlError, match="has no file 'nope.safetensors'"):
        loading.load_registered(entry(file="nope.safetensors"), hub_cache=str(tmp_path), endpoint=hub.endpoint)
    with pytest.raises(DdimctlError, match="repository test-org/missing was not found"):
        loading.load_registered(entry(repo="test-org/missing"), hub_cache=str(tmp_path), endpoint=hub.endpoint)


def test_unreachable_endpoint_fails_after_one_attempt(tmp_path):
    """A host that refuses connections: one attempt, one line (huggingface_hub alone retries it
    five times with backoff, half a minute)."""
    import time

    started = time.perf_counter()
    with pytest.raises(DdimctlError, match="not in the Hub cache and the Hub at 127.0.0.1:9 refused or dropped the connection"):
        loading.load_registered(entry(), hub_cache=str(tmp_path), endpoint="http://127.0.0.1:9")
    assert time.perf_counter() - started < 5


def test_a_hub_that_never_answers_is_given_up_in_bounded_time(tmp_path, monkeypatch):
    import socket
    import threading
    import time

    from huggingface_hub import constants

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []
    threading.Thread(target=lambda: [accepted.append(listener.accept()) for _ in range(8)], daemon=True).start()
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    started = time.perf_counter()
    with pytest.raises(DdimctlError, match=r"did not answer within 1 s \(HF_HUB_ETAG_TIMEOUT\)"):
        loading.load_registered(entry(), hub_cache=str(tmp_path), endpoint=f"http://127.0.0.1:{listener.getsockname()[1]}")
    assert time.perf_counter() - started < 10
    listener.close()


def test_a_host_that_does_not_resolve_fails_at_once_or_uses_the_cache(hub, tmp_path, capsys):
    """No retries against a name with no DNS answer: the error names it, and a cached file is used."""
    nowhere = "http://ddimctl-test.invalid"
    with pytest.raises(DdimctlError, match="host name does not resolve"):
        loading.load_registered(entry(), hub_cache=str(tmp_path), endpoint=nowhere)
    assert "Retrying" not in capsys.readouterr().err
    e = entry(sha256=hub.sha["diffusion_pytorch_model.safetensors"])
    loading.load_registered(e, hub_cache=str(tmp_path), endpoint=hub.endpoint)  # now cached
    assert same_weights(loading.load_registered(e, hub_cache=str(tmp_path), endpoint=nowhere).unet, hub.model)


def test_unknown_sha_is_reported_with_the_hash(hub, tmp_path):
    heard = []
    loading.load_registered(entry(), hub_cache=str(tmp_path), endpoint=hub.endpoint, notify=heard.append)
    assert len(heard) == 1 and hub.sha["diffusion_pytorch_model.safetensors"] in heard[0] and "not verified" in heard[0]


def test_a_poisoned_cache_link_to_a_users_file_never_touches_that_file(hub, tmp_path):
    """A snapshot entry that links out of the cache (to a user's file) fails the hash check: the link
    goes, the user's file stays as it was."""
    cache = tmp_path / "hf"
    e = entry(sha256=hub.sha["diffusion_pytorch_model.safetensors"])
    loading.load_registered(e, hub_cache=str(cache), endpoint=hub.endpoint)
    snapshot = next(cache.glob("models--test-org--ddpm-tiny/snapshots/*/diffusion_pytorch_model.safetensors"))
    precious = tmp_path / "thesis.txt"
    precious.write_text("years of work")
    snapshot.unlink()
    snapshot.symlink_to(precious)
    with pytest.raises(DdimctlError, match="sha256 .* deleted"):
        loading.load_registered(e, hub_cache=str(cache), endpoint="http://127.0.0.1:9")
    assert precious.read_text() == "years of work"
    assert not snapshot.exists() and not snapshot.is_symlink()


def test_a_corrupt_download_without_a_recorded_hash_is_removed(hub, tmp_path):
    """With no sha256 to check, a download that cannot be parsed is deleted, so the rerun the error
    asks for fetches it again instead of failing on the same bytes."""
    cache = tmp_path / "hf"
    hub.add(REPO, "broken.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(DdimctlError, match="cannot be read .* deleted from the cache, run the command again"):
        loading.load_registered(entry(file="broken.safetensors"), hub_cache=str(cache), endpoint=hub.endpoint)
    assert not [p for p in cache.rglob("*") if p.is_file() and "blobs" in p.parts]
    assert not loading.is_cached(entry(file="broken.safetensors"), str(cache))


@pytest.mark.parametrize("field, value, message", [
    ("revision", "../../../../escaped", "is not a branch, tag or commit name"),
    ("revision", "main/../../x", "is not a branch, tag or commit name"),
    ("file", "../outside.safetensors", "must be a path inside the repository"),
    ("file", "/etc/passwd", "must be a path inside the repository"),
    ("repo", "../../etc", "is not a Hub repository id"),
    ("name", "../evil", "a model name is letters, digits"),
    ("sha256", "abc", "sha256 must be 64 hexadecimal digits"),
])
def test_registry_fields_that_become_paths_cannot_leave_their_root(hub, tmp_path, field, value, message):
    fields = {"description": "x", "architecture": "tiny", "resolution": 16, "skip": "uniform", "license": "MIT",
              "repo": REPO, "file": "diffusion_pytorch_model.safetensors"}
    name = value if field == "name" else "tiny-hub"
    if field != "name":
        fields[field] = value
    with pytest.raises(DdimctlError, match=message):
        registry.check_entry(name, fields)
    assert not (tmp_path.parent / "escaped").exists()


def test_a_registry_name_with_a_path_never_reaches_the_cache(tmp_path, monkeypatch):
    """Even an entry built past the registry's checks gets no cache path outside the cache."""
    monkeypatch.setenv("DDIMCTL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DdimctlError, match="no safe cache path"):
        loading.converted_path(entry(name="../../outside"), "a" * 64)


def run_cli(args, env_extra, cwd):
    return ddimctl(*args, cwd=cwd, env=env_extra, check=False, offline=False)


def test_cli_honours_hf_env_and_offline_mode(hub, tmp_path):
    registry = tmp_path / "extra.toml"
    registry.write_text(
        "[models.tiny-hub]\n"
        f'description = "test"\nrepo = "{REPO}"\nrevision = "main"\n'
        'file = "diffusion_pytorch_model.safetensors"\n'
        f'sha256 = "{hub.sha["diffusion_pytorch_model.safetensors"]}"\n'
        'architecture = "tiny"\nresolution = 16\nschedule = "ddpm-linear"\nskip = "uniform"\nlicense = "MIT"\n'
    )
    env = {
        "DDIMCTL_REGISTRY": str(registry),
        "DDIMCTL_CACHE": str(tmp_path / "dc"),
        "HF_HUB_CACHE": str(tmp_path / "hf"),
        "HF_ENDPOINT": hub.endpoint,
    }
    offline = run_cli(["sample", "--model", "tiny-hub", "-n", "2", "--steps", "3"], {**env, "HF_HUB_OFFLINE": "1"}, tmp_path)
    assert offline.returncode == 1
    assert offline.stderr.strip().splitlines()[-1].startswith("error: model 'tiny-hub'")
    assert "offline mode is on" in offline.stderr and "Traceback" not in offline.stderr

    online = run_cli(["sample", "--model", "tiny-hub", "-n", "2", "--steps", "3", "--out", "a.png"], env, tmp_path)
    assert online.returncode == 0, online.stderr
    assert (tmp_path / "a.png").is_file()
    assert list((tmp_path / "hf").glob("models--test-org--ddpm-tiny/snapshots/*/*.safetensors"))

    # Now cached: works offline, and `models` says so.
    cached = run_cli(["sample", "--model", "tiny-hub", "-n", "2", "--steps", "3", "--out", "b.png"], {**env, "HF_HUB_OFFLINE": "1"}, tmp_path)
    assert cached.returncode == 0, cached.stderr
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    listed = run_cli(["models"], env, tmp_path)
    assert "yes" in listed.stdout.split("tiny-hub")[1].splitlines()[0]


@pytest.mark.parametrize("fault, message", [
    ("truncate", "download of test-org/ddpm-tiny@main/diffusion_pytorch_model.safetensors failed"),
    ("redirect-loop", "could not be asked \\(Exceeded 20 redirects"),
    ("stall-get", "failed"),
])
def test_a_misbehaving_hub_is_one_line_and_leaves_no_file(hub, tmp_path, monkeypatch, fault, message):
    """A body cut short, a redirect loop, a GET that never sends: one line, bounded time, nothing cached."""
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    hub.faults[(REPO, "diffusion_pytorch_model.safetensors")] = fault
    cache = tmp_path / "hf"
    started = time.perf_counter()
    with pytest.raises(DdimctlError, match=message) as info:
        loading.load_registered(entry(sha256=hub.sha["diffusion_pytorch_model.safetensors"]), hub_cache=str(cache),
                                endpoint=hub.endpoint)
    assert "\n" not in str(info.value) and "tiny-hub" in str(info.value)
    assert time.perf_counter() - started < 40
    assert not [p for p in cache.rglob("*") if p.is_file() and "blobs" in p.parts and not p.name.endswith(".incomplete")]


def serve_pipeline(server: FakeHub, repo: str, folder) -> None:
    """Every file of a local folder, under its relative name, as a Hub repository."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            server.add(repo, str(path.relative_to(folder)), path.read_bytes())


def test_any_hub_repo_in_diffusers_format(hub, tmp_path):
    """--model OWNER/REPO: a pipeline repository (model_index.json, unet/, scheduler/) and a bare
    UNet repository, not in the registry, downloaded into the Hub cache and checked against the
    sha256 the Hub reports; then loaded again from the cache alone (offline)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(beta_end=0.012)).save_pretrained(tmp_path / "pipe")
    serve_pipeline(hub, "someone/butterflies", tmp_path / "pipe")
    serve_pipeline(hub, "someone/bare-unet", tmp_path / "pipe" / "unet")
    cache = str(tmp_path / "hf")
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([321])
    for spec, beta_end in (("someone/butterflies", 0.012), ("someone/bare-unet@main", 0.02)):
        loaded = loading.load_model(spec, hub_cache=cache, endpoint=hub.endpoint)
        assert loaded.schedule["beta_end"] == beta_end and loaded.config.head_channels == 8
        with torch.no_grad():
            assert torch.allclose(loaded.unet(x, t), unet(x, t).sample, atol=1e-5)
        assert loaded.weights_sha256 == hashlib.sha256(
            (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    asked = len(hub.requests)
    from huggingface_hub import constants

    old, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:  # offline, from the cache: no request at all
        assert loading.load_model("someone/butterflies", hub_cache=cache, endpoint=hub.endpoint).schedule["beta_end"] == 0.012
    finally:
        constants.HF_HUB_OFFLINE = old
    assert len(hub.requests) == asked
    # `ddimctl models` lists them from the cache alone
    assert loading.cached_hub_repos(cache) == [("someone/bare-unet", "main", "UNet"), ("someone/butterflies", "main", "pipeline")]
    listed = ddimctl("models", env={"HF_HUB_CACHE": cache})
    assert "someone/butterflies" in listed.stdout and "someone/bare-unet" in listed.stdout
    assert len(hub.requests) == asked


def test_a_hub_repo_whose_weights_do_not_match_the_reported_sha256_is_refused(hub, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    diffusers.UNet2DModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                          down_block_types=("DownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "UpBlock2D")).save_pretrained(tmp_path / "unet")
    serve_pipeline(hub, "someone/tampered", tmp_path / "unet")
    hub.faults[("someone/tampered", "diffusion_pytorch_model.safetensors")] = "wrong-etag"
    with pytest.raises(DdimctlError, match="the Hub reported .*; the corrupt download was deleted"):
        loading.load_model("someone/tampered", hub_cache=str(tmp_path / "hf"), endpoint=hub.endpoint)
    assert not list((tmp_path / "hf").rglob("diffusion_pytorch_model.safetensors"))
    with pytest.raises(DdimctlError, match="repository nobody/nothing was not found on the Hub; check --model"):
        loading.load_model("nobody/nothing", hub_cache=str(tmp_path / "hf"), endpoint=hub.endpoint)
