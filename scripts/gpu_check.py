#!/usr/bin/env python3
"""The whole GPU check in one command: correctness of the GPU path against the CPU fp32 path, the
sampler against diffusers on the same card (fp32 and fp16), fidelity, the 256x256 model, training
throughput, and a streamed `ddimctl sample` run. Prints a summary table last; JSON goes to --out.

    python scripts/gpu_check.py --out results/     (about 5 minutes on an H200)

A GPU machine may have torch but neither diffusers nor a network: wheels in --wheels (default
.gpu/wheels, filled by `pip download diffusers importlib_metadata --no-deps -d .gpu/wheels`) are
installed without a network when diffusers is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f}s] {message}", flush=True)


def ensure_diffusers(wheels: Path) -> bool:
    try:
        import diffusers  # noqa: F401

        return True
    except ImportError:
        pass
    found = sorted(str(p) for p in wheels.glob("*.whl"))
    if found:
        log(f"installing {len(found)} wheel(s) from {wheels}")
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "-q", *found], check=False)
    try:
        import diffusers  # noqa: F401

        return True
    except ImportError:
        log("diffusers unavailable: reference runs skipped")
        return False


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    if "flash" in lowered or "fmha" in lowered or "attention" in lowered or "efficient" in lowered:
        return "attention"
    if name.startswith("triton") or "triton" in lowered:
        return "triton"
    if any(k in lowered for k in ("conv", "xmma", "cudnn", "implicit", "wgrad", "dgrad", "fprop")):
        return "conv"
    if any(k in lowered for k in ("gemm", "cutlass", "sm90", "cublas", "nvjet")):
        return "gemm"
    return "other"


def profile_kernels(unet, device, precision: str, mode: str | None, batch: int, shape) -> dict:
    """GPU kernel time of one forward pass of the compiled network, summed by kernel."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ddimctl.models import boundary

    eps = boundary.prepare(unet, device, precision, mode, batch)
    boundary.warm_up(eps, (batch, *shape), device)
    x = torch.randn(batch, *shape, device=device)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    calls = 3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), profile(activities=activities) as prof:
        for _ in range(calls):
            eps(x, t)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    kernels = []
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", 0) if device.type == "cuda" else event.self_cpu_time_total
        if device.type == "cuda" and getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        if us > 0:
            kernels.append((event.key, us / 1000 / calls, event.count // calls))
    kernels.sort(key=lambda k: -k[1])
    by_kind: dict[str, float] = {}
    for name, ms, _ in kernels:
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + ms
    del eps
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return {
        "batch": batch,
        "precision": precision,
        "mode": mode,
        "total_ms": sum(by_kind.values()),
        "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "top": kernels[:40],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-results"))
    parser.add_argument("--wheels", default=str(ROOT / ".gpu" / "wheels"))
    parser.add_argument(
        "--budget",
        type=float,
        default=280.0,
        help="Seconds the whole check should take: later stages are skipped as it runs out.",
    )
    parser.add_argument(
        "--modes",
        default="reduce-overhead,max-autotune-no-cudagraphs",
        help="torch.compile modes to compare on CIFAR-10.",
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--stages", default="correctness,cifar10,solvers,profile,ddpm256,training,cli", help="Stages to run.")
    parser.add_argument("--baseline-runs", type=int, default=3)
    parser.add_argument("--batches", default="", help="CIFAR-10 batch sizes for the fast path (default 256,1024).")
    parser.add_argument("--lean", action="store_true", help="Leave out the variants measured before (fp16, eager bf16).")
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes, to try the script on a CPU.")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    have_reference = ensure_diffusers(Path(args.wheels))

    import torch

    from ddimctl import bench, schedule
    from ddimctl.sampling import ddim, samplers
    from ddimctl.models import boundary
    from ddimctl.models.unet import PRESETS, UNet

    def ddim_settings(steps: int) -> samplers.Settings:
        return samplers.Settings("ddim", steps, "uniform")

    device = torch.device(args.device)
    small, big, batch, big_batch, steps = ("cifar10", "ddpm256", 256, 1024, 50)
    if args.smoke:
        small, big, batch, big_batch, steps = ("tiny", "small", 8, 16, 3)
    modes = [None if m == "none" else m for m in args.modes.split(",")]
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "stages": {},
    }

    def save() -> None:
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2))

    log(f"{report['device']}, torch {report['torch']}, diffusers {'yes' if have_reference else 'no'}")
    abar = schedule.alphas_cumprod(schedule.linear_betas())

    stages = set(args.stages.split(","))
    torch.manual_seed(0)
    unet = UNet(PRESETS[small]).eval()
    shape = (3, unet.config.resolution, unet.config.resolution)
    results, results256, training, extra_variants = [], [], [], []

    # 1. Correctness: GPU fp32 against CPU fp32, same weights and noise.
    if "correctness" in stages:
        x_T = torch.randn(8, *shape, generator=torch.Generator().manual_seed(1))
        tau = schedule.timestep_sequence(10, 1000, "uniform")
        cpu = ddim.sample(boundary.prepare(unet, torch.device("cpu"), "fp32"), x_T, abar, tau)
        gpu = ddim.sample(boundary.prepare(unet, device, "fp32"), x_T.to(device), abar, tau).cpu()
        diff = float((gpu - cpu).abs().max())
        report["stages"]["gpu_vs_cpu_fp32"] = {
            "max_abs_diff": diff,
            "max_abs_value": float(cpu.abs().max()),
            "steps": 10,
            "batch": 8,
        }
        log(f"GPU fp32 vs CPU fp32, 10 steps: max |diff| = {diff:.2e} (values up to {float(cpu.abs().max()):.1f})")
        # The batched, pipelined sampler (pinned copies, batch k + 1 queued while batch k is handed
        # over) with eta = 1, whose per-step noise comes from per-image CPU generators.
        import copy

        from ddimctl.sampling import runners
        from ddimctl.models.families import DEFAULT_SCHEDULE
        from ddimctl.models.loading import LoadedModel

        def run_batches(dev: torch.device) -> torch.Tensor:
            loaded = LoadedModel(copy.deepcopy(unet), "check", "gpu_check", dict(DEFAULT_SCHEDULE), "uniform")
            eps = boundary.prepare(loaded.unet, dev, "fp32")
            sampler = runners.Runner.create(loaded, samplers.Settings("ddim", 10, eta=1.0), dev, eps_model=eps)
            return torch.cat([x for _, x in sampler.sample_indices(list(range(12)), 5, 5)])

        diff = float((run_batches(device) - run_batches(torch.device("cpu"))).abs().max())
        report["stages"]["pipelined_eta1_gpu_vs_cpu"] = {"max_abs_diff": diff, "images": 12, "batch": 5}
        log(f"pipelined Runner, eta = 1, GPU fp32 vs CPU fp32: max |diff| = {diff:.2e}")
        save()

    # 2. CIFAR-10: references and the fp32 baseline once, then each compile mode.
    if "cifar10" in stages:
        flops = boundary.forward_flops(unet)
        x_T = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)).to(device)
        base, base_out = bench.run_ours(unet, x_T, ddim_settings(steps), "fp32", None, args.baseline_runs, abar)
        base.finite = bool(torch.isfinite(base_out).all())  # the fidelity baseline itself
        results.append(base)
        refs = []
        if have_reference:
            for dtype in (torch.float32, torch.float16) if device.type == "cuda" else (torch.float32,):
                m, o = bench.run_reference(unet, x_T, ddim_settings(steps), dtype, 3)
                bench.add_fidelity(m, o, base_out)
                refs.append(m)
                log(f"{m.name}: {m.images_per_s:.1f} images/s")
            results.extend(refs)
        log(f"ddimctl fp32 eager: {base.images_per_s:.1f} images/s")
        low = "bf16" if device.type == "cuda" else "fp32"
        batches = [int(b) for b in args.batches.split(",")] if args.batches else [batch, big_batch]
        # (precision, compile mode, batch, cudnn.benchmark). The first mode here; the other modes,
        # whose compilation can take minutes, after the 256x256 and CLI stages (stage 6).
        variants = [(low, modes[0], b, False) for b in batches]
        variants += [(low, modes[0], batches[-1], True)]
        if not args.lean:
            variants += [("fp16" if device.type == "cuda" else "fp32", modes[0], batch, False), (low, None, batch, False)]
        extra_variants = [(low, mode, batches[-1], False) for mode in modes[1:]]

        def run_variant(precision, mode, b, cudnn_benchmark) -> None:
            torch.backends.cudnn.benchmark = cudnn_benchmark
            x = x_T if b == batch else torch.randn(b, *shape, generator=torch.Generator().manual_seed(0)).to(device)
            m, o = bench.run_ours(unet, x, ddim_settings(steps), precision, mode, 3, abar)
            torch.backends.cudnn.benchmark = False
            # Fidelity on the first 256 images, whose noise is the baseline's.
            bench.add_fidelity(m, o[:batch], base_out)
            if cudnn_benchmark:
                m.name += " cudnn.benchmark"
            bench.add_mfu(m, flops, device)
            bench.add_ratios([m], refs)
            results.append(m)
            report["stages"]["cifar10"] = [r.to_dict() for r in results]
            save()
            log(
                f"{m.name} batch {b}: {m.images_per_s:.1f} images/s (compile {m.compile_s:.0f}s), "
                f"PSNR median {m.psnr_median:.1f} dB"
            )
            del o
            torch.cuda.empty_cache()

        for m in results:
            bench.add_mfu(m, flops, device)
        bench.add_ratios(results, refs)
        for i, variant in enumerate(variants):
            if i and time.perf_counter() - STARTED > args.budget * 0.5:
                log(f"skipping {variant}: over the time budget")
                continue
            run_variant(*variant)

    # 2a. The fast solvers on the same compiled network: their images/s at the same network calls
    # must be within 3% of ddim's (the solver arithmetic costs nothing next to the UNet).
    if "solvers" in stages:
        b = batches[-1] if "cifar10" in stages else batch
        x = torch.randn(b, *shape, generator=torch.Generator().manual_seed(0)).to(device)
        low = "bf16" if device.type == "cuda" else "fp32"
        rates = {}
        for name in ("ddim", "dpm++2m", "unipc"):
            settings = samplers.Settings(name, steps, "uniform")
            m, o = bench.run_ours(unet, x, settings, low, modes[0], 3, abar)
            rates[name] = m.images_per_s
            log(f"{m.name} batch {b}, {steps} calls: {m.images_per_s:.1f} images/s"
                + (f" ({100 * (m.images_per_s / rates['ddim'] - 1):+.1f}% against ddim)" if name != "ddim" else ""))
            del o
        report["stages"]["solvers"] = {"batch": b, "calls": steps, "images_per_s": rates}
        save()

    # 2b. Where the time of one compiled forward goes: GPU kernel time by kind (convolutions and
    # matmuls from cuDNN/cuBLAS, Inductor's Triton kernels (GroupNorm, SiLU, adds), attention).
    if "profile" in stages:
        profile = profile_kernels(unet, device, "bf16" if device.type == "cuda" else "fp32", modes[0],
                                  big_batch if not args.smoke else 4, shape)
        report["stages"]["profile"] = profile
        save()
        log(f"profile of one forward at batch {profile['batch']}: {profile['total_ms']:.1f} ms of kernels")
        for kind, ms in profile["by_kind_ms"].items():
            log(f"  {kind:12s} {ms:8.2f} ms  {100 * ms / max(profile['total_ms'], 1e-9):5.1f}%")
        for name, ms, calls in profile["top"][:15]:
            log(f"  {ms:8.2f} ms {calls:4d}x  {name[:110]}")

    # 3. The 256x256 architecture, 10 steps: reference fp16 against ours at batch 16 and 64, each
    # side's ratio taken against the reference's faster batch.
    if "ddpm256" in stages and time.perf_counter() - STARTED < args.budget * 0.65:
        torch.manual_seed(0)
        unet256 = UNet(PRESETS[big]).eval()
        r = unet256.config.resolution
        sizes = (16, 64) if not args.smoke else (2, 4)
        noise256 = {b: torch.randn(b, 3, r, r, generator=torch.Generator().manual_seed(0)).to(device) for b in sizes}
        base256, base256_out = bench.run_ours(unet256, noise256[sizes[0]], ddim_settings(10), "fp32", None, 2, abar)
        results256.append(base256)
        refs256 = []
        for b in sizes if have_reference and device.type == "cuda" else ():
            m, o = bench.run_reference(unet256, noise256[b], ddim_settings(10), torch.float16, 2)
            bench.add_fidelity(m, o[: sizes[0]], base256_out)
            refs256.append(m)
            results256.append(m)
            log(f"256x256 {m.name} batch {b}: {m.images_per_s:.1f} images/s")
        low = ("bf16", "fp16") if device.type == "cuda" else ("fp32",)
        precisions = low[:1] if args.lean else low
        for precision, b in [(p, sizes[0]) for p in precisions] + [(low[0], sizes[1])]:
            if time.perf_counter() - STARTED > args.budget * 0.8:
                log(f"skipping 256x256 {precision} batch {b}: over the time budget")
                continue
            m, o = bench.run_ours(unet256, noise256[b], ddim_settings(10), precision, modes[0], 2, abar)
            bench.add_fidelity(m, o[: sizes[0]], base256_out)
            results256.append(m)
            log(f"256x256 {m.name} batch {b}: {m.images_per_s:.1f} images/s")
            del o
            torch.cuda.empty_cache()
        bench.add_ratios(results256, refs256)
        flops256 = boundary.forward_flops(unet256)
        for m in results256:
            bench.add_mfu(m, flops256, device)
        report["stages"]["ddpm256"] = [m.to_dict() for m in results256]
        del unet256
        torch.cuda.empty_cache()
        save()

    # 4. Training throughput on the CIFAR-10 preset.
    for precision, compiled in (("fp32", False), ("bf16", False), ("bf16", True)) if "training" in stages else ():
        if compiled and ("training-compiled" not in stages or args.smoke):
            continue
        if compiled and time.perf_counter() - STARTED > args.budget * 0.85:
            log("skipping compiled training: over the time budget")
            continue
        r = bench.benchmark_training(
            PRESETS[small], device, 128 if not args.smoke else 4, precision, compiled, steps=20 if not args.smoke else 2
        )
        training.append(r)
        log(f"{r['name']}: {r['images_per_s']:.0f} images/s (warm-up {r['warmup_s']:.0f}s)")
        torch.cuda.empty_cache()
    if training:
        report["stages"]["training"] = training
        save()

    # 5. Streamed CLI runs, eta = 0 and eta = 1 (per-step noise from per-image CPU generators):
    # PNGs written by worker threads, bounded host memory, the time sampling waited for the writers.
    cli_runs = []
    ckpt = Path("/tmp/ddimctl-gpu-check/cifar10-random.safetensors")
    if "cli" in stages:
        from safetensors.torch import save_file

        ckpt.parent.mkdir(parents=True, exist_ok=True)
        save_file(unet.state_dict(), str(ckpt))
        ckpt.with_suffix(".json").write_text(json.dumps({"unet": PRESETS[small].to_dict(), "skip": "quad"}))
    for eta in ("0", "1") if "cli" in stages else ():
        if time.perf_counter() - STARTED > args.budget * 0.9:
            log(f"skipping the CLI run with eta = {eta}: over the time budget")
            continue
        folder = Path(f"/tmp/ddimctl-gpu-check/samples-eta{eta}")
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        count, size = 4 * big_batch, big_batch
        cmd = [
            sys.executable,
            "-c",
            "import resource,runpy,sys; sys.argv=['ddimctl']+sys.argv[1:];\n"
            "try: runpy.run_module('ddimctl', run_name='__main__')\n"
            "finally: print('maxrss_mib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024, file=sys.stderr)",
            "sample",
            "--model",
            str(ckpt),
            "-n",
            str(count),
            "--steps",
            str(steps),
            "--eta",
            eta,
            "--out",
            f"{folder}/",
            "--batch-size",
            str(size),
            "--device",
            args.device,
            "--compile",
        ]  # the cifar10 stage compiled the same graph: this shows the warm-cache compile time
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        wall = time.perf_counter() - started
        rss = [line for line in proc.stderr.splitlines() if line.startswith("maxrss_mib")]
        written = len(list(folder.glob("*.png")))
        cli_runs.append(
            {
                "eta": eta,
                "images": written,
                "wall_s": wall,
                "returncode": proc.returncode,
                "max_rss_mib": float(rss[0].split()[1]) if rss else None,
                "summary": [
                    x for x in proc.stderr.splitlines() if any(w in x for w in ("wrote", "compiled", "waited"))
                ],
            }
        )
        report["stages"]["cli_sample"] = cli_runs
        log(f"CLI sample eta={eta}, {count} images: rc={proc.returncode}, {written} PNGs, {wall:.0f}s with compile")
        if proc.returncode:
            log(proc.stderr[-2000:])
        save()

    # 6. The other compile modes, whose compilation may take minutes, with what time is left.
    for variant in extra_variants if "cifar10" in stages else ():
        if time.perf_counter() - STARTED > args.budget * 0.9:
            log(f"skipping {variant}: over the time budget")
            continue
        run_variant(*variant)

    # Summary, last.
    print("\n== summary ==")
    if args.smoke:
        print("(smoke run: tiny sizes, not a measurement)")
    print(f"{report['device']} | torch {report['torch']} | {report['date']}")
    checks = {"gpu_vs_cpu_fp32": "GPU fp32 vs CPU fp32", "pipelined_eta1_gpu_vs_cpu": "pipelined sampler, eta = 1"}
    for key, what in checks.items():
        if key in report["stages"]:
            print(f"{what}, max |diff|: {report['stages'][key]['max_abs_diff']:.2e}")
    for title, rows in (("CIFAR-10, 50 steps", results), ("256x256, 10 steps", results256)):
        if not rows:
            continue
        print(f"\n{title}")
        print(" | ".join(bench.SUMMARY_HEADER))
        for row in bench.summary_rows(rows):
            print(" | ".join(row))
    if training:
        print("\ntraining, CIFAR-10 preset, batch 128")
        for r in training:
            print(f"{r['name']} | {r['images_per_s']:.0f} images/s | warm-up {r['warmup_s']:.0f}s")
    for c in report["stages"].get("cli_sample", []):
        print(
            f"\nCLI sample, eta = {c['eta']}: {c['images']} PNGs in {c['wall_s']:.0f}s, max RSS {c['max_rss_mib']} MiB"
        )
        print(f"  exit code {c['returncode']}")
        for line in c["summary"]:
            print(f"  {line.strip()}")
    print(f"total {time.perf_counter() - STARTED:.0f}s")


if __name__ == "__main__":
    main()
