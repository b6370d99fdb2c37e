"""`epserve bench BENCHMARK`: each benchmark takes only its own flags; a flag it would ignore, or a
flag valid only in another mode, is one line on stderr and a non-zero exit; a GPU benchmark on a
host without CUDA says so in one line. Issue 26, part 5."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from epserve.cli import main

has_cuda = torch.cuda.is_available()


def one_line(argv, capsys) -> tuple[int, str]:
    """(exit code, the only stderr line) of `epserve bench ARGV` run in this process."""
    try:
        code = main(["bench", *argv])
    except SystemExit as exc:          # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return code, err[0]


@pytest.mark.parametrize("argv, names", [
    (["engine", "--device", "cuda", "--tokens", "8"], ["--tokens", "--device cuda"]),
    (["engine", "--device", "cuda", "--mtp"], ["--mtp", "--device cuda"]),
    (["engine", "--kernels", "native"], ["--kernels", "--device cuda"]),
    (["engine", "--device", "cuda", "--profile", "/tmp/p", "--batches", "8"], ["--batches", "--profile"]),
    (["step", "--gpus", "2", "--eager"], ["--eager", "--gpus"]),
    (["step", "--mtp", "--phase", "prefill"], ["--phase", "--mtp"]),
    (["step", "--device", "cpu"], ["--device", "--small"]),
    (["step", "--mtp", "--device", "cpu"], ["--device", "--small"]),
    (["step", "--small"], ["--small", "--mtp"]),
    (["step", "--cached", "0.5"], ["--cached", "--phase prefill"]),
    (["step", "--no-ep", "--skew", "zipf"], ["--skew", "--no-ep"]),
    (["step", "--acceptance", "0.9"], ["--acceptance", "--mtp"]),
    (["step", "--mtp", "--acceptance", "1.5"], ["--acceptance must be in [0, 1], got 1.5"]),
    (["step", "--mtp", "--small", "--skew", "zipf"], ["--skew", "--small"]),
    (["step", "--phase", "prefill", "--context", "4096"], ["--context", "prefill"]),
    (["step", "--no-ep", "--context", "4096"], ["--context", "--no-ep"]),
    (["step", "--no-ep", "--kernel-table"], ["--kernel-table", "--no-ep"]),
    (["step", "--gpus", "2", "--kernel-table"], ["--kernel-table", "--gpus"]),
    (["step", "--arch", "v32", "--kernel-table"], ["--kernel-table", "--arch v32"]),
    (["overlap", "--gpus", "2", "--latency-ms", "1"], ["--latency-ms", "--gpus"]),
    (["serve", "--url", "http://127.0.0.1:1", "--model", "m"], ["--model", "--url"]),
    (["serve", "--api-key", "k"], ["--api-key", "--url"]),
    (["serve", "--constrained", "--requests", "4"], ["--requests", "--constrained"]),
])
def test_a_flag_of_another_mode_is_one_line_naming_both(argv, names, capsys):
    code, line = one_line(argv, capsys)
    assert code != 0
    assert line.startswith(f"epserve bench {argv[0]}: error: ")
    for name in names:
        assert name in line, line


@pytest.mark.parametrize("argv, flag", [
    (["serve", "--tokens", "8"], "--tokens"),
    (["kernels", "--backend", "triton"], "--backend"),        # not taken as an abbreviation of --backends
    (["step", "--model", "/m"], "--model"),
    (["kernels", "--model", "/m"], "--model"),
    (["deepep", "--model", "/m"], "--model"),
    (["units", "--profile", "/tmp/p"], "--profile"),
    (["step", "--profile", "/tmp/p"], "--profile"),
    (["eplb", "--profile", "/tmp/p"], "--profile"),
    (["eplb", "--gpus", "2"], "--gpus"),
    (["grammar", "--batches", "1"], "--batches"),
])
def test_a_flag_the_benchmark_does_not_read_is_an_argparse_error(argv, flag, capsys):
    code, line = one_line(argv, capsys)
    assert code == 2
    assert line.startswith(f"epserve bench {argv[0]}: error: unrecognized arguments: {flag}"), line


def test_cached_is_a_step_flag():
    """`--cached` parses under `bench step` (it was only in `python -m epserve.bench.step`)."""
    from epserve.cli import _parser
    a = _parser().parse_args(["bench", "step", "--phase", "prefill", "--cached", "0.563"])
    assert (a.what, a.phase, a.cached) == ("step", "prefill", 0.563)


def test_cached_out_of_range_is_one_line(capsys):
    code, line = one_line(["step", "--phase", "prefill", "--cached", "1.5"], capsys)
    assert code != 0 and "--cached must be in [0, 1), got 1.5" in line


@pytest.mark.skipif(has_cuda, reason="this host has CUDA")
@pytest.mark.parametrize("argv", [["kernels"], ["step"], ["step", "--mtp"], ["engine", "--device", "cuda"],
                                  ["grammar", "--device", "cuda"]])
def test_a_gpu_benchmark_without_cuda_is_one_line(argv, capsys):
    code, line = one_line(argv, capsys)
    assert code == 4
    assert line == f"epserve bench {argv[0]}: error: needs a CUDA GPU; this machine has none"


def _cli(*argv, timeout=300):
    """`python -m epserve bench ARGV` in a fresh process (this interpreter, this PYTHONPATH)."""
    return subprocess.run([sys.executable, "-m", "epserve", "bench", *argv], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(has_cuda, reason="this host has CUDA")
def test_bench_kernels_without_cuda_is_one_line_in_a_real_process():
    r = _cli("kernels")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == ["epserve bench kernels: error: needs a CUDA GPU; this machine has none"]


@pytest.mark.parametrize("argv, flag", [(["engine", "--device", "cuda", "--tokens", "8"], "--tokens"),
                                        (["serve", "--tokens", "8"], "--tokens")])
def test_misuse_is_one_line_in_a_real_process(argv, flag):
    r = _cli(*argv)
    err = r.stderr.strip().splitlines()
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(err) == 1 and flag in err[0], r.stderr


@pytest.mark.parametrize("what, has, lacks", [
    ("kernels", ["--backends"], ["--model", "--backend ", "--profile", "--tokens"]),
    ("step", ["--cached", "--phase", "--mtp", "--gpus"], ["--model", "--profile", "--tokens "]),
    ("deepep", ["--gpus"], ["--model", "--profile"]),
    ("overlap", ["--profile", "--latency-ms", "--gpus"], ["--tokens", "--backend"]),
    ("engine", ["--profile", "--tokens", "--mtp", "--device"], ["--gpus", "--backend "]),
    ("serve", ["--url", "--constrained"], ["--tokens", "--profile"]),
])
def test_help_lists_only_the_benchmarks_own_flags(what, has, lacks, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", what, "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert all(f in out for f in has), out
    assert not any(f in out for f in lacks), out


def test_a_correct_cpu_invocation_still_runs():
    """`bench step --mtp --small` runs the MTP verify-step benchmark on CPU and prints its JSON."""
    r = _cli("step", "--mtp", "--small", "--backend", "reference", "--step-tokens", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["bench"] == "step" and out["results"]["shapes"] == "small (CPU)"
    assert out["results"]["assumptions"]["requests_per_gpu"] == 4
