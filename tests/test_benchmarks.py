"""The step benchmark (CPU smoke), its profile categories, target verdicts, and the README regeneration."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _fixtures import write_beton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_linear  # noqa: E402
import bench_loader  # noqa: E402
import bench_prep  # noqa: E402
import bench_step  # noqa: E402
import readme_results  # noqa: E402
import step_profile  # noqa: E402
import step_report  # noqa: E402
from step_profile import Kernel  # noqa: E402

from kernels import dispatch  # noqa: E402
from mugs_fast.flops import step_flops_per_image  # noqa: E402

# ---- profile categories ----

H100_NAMES = [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off", "GEMM"),
    ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNT", "GEMM"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>", "GEMM"),
    ("void splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>", "GEMM"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>, true>", "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1", "attention"),
    ("_info_nce_queue_kernel", "InfoNCE"),
    ("_info_nce_pairs_kernel", "InfoNCE"),
    ("_topk_cosine_kernel", "top-k"),
    ("void at::native::sbtopk::gatherTopK<float, unsigned int, 2, false>", "top-k"),
    ("void at::native::bitonicSortKVInPlace<2, -1, 16, 16, float, long>", "top-k"),
    (
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>",
        "optimizer/EMA",
    ),
    ("void at::native::lpnorm_cleanup<float, (at::native::NormType)1, float>", "optimizer/EMA"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float>", "softmax"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float, false>", "norm"),
    ("void at::native::GammaBetaBackwardCUDAKernel<float, float>", "norm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "elementwise/reduce"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, MeanOps<float>>>", "elementwise/reduce"),
    ("void dali::kernels::slice_flip_normalize_permute::SliceFlipNormalizePermutePadKernel", "data (DALI)"),
    ("Memcpy HtoD (Pageable -> Device)", "memcpy/memset"),
    ("Memset (Device)", "memcpy/memset"),
    ("some_kernel_nobody_knows", "other"),
]


@pytest.mark.parametrize("name, category", H100_NAMES)
def test_categorize_kernel_names(name, category):
    assert step_profile.categorize(name) == category


def test_kernels_from_trace_keeps_device_activity_only():
    trace = {
        "traceEvents": [
            {"ph": "X", "cat": "kernel", "name": "k1", "ts": 10.0, "dur": 5.0, "args": {"stream": 7}},
            {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD", "ts": 16.0, "dur": 1.5, "tid": 9},
            {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 30.0},
            {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 1.0, "dur": 2.0},
            {"ph": "M", "name": "process_name", "args": {"name": "python"}},
            {"ph": "X", "cat": "Kernel", "name": "old_kineto", "ts": 20, "dur": 1, "tid": "stream 7"},
        ]
    }
    assert step_profile.kernels_from_trace(trace) == [
        Kernel("k1", 10.0, 5.0, 7),
        Kernel("Memcpy DtoD", 16.0, 1.5, 9),
        Kernel("old_kineto", 20.0, 1.0, "stream 7"),
    ]


def test_summary_counts_overlap_once_and_reports_idle():
    kernels = [  # 2 steps over 0..100 us: busy 0-30 (two streams overlapping), 40-70, 90-100; idle 30 us
        Kernel("sm90_xmma_gemm_a", 0.0, 20.0, 1),
        Kernel("dali::resize", 10.0, 20.0, 2),
        Kernel("flash_fwd_kernel", 40.0, 30.0, 1),
        Kernel("sm90_xmma_gemm_a", 90.0, 10.0, 1),
    ]
    assert step_profile.busy_time(kernels) == 70.0
    summary = step_profile.summarize(kernels, steps=2, top=2)
    cats = summary["categories"]
    assert summary["span_ms_per_step"] == 0.05
    assert cats["GEMM"] == {"ms_per_step": 0.015, "share": 0.3}
    assert cats["GPU idle"] == {"ms_per_step": 0.015, "share": 0.3}
    assert cats["data (DALI)"]["share"] == 0.2 and cats["attention"]["share"] == 0.3
    assert summary["top_kernels"][0] == {
        "name": "sm90_xmma_gemm_a",
        "category": "GEMM",
        "ms_per_step": 0.015,
        "calls_per_step": 1.0,
    }
    assert len(summary["top_kernels"]) == 2


def test_summary_of_no_kernels_is_an_error():
    with pytest.raises(ValueError, match="no GPU kernels"):
        step_profile.summarize([], steps=3)


def profile(**ms_per_step) -> dict:
    span = sum(ms_per_step.values())
    return {"categories": {c: {"ms_per_step": ms, "share": ms / span} for c, ms in ms_per_step.items()}}


def test_blame_ranks_largest_or_grown_categories():
    model_only = profile(GEMM=40.0, attention=10.0, InfoNCE=2.0, **{"GPU idle": 1.0})
    end_to_end = profile(GEMM=40.0, attention=10.0, InfoNCE=2.0, **{"GPU idle": 6.0, "data (DALI)": 3.0})
    assert step_profile.blame(model_only) == ["GEMM 40.0 ms/step (75%)", "attention 10.0 ms/step (19%)",
                                              "InfoNCE 2.0 ms/step (4%)"]  # fmt: skip
    assert step_profile.blame(end_to_end, model_only) == [
        "GPU idle +5.0 ms/step over model only",
        "data (DALI) +3.0 ms/step over model only",
    ]


# ---- targets ----


def record(device="NVIDIA H100 80GB HBM3", arch="vit_small", a=1800.0, b=1700.0, **extra) -> dict:
    return {"device": device, "cuda": "cpu" not in device, "arch": arch, "batch_per_gpu": 128,
            "model_only_img_s": a, "end_to_end_img_s": b, "mfu": 0.29, "loader_wait_share": 0.04, **extra}  # fmt: skip


def test_verdicts_on_an_h100_name_the_miss_and_the_blame():
    profiles = {"model_only": profile(GEMM=50.0, attention=9.0), "end_to_end": profile(GEMM=50.0, **{"GPU idle": 4.0})}
    share, absolute = step_report.verdicts(record(end_to_end_syncs_per_step=4.0), profiles)
    assert share["met"] is False and share["missed_by"].startswith("0.6% (94.4% where 95.0%")
    assert share["blame"][:2] == ["host inside the loader 4% of the time", "4 host-GPU syncs per step (loader + step)"]
    assert "GPU idle +4.0 ms/step over model only" in share["blame"]
    assert absolute["met"] is False and absolute["missed_by"] == "10.0% (1,800 where 2,000 is the target)"
    assert absolute["blame"] == [
        "MFU 29.0% of the measured peak",
        "GEMM 50.0 ms/step (85%)",
        "attention 9.0 ms/step (15%)",
    ]


def test_verdicts_met_and_not_applicable():
    met = step_report.verdicts(record(a=2400.0, b=2350.0), {})
    assert [v["met"] for v in met] == [True, True] and not any("blame" in v for v in met)
    h200 = step_report.verdicts(record(device="NVIDIA H200", a=1000.0, b=990.0), {})
    assert h200[0]["met"] is True and h200[1] == {
        "target": "ViT-S/16 model only >= 2,000 images/s",
        "value": 1000.0,
        "required": 2000.0,
        "met": None,
        "note": "judged on the H100 only",
    }
    base = step_report.verdicts(record(arch="vit_base", b=None), {})
    assert len(base) == 1 and base[0]["met"] is None and base[0]["note"] == "not measured"
    cpu = step_report.verdicts(record(device="cpu (AMD EPYC)", a=5.0, b=1.0), {})
    assert [v["met"] for v in cpu] == [None, None]


# ---- README ----


def step_record(device: str, arch: str, batch: int, quick: bool = False) -> dict:
    r = record(device=device, arch=arch, a=2100.0 + batch, b=2050.0 + batch)
    r.update(batch_per_gpu=batch, release_way_img_s=100.0, torch="2.11.0", triton="3.6.0", dali="2.4.0",
             date="2026-12-01T10:00:00+00:00", quick=quick, flops_per_image=128.03e9, peak_tflops=798.0,
             peak_dtype="bf16", errors={})  # fmt: skip
    r["targets"] = step_report.verdicts(r, {})
    return r


README = "# Project\n\nIntro.\n\n## Benchmarks\n\n<!-- results:start -->\nold\n<!-- results:end -->\n\nAfter.\n"


def test_readme_is_updated_between_markers_only_and_idempotently(tmp_path):
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    records = [step_record("NVIDIA H100 80GB HBM3", "vit_small", 128), step_record("NVIDIA H200", "vit_base", 64)]
    records.append(step_record("cpu (AMD EPYC)", "vit_tiny", 5, quick=True))
    records[1]["errors"] = {"release_way": "OutOfMemoryError: CUDA out of memory"}
    (results / "bench_step.json").write_text(json.dumps(records))
    readme = tmp_path / "README.md"
    readme.write_text(README)

    assert readme_results.regenerate(results, readme) is True
    text = readme.read_text()
    before, block, after = (
        text.partition(readme_results.START)[0],
        *text.partition(readme_results.START)[2].split(readme_results.END),
    )
    assert before == README.split(readme_results.START)[0] and after == "\n\nAfter.\n"
    assert "old" not in block and "vit_tiny" not in block  # smoke records are never published
    h100, h200 = block.index("| vit_small | 128 |"), block.index("| vit_base | 64 |")
    assert block.index("NVIDIA H100 80GB HBM3; torch 2.11.0") > h100  # each table labelled by its own device
    assert block.index("NVIDIA H200; torch 2.11.0") > h200 > block.index("NVIDIA H100 80GB HBM3; torch 2.11.0")
    assert "](benchmarks/results/bench_step.png)" in block
    assert "- **failed** release way (vit_base, B = 64): OutOfMemoryError: CUDA out of memory" in block
    assert readme_results.regenerate(results, readme) is False
    assert readme.read_text() == text


@pytest.mark.parametrize(
    "text",
    [
        "# no markers\n",
        "<!-- results:start -->\nonly the start\n",
        "<!-- results:end -->\n<!-- results:start -->\n",
        "<!-- results:start -->\n<!-- results:start -->\n<!-- results:end -->\n",
    ],
)
def test_readme_without_proper_markers_is_refused_untouched(tmp_path, text):
    readme = tmp_path / "README.md"
    readme.write_text(text)
    with pytest.raises(readme_results.MarkerError, match="results:start"):
        readme_results.update_readme(readme, "new block")
    assert readme.read_text() == text


def test_render_without_results_says_so(tmp_path):
    assert "No results yet" in readme_results.render(tmp_path, tmp_path)


# ---- bench_step, CPU smoke ----


def test_release_way_steps_with_the_pytorch_kernels_whatever_the_environment(monkeypatch):
    monkeypatch.setenv("MUGS_KERNELS", "triton")
    modes = []

    class Built(Exception):
        pass

    def stepper(cfg, device):
        modes.append(dispatch.kernel_mode())
        raise Built

    monkeypatch.setattr(bench_step, "Stepper", stepper)
    cfg, args = bench_step.bench_config("vit_tiny", 5, quick=True), SimpleNamespace(workers=1, release_rounds=1)
    with pytest.raises(Built):
        bench_step.release_way(cfg, 5, Path("unread.beton"), args, torch.device("cpu"))
    assert modes == ["torch"] and dispatch.kernel_mode() == "triton"  # the environment's again after the mode


def test_bench_step_cli_refuses_bad_input(capsys, tmp_path):
    for argv in (["--configs", "vit_huge:64"], ["--configs", "vit_small:0"], ["--beton", str(tmp_path / "no.beton")]):
        with pytest.raises(SystemExit) as e:
            bench_step.parse_args(argv)
        assert e.value.code == 2
    assert "bad config 'vit_huge:64'" in capsys.readouterr().err


def test_bench_step_quick_model_only_and_release_way(tmp_path):
    beton = write_beton(tmp_path / "tiny.beton", 11, min_size=72, max_size=97)
    out = tmp_path / "results"
    argv = ["--quick", "--out", str(out), "--beton", str(beton), "--modes", "model_only", "release_way"]
    assert bench_step.main(argv + ["--warmup", "0", "--steps", "1", "--workers", "1"]) == 0

    (r,) = json.loads((out / "bench_step.json").read_text())
    for field in ("device", "arch", "batch_per_gpu", "model_only_img_s", "end_to_end_img_s", "release_way_img_s",
                  "mfu", "torch", "triton", "date"):  # fmt: skip
        assert field in r, field
    assert r["quick"] is True and r["cuda"] is False and r["errors"] == {} and r["nonfinite"] is None
    assert r["batch_per_gpu"] == bench_step.QUICK_BATCH and r["end_to_end_img_s"] is None
    assert r["model_only_img_s"] > 0 and r["release_way_img_s"] > 0 and 0 < r["mfu"]
    assert r["flops_per_image"] == step_flops_per_image(bench_step.bench_config("vit_tiny", 5, quick=True))["total"]
    assert r["release_batches_timed"] == 1 and r["targets"][0]["note"] == "not measured"  # (b) was not run
    assert (out / "bench_step.md").read_text().startswith("| model | B / GPU |")
    assert (out / "bench_step.png").stat().st_size > 0


@pytest.mark.gpu
def test_bench_step_quick_on_gpu_profiles_and_counts_syncs(tmp_path):
    beton = write_beton(tmp_path / "tiny.beton", 48, min_size=72, max_size=97)
    out = tmp_path / "results"
    assert bench_step.main(["--quick", "--out", str(out), "--beton", str(beton)]) == 0

    (r,) = json.loads((out / "bench_step.json").read_text())
    assert r["cuda"] is True and r["errors"] == {} and r["peak_dtype"] == "bf16"
    assert min(r["model_only_img_s"], r["end_to_end_img_s"], r["release_way_img_s"]) > 0
    assert r["syncs_per_step"] == 0  # the step itself never waits for the GPU
    profiles = {p["mode"]: p for p in json.loads((out / "profile_step_vit_tiny.json").read_text())}
    assert set(profiles) == {"model_only", "end_to_end"}
    assert {"GEMM", "InfoNCE", "top-k", "GPU idle"} <= set(profiles["model_only"]["categories"])
    assert "data (DALI)" in profiles["end_to_end"]["categories"]
    assert (out / "profile_step_vit_tiny.md").read_text().startswith("### vit_tiny, B = 5, model only")


# ---- result files: a re-run replaces its own earlier record, and only that ----


def test_bench_prep_save_replaces_the_record_of_the_same_run(tmp_path):
    path = tmp_path / "bench_prep.json"
    record = lambda images, rate: dict(
        machine={"cpu": "X", "usable_cores": 2}, settings={"jpeg_quality": 90}, input={"images": images}, rate=rate
    )
    for r in (record(480, 1.0), record(96, 2.0), record(480, 3.0)):
        bench_prep.save(r, path)
    assert [(r["input"]["images"], r["rate"]) for r in json.loads(path.read_text())] == [(96, 2.0), (480, 3.0)]


def test_bench_loader_save_replaces_the_record_of_the_same_run(tmp_path):
    path = tmp_path / "bench_loader.json"
    record = lambda pipeline, batch, rate: dict(
        pipeline=pipeline, device="X", cpu_cores=2, batch_size=batch, input={"images": 8}, img_s=rate
    )
    bench_loader.save([record("dali-cpu", 16, 1.0), record("reference", 16, 2.0)], path)
    bench_loader.save([record("dali-cpu", 16, 3.0), record("dali-cpu", 32, 4.0)], path)
    runs = [(r["pipeline"], r["batch_size"], r["img_s"]) for r in json.loads(path.read_text())]
    assert runs == [("reference", 16, 2.0), ("dali-cpu", 16, 3.0), ("dali-cpu", 32, 4.0)]


# ---- bench_linear ----


def test_bench_linear_quick_on_cpu_writes_a_record_labelled_with_the_cpu(tmp_path):
    beton = write_beton(tmp_path / "tiny.beton", 11, min_size=72, max_size=97)
    out = tmp_path / "bench_linear.json"
    assert bench_linear.main([str(beton), "--quick", "--out", str(out)]) == 0

    (r,) = json.loads(out.read_text())
    assert r["device"].startswith("cpu (") and r["cuda"] is False and r["quick"] is True and r["arch"] == "vit_tiny"
    assert r["extraction"]["images"] == 11 and r["extraction"]["img_s"] > 0 and r["extraction"]["feature_dim"] == 768
    assert (r["sweep"]["classifiers"], r["sweep"]["epochs"], r["sweep"]["rows"]) == (20, 1, 512)
    assert r["imagenet"]["total_s"] > 0 and [t["met"] for t in r["targets"]] == [None, None]
    assert "Linear probe" not in readme_results.render(tmp_path, tmp_path)  # smoke runs are never published
    out.write_text(json.dumps([{**r, "quick": False}]))
    section = readme_results.render(tmp_path, tmp_path).split("### Linear probe")[1]
    assert "| vit_tiny | cpu (" in section and "not judged here" in section


def _linear_record(device: str, arch: str = "vit_small", img_s: float = 6000.0, total_s: float = 500.0) -> dict:
    return {"device": device, "cuda": not device.startswith("cpu"), "arch": arch, "quick": False,
            "extraction": {"img_s": img_s}, "imagenet": {"total_s": total_s}}  # fmt: skip


def test_bench_linear_scales_the_sweep_to_imagenet_and_judges_vit_s_on_h100_class_gpus_only():
    estimate = bench_linear.imagenet_estimate({"img_s": 10_000.0}, {"us_per_row_epoch": 2.0, "classes": 100})
    assert estimate["extraction_s"] == round((1_281_167 + 50_000) / 10_000, 1)
    assert estimate["sweep_s"] == round(2e-6 * 0.9 * 1_281_167 * 100 * 10, 1)  # 100 epochs, 1000 / 100 classes
    assert [t["met"] for t in bench_linear.verdicts(_linear_record("NVIDIA H200"))] == [True, True]
    assert [t["met"] for t in bench_linear.verdicts(_linear_record("NVIDIA H100 80GB HBM3", img_s=4000.0))] == [
        False,
        True,
    ]
    for record in (_linear_record("NVIDIA A100-SXM4-80GB"), _linear_record("NVIDIA H200", arch="vit_base"),
                   _linear_record("cpu (AMD EPYC)")):  # fmt: skip
        assert [t["met"] for t in bench_linear.verdicts(record)] == [None, None]


def test_bench_linear_save_replaces_the_record_of_the_same_run(tmp_path):
    path = tmp_path / "bench_linear.json"
    record = lambda arch, rows, rate: dict(
        device="X", arch=arch, quick=False, sweep={"rows": rows}, input={"images": 8}, rate=rate
    )
    for r in (record("vit_small", 64, 1.0), record("vit_base", 64, 2.0), record("vit_small", 64, 3.0)):
        bench_linear.save(r, path)
    assert [(r["arch"], r["rate"]) for r in json.loads(path.read_text())] == [("vit_base", 2.0), ("vit_small", 3.0)]


def test_the_benchmarks_generated_beton_holds_every_image(tmp_path):
    # run_all and bench_step make their input with bench_prep's generator, in one process per share
    beton = bench_step.make_beton(tmp_path / "gen.beton", 11, 2)
    from mugs_fast.data.beton import BetonReader

    assert len(BetonReader(beton)) == 11 and not (tmp_path / "gen-jpegs").exists()
