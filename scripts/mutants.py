"""Mutate each public maths function once (a sign, an off-by-one, a dropped term) and see which test
catches it: the suite's own check that its oracles are not the code they test.

    python scripts/mutants.py [--json docs/mutants.json] [--only NAME]

Each mutant is applied to the source, the tests that cover its module run (stopping at the first
failure), and the file is restored whatever happens. A mutant no test catches is a missing test.
"""

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "ddimctl"
MATHS_TESTS = ["tests/test_ddim.py", "tests/test_solvers.py", "tests/test_timesteps.py", "tests/test_reference_scheduler.py",
               "tests/test_diffusers_format.py", "tests/test_fast_and_bench.py", "tests/test_sampling.py"]

# (name, module, text, mutated text, tests)
MUTANTS = [
    ("linear betas off by one", "schedule.py", "return torch.linspace(beta_start, beta_end, train_steps, dtype=torch.float64)",
     "return torch.linspace(beta_start, beta_end, train_steps + 1, dtype=torch.float64)[1:]", MATHS_TESTS),
    ("cosine offset dropped", "schedule.py", "abar = torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2",
     "abar = torch.cos(u * math.pi / 2) ** 2", MATHS_TESTS),
    ("laplace sign", "schedule.py", "lam = -0.5 * sign * torch.log", "lam = 0.5 * sign * torch.log", MATHS_TESTS),
    ("alphas_cumprod shifted", "schedule.py", "return torch.cumprod(1.0 - betas.double(), dim=0)",
     "return torch.cumprod(1.0 - betas.double(), dim=0).roll(1)", MATHS_TESTS),
    ("scaled_linear not squared", "schedule.py", "return torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2",
     "return torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64)", MATHS_TESTS),
    ("sigmoid without its start", "schedule.py", "* (end - start) + start", "* (end - start)", MATHS_TESTS),
    ("uniform timesteps off by one", "schedule.py", "return torch.arange(steps, dtype=torch.long) * train_steps // steps",
     "return (torch.arange(steps, dtype=torch.long) + 1) * train_steps // steps - 1", MATHS_TESTS),
    ("quad's 0.8 T", "schedule.py", "math.sqrt(0.8 * train_steps)", "math.sqrt(0.9 * train_steps)", MATHS_TESTS),
    ("linspace end not exact", "schedule.py", "        points[-1] = stop\n", "        pass\n", MATHS_TESTS),
    ("x0 prediction's noise: sqrt dropped", "schedule.py", "return (x_t - abar_t.sqrt() * output) / (1 - abar_t).sqrt()",
     "return (x_t - abar_t.sqrt() * output) / (1 - abar_t)", MATHS_TESTS),
    ("v prediction's noise: sign", "schedule.py", "return abar_t.sqrt() * output + (1 - abar_t).sqrt() * x_t",
     "return abar_t.sqrt() * output - (1 - abar_t).sqrt() * x_t", MATHS_TESTS),
    ("v target: sign", "schedule.py", "return abar_t.sqrt() * noise - (1 - abar_t).sqrt() * x_0",
     "return abar_t.sqrt() * noise + (1 - abar_t).sqrt() * x_0", ["tests/test_train.py"]),
    ("x0 target is the noise", "schedule.py", "    if prediction == \"sample\":\n        return x_0",
     "    if prediction == \"sample\":\n        return noise", ["tests/test_train.py"]),
    ("sigma(eta): ratio inverted", "sampling/ddim.py", "eta * math.sqrt((1 - abar_s) / (1 - abar_t))",
     "eta * math.sqrt((1 - abar_t) / (1 - abar_s))", MATHS_TESTS),
    ("predict_x0: sqrt dropped", "sampling/ddim.py", "return (x_t - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)",
     "return (x_t - (1 - abar_t) * eps) / math.sqrt(abar_t)", MATHS_TESTS),
    ("ddim_step: sigma^2 dropped", "sampling/ddim.py", "math.sqrt(max(1 - abar_s - sigma**2, 0.0))",
     "math.sqrt(max(1 - abar_s, 0.0))", MATHS_TESTS),
    ("clipping to [-2, 2]", "sampling/ddim.py", "x0 = predict_x0(x, eps, abar_t).clamp(-1, 1)",
     "x0 = predict_x0(x, eps, abar_t).clamp(-2, 2)", MATHS_TESTS),
    ("walk ends at t = 0", "sampling/ddim.py", "pairs = zip(reversed(taus), reversed([-1] + taus[:-1]))",
     "pairs = zip(reversed(taus), reversed([0] + taus[:-1]))", MATHS_TESTS),
    ("sigma-hat without abar_s", "sampling/ddim.py", "sigma = math.sqrt(1 - abar_t / abar_s)", "sigma = math.sqrt(1 - abar_t)",
     MATHS_TESTS),
    ("invert: noise at the target timestep", "sampling/ddim.py", "eps = eps_model(x, batch_timesteps(max(s, taus[0]), x)).to(x.dtype)",
     "eps = eps_model(x, batch_timesteps(t, x)).to(x.dtype)", MATHS_TESTS),
    ("half_log_snr doubled", "sampling/ddim.py", "return 0.5 * math.log(abar / (1 - abar))",
     "return math.log(abar / (1 - abar))", MATHS_TESTS),
    ("anderson: sign of the correction", "sampling/ddim.py", "return (outputs[:, :, -1:] - d_out @ gamma)",
     "return (outputs[:, :, -1:] + d_out @ gamma)", MATHS_TESTS),
    ("noise_to: sqrt dropped", "sampling/ddim.py", "return math.sqrt(abar) * x_0 + math.sqrt(1 - abar) * noise",
     "return math.sqrt(abar) * x_0 + (1 - abar) * noise", MATHS_TESTS + ["tests/test_edit.py"]),
    ("inpainting keeps the wrong side", "sampling/ddim.py", "return torch.lerp(known, x_s, mask)", "return torch.lerp(x_s, known, mask)",
     MATHS_TESTS + ["tests/test_edit.py"]),
    ("slerp weights swapped", "sampling/ddim.py", "wa = torch.where(near, 1 - alpha, torch.sin((1 - alpha) * theta) / safe_sin)",
     "wa = torch.where(near, 1 - alpha, torch.sin(alpha * theta) / safe_sin)", MATHS_TESTS),
    ("DPM-Solver++ 2M's 1/(2 r0)", "sampling/solvers.py", "return c_x, [c_m0 * (1 + 0.5 / r0), -c_m0 * 0.5 / r0]",
     "return c_x, [c_m0 * (1 + 1.0 / r0), -c_m0 * 1.0 / r0]", MATHS_TESTS),
    ("DPM-Solver++ 3M's phi3", "sampling/solvers.py", "phi3 = phi2 / h - 0.5", "phi3 = phi2 / h + 0.5", MATHS_TESTS),
    ("UniPC predictor's 1/2", "sampling/solvers.py", "k = -nxt.alpha * big_b * 0.5 / r1", "k = -nxt.alpha * big_b / r1",
     MATHS_TESTS),
    ("UniPC corrector's rho", "sampling/solvers.py", "rho_next = b[0] - rho_1", "rho_next = b[0] + rho_1", MATHS_TESTS),
    ("Adams-Bashforth order 3", "sampling/solvers.py", "[23 / 12, -16 / 12, 5 / 12]", "[23 / 12, -15 / 12, 4 / 12]",
     MATHS_TESTS),
    ("PNDM transfer's noise term", "sampling/solvers.py", "c_e = math.sqrt(1.0 - abar_s) - math.sqrt(abar_s * (1.0 - abar_t) / abar_t)",
     "c_e = math.sqrt(1.0 - abar_s) - math.sqrt(abar_s * (1.0 - abar_t))", MATHS_TESTS),
    ("karras rho", "sampling/timesteps.py", "KARRAS_RHO = 7.0", "KARRAS_RHO = 5.0", MATHS_TESTS),
    ("trailing without its -1", "sampling/timesteps.py", "return torch.unique(torch.round(train_steps - points).long() - 1)",
     "return torch.unique(torch.round(train_steps - points).long()).clamp(max=train_steps - 1)", MATHS_TESTS),
    ("ays uniform in sigma", "sampling/timesteps.py", "a, b = math.atan(math.exp(high)), math.atan(math.exp(low))\n        return torch.log(torch.tan(a + u * (b - a)))",
     "a, b = math.exp(high), math.exp(low)\n        return torch.log(a + u * (b - a))", MATHS_TESTS),
    ("warm-up from zero", "session.py", "return base * (step + 1) / warmup", "return base * step / warmup", ["tests/test_train.py"]),
    ("cosine lr without its half", "session.py", "return base * 0.5 * (1 + math.cos(math.pi * progress))",
     "return base * (1 + math.cos(math.pi * progress))", ["tests/test_train.py"]),
    ("EMA warm-up dropped", "session.py", "return min(decay, (1 + step) / (10 + step))", "return decay", ["tests/test_train.py"]),
    ("loss noised with 1 - abar", "train.py", "x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise", "x_t = a.sqrt() * x0 + (1 - a) * noise",
     ["tests/test_train.py"]),
    ("Frechet distance's trace sign", "metrics.py", "torch.trace(cov2) - 2 * torch.trace(cross)",
     "torch.trace(cov2) + 2 * torch.trace(cross)", ["tests/test_metrics.py"]),
    ("PSNR as 20 log10", "metrics.py", "10 * math.log10(1.0 / mse)", "20 * math.log10(1.0 / mse)", ["tests/test_metrics.py"]),
]


def run(name: str, module: str, text: str, mutated: str, tests: list[str]) -> dict:
    path = SRC / module
    original = path.read_text()
    if original.count(text) != 1:
        return {"name": name, "module": module, "status": f"not applied: the text occurs {original.count(text)} times"}
    started = time.perf_counter()
    try:
        path.write_text(original.replace(text, mutated))
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                                cwd=ROOT, capture_output=True, text=True)
    finally:
        path.write_text(original)
    failed = [line.split(" - ")[0].removeprefix("FAILED ") for line in result.stdout.splitlines() if line.startswith("FAILED")]
    # (-x under xdist stops with exit status 2, "interrupted", after the first failure)
    status = "caught" if failed else "survived" if result.returncode == 0 else f"error {result.returncode}"
    return {"name": name, "module": module, "status": status, "caught_by": failed[:1],
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    # A mutant is undone in a finally block: let a kill (SIGTERM) run it too. And start from the committed
    # sources only, so that what a killed run left can never be taken for the original.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    if subprocess.run(["git", "diff", "--quiet", "--", "src"], cwd=ROOT).returncode != 0:
        sys.exit("src/ has uncommitted changes; commit or restore them first (git diff src)")
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", help="Run the mutants whose name contains this")
    args = parser.parse_args()
    report = []
    for mutant in MUTANTS:
        if args.only and args.only not in mutant[0]:
            continue
        row = run(*mutant)
        report.append(row)
        print(f"{row['status']:9s} {row['module']:22s} {row['name']:40s} {' '.join(row.get('caught_by', []))}", flush=True)
    survived = [r["name"] for r in report if r["status"] != "caught"]
    print(f"{len(report) - len(survived)} of {len(report)} caught" + (f"; not caught: {', '.join(survived)}" if survived else ""))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
