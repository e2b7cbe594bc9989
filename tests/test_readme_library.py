"""The README's library example runs as written (it is the first thing a library user copies)."""

import textwrap
from pathlib import Path


def library_example() -> str:
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("## Library", 1)[1]
    lines = []
    for line in section.splitlines()[1:]:
        if line.startswith("    ") or (not line.strip() and lines):
            lines.append(line)
        elif lines:
            break
    return textwrap.dedent("\n".join(lines))


def test_the_readme_library_example_runs():
    code = library_example()
    assert "ddimctl.sample(" in code and "noise_model" in code
    scope: dict = {}
    import torch

    torch.manual_seed(0)  # the example's x_T: the same every run
    exec(compile(code, "README.md (Library)", "exec"), scope)
    assert tuple(scope["images"].shape) == (16, 1, 16, 16)
    assert scope["x_0"].shape == scope["x_T"].shape and len(scope["steps"]) == 20
    # invert_exact's latents decode back to x_0 (the example's comment)
    from ddimctl.sampling import ddim

    back = ddim.sample(scope["eps"], scope["x_T_exact"], scope["abar"], scope["tau"])
    error = (back - scope["x_0"]).abs()
    assert float(error.mean()) < 5e-3 and float(error.max()) < 0.2, (float(error.mean()), float(error.max()))
    assert scope["calls"] <= 4 * len(scope["tau"]) + 1
