"""sampling/runners.py and sample_folders.py: the pieces between a loaded model and ddim.py, without the command line."""

import json
from types import SimpleNamespace

import pytest
import torch

from ddimctl.sampling import sample_folders, samplers, runners
from ddimctl.errors import DdimctlError


def test_edit_strength_maps_to_a_number_of_steps():
    assert [runners.edit_steps(f, 50) for f in (0, 0.2, 0.5, 1)] == [0, 10, 25, 50]
    with pytest.raises(DdimctlError, match="between 0 and 1"):
        runners.edit_steps(1.2, 50)


def test_non_finite_rows_are_named_and_never_pass():
    x = torch.zeros(4, 1, 2, 2)
    assert runners.check_finite([10, 11, 12, 13], x) is x
    x[2, 0, 1, 1] = float("nan")
    x[3, 0, 0, 0] = float("inf")
    with pytest.raises(DdimctlError, match=r"2 image\(s\) came out NaN or infinite \(number 12, 13\)"):
        runners.check_finite([10, 11, 12, 13], x)


DIGITS = SimpleNamespace(name="digits", source="bundled", weights_sha256="ab" * 32)  # what a record names of a model


def test_a_sample_folder_refuses_a_run_with_other_settings(tmp_path):
    record = sample_folders.run_record(DIGITS, samplers.Settings(steps=20, skip="uniform"), 1, None, "fp32", 1)
    sample_folders.claim_folder(tmp_path, record, 4)
    sample_folders.claim_folder(tmp_path, record, 4)  # the same run again: fine
    assert json.loads((tmp_path / sample_folders.FOLDER_RECORD).read_text())["steps"] == 20
    with pytest.raises(DdimctlError, match=r"other settings \(steps 20 \(now 50\), seed 1 \(now 2\)\)"):
        sample_folders.claim_folder(tmp_path, {**record, "steps": 50, "seed": 2}, 4)
    other = sample_folders.run_record(DIGITS, samplers.Settings("dpm++2m", 20, "uniform"), 1, None, "fp32", 1)
    with pytest.raises(DdimctlError, match=r"other settings \(sampler ddim \(now dpm\+\+2m\)\)"):
        sample_folders.claim_folder(tmp_path, other, 4)


def test_a_record_names_the_models_and_the_latents_content(tmp_path):
    """A newer checkpoint at the same path, or other latents at the same path, are another run."""
    latents = tmp_path / "z.safetensors"
    latents.write_bytes(b"first latents")
    (tmp_path / "out").mkdir()
    record = sample_folders.run_record(DIGITS, samplers.Settings(steps=20, skip="uniform"), 1, latents, "fp32", 1)
    sample_folders.claim_folder(tmp_path / "out", record, 4)
    newer = SimpleNamespace(name="digits", source="bundled", weights_sha256="cd" * 32)
    with pytest.raises(DdimctlError, match=r"weights_sha256 abababababab \(now cdcdcdcdcdcd\)"):
        sample_folders.claim_folder(tmp_path / "out", sample_folders.run_record(newer, samplers.Settings(steps=20, skip="uniform"),
                                                                  1, latents, "fp32", 1), 4)
    latents.write_bytes(b"other latents, same path")
    with pytest.raises(DdimctlError, match="latents_sha256"):
        sample_folders.claim_folder(tmp_path / "out", sample_folders.run_record(DIGITS, samplers.Settings(steps=20, skip="uniform"),
                                                                  1, latents, "fp32", 1), 4)


@pytest.mark.parametrize("content", ["[1, 2]", "\xff\xfe not utf-8", "{not json", '{"steps": 20}'])
def test_a_damaged_or_foreign_record_is_refused(tmp_path, content):
    """Whatever it holds, a record ddimctl did not write (or that changed since) is not its own;
    records of versions before the ledger are refused the same way."""
    (tmp_path / sample_folders.FOLDER_RECORD).write_bytes(content.encode("latin-1"))
    record = sample_folders.run_record(DIGITS, samplers.Settings(steps=20, skip="uniform"), 1, None, "fp32", 1)
    with pytest.raises(DdimctlError, match="not a record ddimctl wrote"):
        sample_folders.claim_folder(tmp_path, record, 4)


def test_a_folder_of_someone_elses_images_is_never_adopted(tmp_path):
    """Files of the names this run would write that ddimctl did not write: refused, with or without
    a record of ddimctl's, and nothing is written."""
    (tmp_path / "000002.png").write_bytes(b"a user's photo")
    record = sample_folders.run_record(DIGITS, samplers.Settings(steps=20, skip="uniform"), 1, None, "fp32", 1)
    with pytest.raises(DdimctlError, match=r"holds 1 file\(s\) named like this run's images that ddimctl did not write \(000002.png\)"):
        sample_folders.claim_folder(tmp_path, record, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000002.png"]
    sample_folders.claim_folder(tmp_path, record, 2)  # a run of 2 images writes only 000000 and 000001
    with pytest.raises(DdimctlError, match=r"\(000002.png\)"):  # the folder has a record now: still refused
        sample_folders.claim_folder(tmp_path, record, 4)
    assert (tmp_path / "000002.png").read_bytes() == b"a user's photo"


def test_aligned_batches_are_the_runs_own():
    assert runners.aligned_batches([4, 1], 2, 5) == [[0, 1], [4]]
    assert runners.aligned_batches([2, 3, 9], 4, 10) == [[0, 1, 2, 3], [8, 9]]
    assert runners.aligned_batches([], 4, 10) == []


def test_interpolation_latents_start_and_end_on_the_ends():
    ends = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    z = runners.interpolation_latents(ends, [0.0, 0.5, 1.0])
    torch.testing.assert_close(z[0], ends[0])
    torch.testing.assert_close(z[2], ends[1])


def test_folder_images_are_numbered_with_at_least_six_digits(tmp_path):
    assert sample_folders.image_names(tmp_path, 3)(2) == tmp_path / "000002.png"
    assert sample_folders.image_names(tmp_path, 10**7)(5) == tmp_path / "0000005.png"


def test_interpolation_alphas_include_both_ends():
    assert runners.interpolation_alphas(2) == [0.0, 1.0]
    assert runners.interpolation_alphas(5) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


def test_any_subset_of_a_run_is_computed_in_the_runs_own_batches():
    """An eps model whose output depends on the batch it is called with (as batch-dependent kernel
    rounding does, here exaggerated): images asked for alone, in a different order or as a
    process's share still come out exactly as in the straight run."""
    from ddimctl.sampling import samplers
    from ddimctl.models import loading

    model = loading.load_model("digits")

    def batch_sensitive(x, t):  # the batch's size and each row's position leak into the result
        position = torch.arange(x.shape[0], dtype=x.dtype).view(-1, 1, 1, 1)
        return model.unet(x, t) + 1e-3 * (x.shape[0] + position)

    sampler = runners.Runner.create(model, samplers.Settings(steps=3, eta=1.0), torch.device("cpu"),
                                      eps_model=batch_sensitive)
    straight = dict(zip(range(7), torch.cat([x for _, x in sampler.sample_indices(list(range(7)), 0, 3)])))
    for subset in ([6, 2], [5], [1, 3, 5], [4, 0, 6]):
        got = {i: x for idx, xs in sampler.sample_indices(subset, 0, 3, count=7) for i, x in zip(idx, xs)}
        assert sorted(got) == sorted(subset)
        assert all(torch.equal(got[i], straight[i]) for i in subset), subset


def test_a_folder_is_filled_by_its_plans_batches(tmp_path):
    """The plan is what runs: the batches a folder plan holds are the ones computed (and what the
    progress total counts), not batches worked out again from its to-do list."""
    from ddimctl.models import loading
    from ddimctl.distributed import World

    model = loading.load_model("digits")
    calls = []
    runner = runners.Runner.create(model, samplers.Settings(steps=2), torch.device("cpu"),
                                    eps_model=lambda x, t: calls.append(x.shape[0]) or model.unet(x, t))
    plan = sample_folders.plan_folder(tmp_path, 6, 2, World())
    assert plan.batches == [[0, 1], [2, 3], [4, 5]] and plan.computed == 6
    plan.batches = plan.batches[1:2]  # this process's share, as another process count would give it
    plan.todo = [2, 3]
    sample_folders.fill_folder(runner, plan, 0, World())
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["000002.png", "000003.png"]
    assert calls == [2, 2]  # one batch of 2, two steps


@pytest.mark.parametrize("settings", [samplers.Settings("ddim", 6, eta=1.0), *[samplers.Settings(name, 6) for name in samplers.SAMPLERS]],
                         ids=lambda s: s.label())
def test_every_sampler_gives_each_image_the_same_numbers_in_any_batch(settings):
    """With a network that treats each row on its own (no batch-dependent kernels), image i comes out
    bit for bit the same in batches of 7, 3 and 1: no sampler mixes rows or draws noise by batch."""
    from ddimctl.models import loading

    model = loading.load_model("digits")

    def row_wise(x, t):
        return 0.5 * x + 1e-3 * t.to(x.dtype).view(-1, 1, 1, 1)

    sampler = runners.Runner.create(model, settings, torch.device("cpu"), eps_model=row_wise)
    runs = [torch.cat([x for _, x in sampler.sample_indices(list(range(7)), 0, batch)]) for batch in (7, 3, 1)]
    assert torch.isfinite(runs[0]).all() and runs[0].abs().max() > 0.1
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_half_precision_is_kept_from_samplers_whose_images_it_would_grain():
    """Adams-Bashforth in the noise (plms, ipndm) on the uniform grid below 20 calls runs its network in
    fp32 whatever precision is asked for (bf16 there raised the neighbour contrast of 128 digits by 6-15%;
    README, Precision); every other case keeps the precision asked for."""
    cpu = torch.device("cpu")

    def precision(sampler, steps, skip, asked="bf16"):
        return runners.run_precision(asked, cpu, samplers.Settings(sampler, steps, skip))

    assert precision("plms", 10, "uniform") == "fp32" and precision("ipndm", 19, "uniform") == "fp32"
    assert precision("plms", 20, "uniform") == "bf16" and precision("plms", 10, "quad") == "bf16"
    assert precision("ddim", 10, "uniform") == "bf16" and precision("unipc", 5, "uniform") == "bf16"
    assert precision("plms", 10, "uniform", "auto") == "fp32" and precision("ddim", 10, "uniform", "auto") == "fp32"
    with pytest.raises(DdimctlError, match="needs a CUDA GPU"):
        precision("plms", 10, "uniform", "fp16")  # refused on the CPU before any rule of the samplers
