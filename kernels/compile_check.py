"""Compile the kernels' production configurations for a GPU architecture - no GPU needed - and report registers,
spills and shared memory.

    python -m kernels.compile_check --arch 80 90      # a table
    python -m kernels.compile_check --arch 90 --json  # one JSON record per case

Triton compiles down to PTX and its bundled ptxas assembles it; `ptxas -v` on the same PTX gives the registers and
spill bytes (on a GPU, Triton reads the same numbers as `n_regs` / `n_spills` when it loads the binary). Must run
without `TRITON_INTERPRET` (the interpreter replaces the kernels with Python functions).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.dispatch import TL_DTYPES
from kernels.info_nce import MAX_WIDTH, _info_nce_pairs_kernel, _info_nce_queue_kernel, info_nce_config
from kernels.topk_cosine import MAX_K, _topk_cosine_kernel, topk_config

SHARED_LIMIT = {80: 166912, 90: 232448}  # max dynamic shared memory per block, bytes (A100, H100)
TYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _topk_case(queries: torch.dtype, memory: torch.dtype, k: int) -> dict:
    dot = queries  # the launcher casts the queries to the dot dtype
    cfg = topk_config(dot, memory, on_gpu=True)
    tile = {n: cfg[n] for n in ("BLOCK_M", "BLOCK_N", "BLOCK_D")}
    return {
        "name": f"topk_cosine q={TYPE_NAMES[queries]} memory={TYPE_NAMES[memory]} k={k}",
        "kernel": _topk_cosine_kernel,
        "types": {
            "Queries": f"*{TYPE_NAMES[queries]}",
            "Memory": f"*{TYPE_NAMES[memory]}",
            "PartV": "*fp32",
            "PartI": "*i32",
        },
        "constexprs": dict(
            tile, K=k, K_PAD=triton.next_power_of_2(k), DOT_DTYPE=TL_DTYPES[dot], DOT_PRECISION="tf32", EPS=1e-12
        ),
        "cfg": cfg,
    }


def _queue_case(dot: torch.dtype, with_acc: bool) -> dict:
    cfg = info_nce_config(with_acc, dot, on_gpu=True)  # the launcher casts student and queue to the dot dtype
    return {
        "name": f"info_nce queue pass {TYPE_NAMES[dot]} {'grad' if with_acc else 'lse-only'}",
        "kernel": _info_nce_queue_kernel,
        "types": {
            "Student": f"*{TYPE_NAMES[dot]}",
            "Queue": f"*{TYPE_NAMES[dot]}",
            "PartM": "*fp32",
            "PartL": "*fp32",
            "PartAcc": "*fp32",
            "qk_scale": "fp32",
        },
        "constexprs": dict(
            BLOCK_M=cfg["BLOCK_M"],
            BLOCK_N=cfg["BLOCK_N"],
            BLOCK_E=MAX_WIDTH,
            WITH_ACC=with_acc,
            DOT_DTYPE=TL_DTYPES[dot],
            DOT_PRECISION="tf32",
            RESCALE=8.0,
        ),
        "cfg": cfg,
    }


def _pairs_case(student: torch.dtype) -> dict:
    return {
        "name": f"info_nce pairs s={TYPE_NAMES[student]} C<=16",
        "kernel": _info_nce_pairs_kernel,
        "types": {
            "Student": f"*{TYPE_NAMES[student]}",
            "Teacher": f"*{TYPE_NAMES[student]}",
            "PartM": "*fp32",
            "PartL": "*fp32",
            "PartAcc": "*fp32",
            "LossParts": "*fp32",
            "GradStudent": f"*{TYPE_NAMES[student]}",
            "GradTeacher": f"*{TYPE_NAMES[student]}",
            "inv_tau": "fp32",
            "w_global": "fp32",
            "w_local": "fp32",
        },
        "constexprs": dict(BLOCK_C=16, BLOCK_E=MAX_WIDTH, GRAD_S=True, GRAD_T=True),
        "cfg": {"num_warps": 4, "num_stages": 1},
    }


def production_cases() -> list[dict]:
    """The launches Mugs makes (bf16 memory shadow, bf16 dots under autocast) and the other dtypes' paths."""
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    return [
        _topk_case(bf16, bf16, 8),
        _topk_case(bf16, bf16, MAX_K),
        _topk_case(fp16, fp16, MAX_K),
        _topk_case(bf16, fp32, MAX_K),
        _topk_case(fp32, fp32, MAX_K),
        *(_queue_case(dot, with_acc) for dot in (bf16, fp16, fp32) for with_acc in (True, False)),
        _pairs_case(fp32),
        _pairs_case(bf16),
    ]


def _ptxas_usage(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"  # as Triton names the target
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", src, "-o", src + ".cubin"]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    return {
        "n_regs": int(re.search(r"Used (\d+) registers", log).group(1)),
        "n_spills": sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)),
    }


def compile_case(case: dict, arch: int) -> dict:
    """Compile one case for sm_`arch`: its registers, spill bytes (stores + loads) and shared memory."""
    kernel = case["kernel"]
    constexprs = case["constexprs"]
    signature = {n: "constexpr" if n in constexprs else case["types"].get(n, "i32") for n in kernel.arg_names}
    aligned = {n for n, t in signature.items() if t.startswith("*") or n.startswith("stride")} | {"D", "E"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names) if n in aligned}
    options = {"num_warps": case["cfg"]["num_warps"], "num_stages": case["cfg"]["num_stages"], "enable_fp_fusion": True}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    usage = _ptxas_usage(compiled.asm["ptx"], arch)
    return {
        "name": case["name"],
        "arch": arch,
        **options,
        **usage,
        "shared": compiled.metadata.shared,
        "shared_limit": SHARED_LIMIT[arch],
        "triton": triton.__version__,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT))
    parser.add_argument("--json", action="store_true", help="one JSON record per line instead of a table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("kernels.compile_check: unset TRITON_INTERPRET (the interpreter does not compile)")
    for arch in args.arch:
        for case in production_cases():
            rec = compile_case(case, arch)
            if args.json:
                print(json.dumps(rec), flush=True)
            else:
                print(
                    f"sm_{arch} {rec['name']:<62} warps={rec['num_warps']} stages={rec['num_stages']} "
                    f"regs={rec['n_regs']:>3} spills={rec['n_spills']} shared={rec['shared']}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
