"""FID through torch-fidelity (the TF-Inception features behind the paper's numbers), and the tables
of a sweep. Optional: the `eval` extra (`pip install '.[eval]'` in the ddimctl folder)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from .sampling import samplers
from .errors import DdimctlError, param
from .io.files import atomic_path
from .io.images import READ_SUFFIXES

FID_KEY = "frechet_inception_distance"
# The paper's Table 1 (CIFAR-10, quad skip, 50k samples against the training set).
PAPER_CIFAR10 = {
    "0": {10: 13.36, 20: 6.84, 50: 4.67, 100: 4.16, 1000: 4.04},
    "0.2": {10: 14.04, 20: 7.11, 50: 4.77, 100: 4.25, 1000: 4.09},
    "0.5": {10: 16.66, 20: 8.35, 50: 5.25, 100: 4.46, 1000: 4.29},
    "1": {10: 41.07, 20: 18.36, 50: 8.01, 100: 5.78, 1000: 4.73},
    "sigma-hat": {10: 367.43, 20: 133.37, 50: 32.72, 100: 9.99, 1000: 3.17},
}
def install_hint(torch_version: str | None = None) -> str:
    """The install line for the eval extra that keeps the installed torch: pip would otherwise
    replace it with whatever torch the newest torchvision was built against (a multi-GB CUDA build)."""
    version = torch_version or torch.__version__
    release, _, local = version.partition("+")
    parts = release.split(".")
    if len(parts) >= 2 and parts[0] == "2" and parts[1].isdigit():  # torchvision 0.(m + 15) pairs with torch 2.m
        patch = parts[2] if len(parts) > 2 and parts[2].isdigit() else "0"
        pair = f"torch=={release} torchvision==0.{int(parts[1]) + 15}.{patch}"
    else:
        pair = f"torch=={release} and the torchvision of the same release (pytorch.org lists the pairs)"
    index = f" from https://download.pytorch.org/whl/{local}" if local else ""
    return (f"in the ddimctl folder, pip install '.[eval]' {pair} (name both{index}, or pip replaces your torch "
            f"{version}; the README's fid section says more)")



def fidelity():
    try:
        import torch_fidelity
    except ImportError as e:
        raise DdimctlError(f"FID needs torch-fidelity, which is not importable ({e}); {install_hint()}") from e
    return torch_fidelity


INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's TF-Inception weights


def missing_inception_hint() -> str:
    """Where torch-fidelity looks for its Inception weights, for an error that names the missing piece."""
    where = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if where.is_file():
        return ("without a network, torch-fidelity cannot fetch a named reference (such as cifar10-train): "
                "pass a folder of reference images or a .npz of saved statistics")
    return (f"torch-fidelity needs its Inception weights {where}, which are not there and cannot be fetched "
            f"without a network: run once where the network is reachable, or copy that file there")


def folder_cache_name(folder: Path) -> str:
    """A name for torch-fidelity's statistics cache that changes when the folder's images change."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in READ_SUFFIXES)
    digest = hashlib.sha256(str(folder.resolve()).encode())
    for p in files:
        stat = p.stat()
        digest.update(f"{p.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"ddimctl-{digest.hexdigest()[:16]}"


def _base_kwargs(device: torch.device, batch_size: int, feature_extractor: str | None, cache_root: str | None) -> dict:
    kwargs = dict(fid=True, cuda=device.type == "cuda", batch_size=batch_size, verbose=False,
                  samples_find_deep=True, cache=True)
    if feature_extractor:
        kwargs["feature_extractor"] = feature_extractor
    if cache_root:
        kwargs["cache_root"] = cache_root
    return kwargs


def _run(fn, *args, **kwargs):
    """Call into torch-fidelity, turning its failures into one-line errors."""
    try:
        return fn(*args, **kwargs)
    except (OSError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fetching = any(word in str(e).lower() for word in ("download", "url", "http", "connection", "inception", ".pth"))
        raise DdimctlError(f"FID failed ({first})" + (f"; {missing_inception_hint()}" if fetching else "")) from e
    except (ValueError, AssertionError) as e:  # torch-fidelity's own checks (empty folder, too few images)
        raise DdimctlError(f"FID: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e


def union_folder(folders: list[Path], into: Path) -> Path:
    """A folder of links to the images of `folders` (the shards of one run, `sample --shard`): one
    image per name, so two folders holding the same name (the same run twice, or two runs) are refused."""
    union, seen = into / "union", {}
    union.mkdir()
    for folder in folders:
        if not folder.is_dir():
            raise DdimctlError(f"{folder}: no such folder of images")
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in READ_SUFFIXES):
            if path.name in seen:
                raise DdimctlError(f"{path.name} is in both {seen[path.name]} and {folder}: the folders are not shards "
                                   f"of one run; give each image once")
            seen[path.name] = folder
            (union / path.name).symlink_to(path.resolve())
    return union


def check_image_count(folder: Path) -> None:
    """A folder's features need two images at least for their covariance (one gives NaN)."""
    found = sum(1 for p in folder.rglob("*") if p.suffix.lower() in READ_SUFFIXES)
    if found < 2:
        raise DdimctlError(f"{folder} holds {found} image(s); FID compares the statistics of many images (thousands "
                           f"for a meaningful value, two at the least)")


def statistics(source: str, device: torch.device, batch_size: int = 64, feature_extractor: str | None = None,
               cache_root: str | None = None) -> dict:
    """mu and sigma of the FID features of a folder or a named data set (through torch-fidelity's own
    feature extraction; cached by it for folders and named data sets)."""
    fidelity()
    if Path(source).is_dir():
        check_image_count(Path(source))
    from torch_fidelity.metric_fid import fid_input_id_to_statistics_cached
    from torch_fidelity.utils import (
        create_feature_extractor,
        resolve_feature_extractor,
        resolve_feature_layer_for_metric,
    )

    kwargs = {**_base_kwargs(device, batch_size, feature_extractor, cache_root), "input1": source}
    if Path(source).is_dir():
        kwargs["input1_cache_name"] = folder_cache_name(Path(source))

    def compute():
        name = resolve_feature_extractor(**kwargs)
        layer = resolve_feature_layer_for_metric("fid", **kwargs)
        extractor = create_feature_extractor(name, [layer], **kwargs)
        stats = fid_input_id_to_statistics_cached(1, extractor, layer, **kwargs)
        return {"mu": stats["mu"], "sigma": stats["sigma"], "feature_extractor": name, "layer": layer}

    return _run(compute)


def save_statistics(stats: dict, path: Path) -> None:
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, mu=stats["mu"], sigma=stats["sigma"], feature_extractor=stats["feature_extractor"],
                     layer=stats["layer"])


def load_statistics(path: Path) -> dict:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] if k in ("mu", "sigma") else str(f[k]) for k in ("mu", "sigma", "feature_extractor", "layer")}
    except (OSError, KeyError, ValueError) as e:
        raise DdimctlError(f"{param('ref')} {path}: not a statistics file written by `ddimctl fid --save-stats` ({e})") from e


def check_reference(reference: str, feature_extractor: str | None = None) -> None:
    """Before any sampling: the reference is a folder, a readable .npz of statistics, or a data set
    torch-fidelity knows by name."""
    if reference.endswith(".npz"):
        saved = load_statistics(Path(reference))
        if feature_extractor and feature_extractor != saved["feature_extractor"]:
            raise DdimctlError(f"{param('ref')} {reference} holds {saved['feature_extractor']} features, not {feature_extractor}")
        return
    if Path(reference).is_dir():
        return
    if Path(reference).exists():
        raise DdimctlError(f"{param('ref')} {reference}: give a folder of images, a .npz statistics file or a name such as cifar10-train")
    from torch_fidelity.registry import DATASETS_REGISTRY

    if reference not in DATASETS_REGISTRY:
        raise DdimctlError(f"{param('ref')} {reference}: no such folder or file, and not a data set torch-fidelity knows "
                           f"({', '.join(DATASETS_REGISTRY)})")


def compute_fid(
    samples: Path,
    reference: str,
    device: torch.device,
    batch_size: int = 64,
    feature_extractor: str | None = None,
    cache_root: str | None = None,
) -> float:
    """FID between a folder of images and a reference: a folder (its statistics are cached), a
    statistics file (.npz from `ddimctl fid --save-stats`), or a name torch-fidelity knows
    (cifar10-train, ...), which the library fetches on first use."""
    tf = fidelity()
    samples = Path(samples)
    if not samples.is_dir():
        raise DdimctlError(f"{samples}: no such folder of images")
    check_image_count(samples)
    if reference.endswith(".npz"):
        ref = load_statistics(Path(reference))
        if feature_extractor and feature_extractor != ref["feature_extractor"]:
            raise DdimctlError(f"{param('ref')} {reference} holds {ref['feature_extractor']} features, not {feature_extractor}")
        mine = statistics(str(samples), device, batch_size, ref["feature_extractor"], cache_root)
        from torch_fidelity.metric_fid import fid_statistics_to_metric

        return float(_run(fid_statistics_to_metric, mine, ref, False)[FID_KEY])
    kwargs = {**_base_kwargs(device, batch_size, feature_extractor, cache_root), "input1": str(samples), "input2": reference}
    if Path(reference).is_dir():
        kwargs["input2_cache_name"] = folder_cache_name(Path(reference))
    elif Path(reference).exists():
        raise DdimctlError(f"{param('ref')} {reference}: give a folder of images, a .npz statistics file or a name such as cifar10-train")
    return float(_run(tf.calculate_metrics, **kwargs)[FID_KEY])


def sweep_cells(sampler_names: list[str], steps_list: list[int] | None, etas: list[float], sigma_hat: bool,
                skip: str | None = None) -> list[samplers.Settings]:
    """The cells of a sweep, S by S: every eta of ddim (and sigma-hat), one row per other sampler.
    steps_list None: explicit timesteps (skip) set each sampler's S."""
    cells = []
    for given in steps_list or [None]:
        for name in sampler_names:
            steps = given if given is not None else samplers.steps_from(skip, name)
            if name == "ddim":
                cells += [samplers.Settings("ddim", steps, skip, eta) for eta in etas]
                cells += [samplers.Settings("ddim", steps, skip, sigma_hat=True)] if sigma_hat else []
            else:
                cells.append(samplers.Settings(name, steps, skip))
    return cells


def cell_name(settings: samplers.Settings) -> str:
    """The cell's folder (ddim's names are those of earlier versions, so their sweeps resume)."""
    if settings.sampler != "ddim":
        return f"{settings.sampler}-S{settings.steps}"
    return f"sigmahat-S{settings.steps}" if settings.sigma_hat else f"eta{settings.eta_text}-S{settings.steps}"


def paper_row(settings: samplers.Settings) -> str | None:
    """The row of the paper's Table 1 a ddim cell belongs to."""
    if settings.sampler != "ddim":
        return None
    return "sigma-hat" if settings.sigma_hat else settings.eta_text


TABLES = ("table.md", "results.json", "fid.png")  # what a sweep writes beside its cells' folders


def write_tables(out: Path, model: str, cells: list[dict]) -> dict[str, Path]:
    """Table-1-style markdown and JSON (and a PNG plot when matplotlib is installed): one row per
    sampler (per eta for ddim), one column per S (network calls per image)."""
    steps = sorted({c["steps"] for c in cells})
    rows = list(dict.fromkeys(c["row"] for c in cells))  # in the order the cells ran
    paper = PAPER_CIFAR10 if model == "cifar10" else {}
    paper_of = {c["row"]: paper.get(c.get("paper_row"), {}) for c in cells}
    lines = [f"# FID sweep: {model}", "", "| sampler | " + " | ".join(f"S = {s}" for s in steps) + " |",
             "|---|" + "---|" * len(steps)]
    for row in rows:
        values = []
        for s in steps:
            found = [c for c in cells if c["row"] == row and c["steps"] == s]
            text = f"{found[0]['fid']:.2f}" if found else "-"
            if s in paper_of[row]:  # the paper's value even where this sweep did not run
                text += f" (paper {paper_of[row][s]:.2f})"
            values.append(text)
        lines.append(f"| {row} | " + " | ".join(values) + " |")
    written = {"markdown": out / "table.md", "json": out / "results.json"}
    with atomic_path(written["markdown"]) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_path(written["json"]) as tmp:
        tmp.write_text(json.dumps({"model": model, "cells": cells, "paper": paper}, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        pts = sorted((c["steps"], c["fid"]) for c in cells if c["row"] == row)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=row)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network calls per image (S)")
    ax.set_ylabel("FID")
    ax.set_title(f"{model}: FID against network calls")
    ax.legend()
    written["plot"] = out / "fid.png"
    with atomic_path(written["plot"]) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return written


def check_sample_count(num: int) -> None:
    """FID needs at least two images for a covariance."""
    if num < 2:
        raise DdimctlError(f"{param('num')} must be at least 2 for FID, got {num}")


def run_sweep(
    model_name: str,
    cells: list[samplers.Settings],
    num: int,
    ref: str,
    out: Path,
    world,
    prepare_cell: Callable,
    fill: Callable,
    feature_extractor: str | None = None,
    say: Callable[[str], None] = lambda message: None,
) -> list[dict]:
    """Table 1: for every cell (sweep_cells), num images in its own folder under `out` (fill()
    resumes a half-filled one), then their FID against `ref`; the tables are rewritten after every
    cell. prepare_cell(settings, first_sampler) gives a sampler sharing the first cell's network."""
    check_sample_count(num)
    results, first = [], None
    for settings in cells:
        sampler = prepare_cell(settings, first)
        first = first or sampler
        folder = out / cell_name(settings)
        folder.mkdir(exist_ok=True)
        fill(sampler, folder)
        if world.is_main:
            value = compute_fid(folder, ref, sampler.device, feature_extractor=feature_extractor)
            results.append({"row": settings.label(), "paper_row": paper_row(settings), **sampler.settings.record(),
                            "fid": value, "images": num, "folder": str(folder)})
            say(f"{folder.name}: FID {value:.3f}")
            write_tables(out, model_name, results)
    return results
