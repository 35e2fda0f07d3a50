"""Compile-only check of the kernels' production configurations for sm_80 (A100) and sm_90 (H100), on any machine:
Triton's front end accepts them for a real GPU target (the interpreter does not check that), and ptxas fits them in
registers without spills and in the shared memory of the architecture."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ARCHS = (80, 90)
ROOT = Path(__file__).resolve().parents[1]


def _has_ptxas() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.access(get_ptxas(90).path, os.X_OK)
    except Exception:
        return False


@pytest.fixture(scope="module")
def compiled() -> dict[int, list[dict]]:
    """`python -m kernels.compile_check --json`, one process per architecture side by side, without the interpreter
    (which conftest switches on for this process)."""
    if not _has_ptxas():
        pytest.skip("triton's NVIDIA backend (ptxas) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "kernels.compile_check", "--json", "--arch"]
    procs = {
        arch: subprocess.Popen(
            [*cmd, str(arch)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for arch in ARCHS
    }
    records = {}
    for arch, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"compile_check --arch {arch} failed:\n{err[-4000:]}"
        records[arch] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return records


@pytest.mark.parametrize("arch", ARCHS)
def test_production_configs_compile_without_spills(compiled, arch):
    from kernels.compile_check import production_cases

    records = compiled[arch]
    assert [r["name"] for r in records] == [c["name"] for c in production_cases()]
    for r in records:
        print(f"sm_{arch} {r['name']}: {r['n_regs']} registers, {r['n_spills']} B spilled, {r['shared']} B shared")
    spilled = [f"{r['name']} ({r['n_spills']} B)" for r in records if r["n_spills"] != 0]
    assert not spilled, f"register spills on sm_{arch}: {spilled}"
    too_big = [r["name"] for r in records if r["shared"] > r["shared_limit"]]
    assert not too_big, f"shared memory beyond sm_{arch}'s limit: {too_big}"
