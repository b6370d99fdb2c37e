"""What the README tells a newcomer is what CI proves."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    ci = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l and not l.startswith(("#", "set ", "cd "))]
    assert len(ci) == 1
    assert ci[0] in (ROOT / "README.md").read_text()


def test_readme_pins_the_cpu_torch_wheel():
    readme = (ROOT / "README.md").read_text()
    assert "torch==2.13.0" in readme and "epserve serve" in readme
