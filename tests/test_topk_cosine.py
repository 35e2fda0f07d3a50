"""kernels.topk_cosine: the reference against float64 maths, the Triton kernel (under the interpreter without a GPU)
against the reference, the PyTorch path, dispatch and input errors. Full Mugs sizes run on a GPU only."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA

import kernels
from kernels import dispatch

op = importlib.import_module("kernels.topk_cosine")  # the module: `kernels.topk_cosine` is the function

DEVICE = "cuda" if HAS_CUDA else "cpu"


def cosine64(queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """(Q, N) cosine similarities in float64, written out (a zero row has similarity 0, as with F.normalize)."""
    q, m = queries.double(), memory.double()
    return (q @ m.T) / (q.norm(dim=1).clamp_min(1e-12)[:, None] * m.norm(dim=1).clamp_min(1e-12)[None, :])


def check_topk(sims, idx, queries, memory, k, n_valid, atol):
    """What a correct top-k returns, ties allowed: distinct in-range indices whose true cosines are the returned values
    and the reference's top-k values (so the k-th is not below the reference's k-th)."""
    exact = cosine64(queries, memory[:n_valid])  # (Q, n_valid)
    ref_vals = exact.topk(k, dim=1).values
    assert sims.shape == idx.shape == (queries.shape[0], k)
    assert sims.dtype == torch.float32 and idx.dtype == torch.int64
    assert ((idx >= 0) & (idx < n_valid)).all()
    assert all(len(set(row.tolist())) == k for row in idx), "indices repeat within a row"
    assert (sims[:, :-1] >= sims[:, 1:]).all(), "similarities not sorted descending"
    torch.testing.assert_close(sims.double(), exact.gather(1, idx), atol=atol, rtol=0)
    torch.testing.assert_close(sims.double(), ref_vals, atol=atol, rtol=0)


def make_memory(n, d, dtype=torch.float32, duplicates=True, seed=0):
    """Unnormalised memory rows; with `duplicates`, some rows repeat others exactly or scaled (cosine ties)."""
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(n, d, generator=g) * (0.5 + torch.rand(n, 1, generator=g))
    if duplicates:
        memory[n // 2 : n // 2 + 5] = memory[3:8]
        memory[n - 3] = 4.0 * memory[1]
    return memory.to(dtype)


# ---------------------------------------------------------------- reference


def test_reference_matches_float64():
    queries, memory = torch.randn(6, 10, dtype=torch.float64), make_memory(30, 10, torch.float64, duplicates=False)
    exact = cosine64(queries, memory)
    for dtype, atol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        sims, idx = kernels.topk_cosine_ref(queries.to(dtype), memory.to(dtype), 4)
        expected = exact.topk(4, dim=1)
        torch.testing.assert_close(sims.double(), expected.values, atol=atol, rtol=0)
        # the rows found are the best ones (their exact cosines are the top-k); near-ties may come in either order
        torch.testing.assert_close(exact.gather(1, idx), expected.values, atol=atol, rtol=0)
        assert sims.dtype == torch.promote_types(dtype, torch.float32)


def test_reference_n_valid_searches_the_first_rows_only():
    queries = torch.randn(4, 8)
    memory = torch.cat([torch.randn(20, 8), queries])  # rows 20.. would be the best matches
    sims, idx = kernels.topk_cosine_ref(queries, memory, 3, n_valid=20)
    assert (idx < 20).all()
    check_topk(sims, idx, queries, memory, 3, 20, atol=1e-6)


def test_torch_path_chunks_match_the_reference():
    queries, memory = torch.randn(23, 12), make_memory(50, 12, duplicates=False)
    sims, idx = kernels.topk_cosine_ref(queries, memory, 5, n_valid=41, chunk_elems=41 * 4)  # 6 blocks of 4 queries
    ref_sims, _ = kernels.topk_cosine_ref(queries, memory, 5, n_valid=41)
    torch.testing.assert_close(sims, ref_sims)
    check_topk(sims, idx, queries, memory, 5, 41, atol=1e-6)  # indices: any order of near-ties is right


# ---------------------------------------------------------------- Triton kernel


@pytest.mark.parametrize(
    "rows, n, dim, k, n_valid",
    [
        (37, 203, 48, 8, None),  # rows, N and D not multiples of the tiles
        (20, 300, 40, 16, 150),  # partly filled memory, k = 16
        (5, 100, 32, 1, None),  # k = 1
        (9, 64, 16, 16, 16),  # k = n_valid: every valid row is returned
    ],
)
def test_triton_matches_reference(triton_path, rows, n, dim, k, n_valid):
    queries = torch.randn(rows, dim, generator=torch.Generator().manual_seed(1)) * 3.0
    memory = make_memory(n, dim)
    sims, idx = kernels.topk_cosine(queries.to(DEVICE), memory.to(DEVICE), k, n_valid)
    atol = 5e-3 if HAS_CUDA else 1e-5  # TF32 dots on the GPU
    check_topk(sims.cpu(), idx.cpu(), queries, memory, k, n_valid or n, atol)


@pytest.mark.parametrize("q_dtype, m_dtype", [(torch.float32, torch.bfloat16), (torch.float16, torch.float16)])
def test_triton_low_precision_inputs(triton_path, q_dtype, m_dtype):
    """The Mugs case: an L2-normalised 16-bit memory shadow, queries in any dtype."""
    queries = torch.randn(19, 40).to(q_dtype)
    memory = F.normalize(make_memory(150, 40), dim=1).to(m_dtype)
    sims, idx = kernels.topk_cosine(queries.to(DEVICE), memory.to(DEVICE), 8)
    atol = 2e-2 if HAS_CUDA else 1e-5  # the interpreter computes the 16-bit inputs in fp32
    check_topk(sims.cpu(), idx.cpu(), queries.float(), memory.float(), 8, 150, atol)


def test_triton_n_valid_ignores_the_rest(triton_path):
    queries = torch.randn(7, 24)
    memory = torch.cat([make_memory(70, 24), queries, queries])  # rows >= 70 are perfect matches, but not valid
    sims, idx = kernels.topk_cosine(queries.to(DEVICE), memory.to(DEVICE), 4, n_valid=70)
    assert (idx < 70).all()
    check_topk(sims.cpu(), idx.cpu(), queries, memory, 4, 70, atol=5e-3 if HAS_CUDA else 1e-5)


def test_triton_zero_rows_have_zero_similarity(triton_path):
    queries, memory = torch.randn(3, 16), torch.zeros(40, 16)
    memory[:5] = torch.randn(5, 16)
    sims, idx = kernels.topk_cosine(queries.to(DEVICE), memory.to(DEVICE), 8)
    assert torch.isfinite(sims).all()
    check_topk(sims.cpu(), idx.cpu(), queries, memory, 8, 40, atol=5e-3 if HAS_CUDA else 1e-5)


# ---------------------------------------------------------------- dispatch and errors


def test_cpu_dispatch_takes_the_torch_path_without_raising(monkeypatch):
    monkeypatch.delenv("MUGS_KERNELS", raising=False)
    called = []
    monkeypatch.setattr(op, "_topk_cosine_triton", lambda *a: called.append(a))
    sims, idx = kernels.topk_cosine(torch.randn(4, 8), torch.randn(30, 8), 3)
    assert not called and sims.shape == (4, 3)
    assert HAS_CUDA or not dispatch.triton_gpu_ready()


def test_forced_torch_path_and_unknown_mode(monkeypatch):
    monkeypatch.setenv("MUGS_KERNELS", "torch")
    monkeypatch.setattr(op, "_topk_cosine_triton", lambda *a: pytest.fail("took the Triton path"))
    kernels.topk_cosine(torch.randn(4, 8).to(DEVICE), torch.randn(30, 8).to(DEVICE), 3)
    monkeypatch.setenv("MUGS_KERNELS", "cuda")
    with pytest.raises(ValueError, match="MUGS_KERNELS"):
        kernels.topk_cosine(torch.randn(4, 8), torch.randn(30, 8), 3)


def test_use_sets_the_mode_of_its_block_over_the_environment(monkeypatch):
    monkeypatch.setenv("MUGS_KERNELS", "triton")
    monkeypatch.setattr(op, "_topk_cosine_triton", lambda *a: pytest.fail("took the Triton path"))
    with kernels.use("torch"):
        kernels.topk_cosine(torch.randn(4, 8).to(DEVICE), torch.randn(30, 8).to(DEVICE), 3)
        with kernels.use("auto"):
            assert dispatch.kernel_mode() == "auto"
        assert dispatch.kernel_mode() == "torch"
    assert dispatch.kernel_mode() == "triton"  # the environment's again


def test_use_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match=r"kernels.use\('cuda'\): expected one of auto, triton, torch"):
        with kernels.use("cuda"):
            pass


@pytest.mark.skipif(HAS_CUDA, reason="CPU tensors")
def test_forced_triton_without_interpreter_names_what_forced_it(monkeypatch):
    monkeypatch.delenv("MUGS_KERNELS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"kernels.use\('triton'\) but Triton cannot run"), kernels.use("triton"):
        kernels.topk_cosine(torch.randn(4, 8), torch.randn(30, 8), 3)


@pytest.mark.skipif(HAS_CUDA, reason="CPU tensors")
def test_forced_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("MUGS_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="Triton cannot run"):
        kernels.topk_cosine(torch.randn(4, 8), torch.randn(30, 8), 3)


@pytest.mark.parametrize(
    "q_shape, m_shape, k, n_valid, error, match",
    [
        ((4, 8), (30, 9), 3, None, ValueError, "expected queries"),
        ((4, 8, 1), (30, 8), 3, None, ValueError, "expected queries"),
        ((4, 8), (30, 8), 11, 10, ValueError, "k=11"),
        ((4, 8), (30, 8), 0, None, ValueError, "k=0"),
        ((4, 8), (30, 8), 3, 31, ValueError, "n_valid=31"),
        ((4, 8), (30, 8), 3, 0, ValueError, "n_valid=0"),
    ],
)
def test_bad_inputs(q_shape, m_shape, k, n_valid, error, match):
    with pytest.raises(error, match=match):
        kernels.topk_cosine(torch.randn(q_shape), torch.randn(m_shape), k, n_valid)


def test_bad_dtype():
    with pytest.raises(TypeError, match="float tensors"):
        kernels.topk_cosine(torch.randn(4, 8), torch.ones(30, 8, dtype=torch.int64), 3)


def test_k_above_16_is_an_error_on_the_triton_path_only(triton_path):
    queries, memory = torch.randn(4, 8).to(DEVICE), torch.randn(40, 8).to(DEVICE)
    with pytest.raises(ValueError, match="k=17 > 16"):
        kernels.topk_cosine(queries, memory, 17)
    with kernels.use("torch"):
        assert kernels.topk_cosine(queries, memory, 17)[1].shape == (4, 17)


def test_empty_queries():
    sims, idx = kernels.topk_cosine(torch.randn(0, 8), torch.randn(30, 8), 3)
    assert sims.shape == idx.shape == (0, 3) and idx.dtype == torch.int64


# ---------------------------------------------------------------- GPU, full Mugs sizes


@pytest.mark.gpu
@pytest.mark.parametrize("rows, dim, n_valid", [(14 * 128, 384, None), (2 * 128, 768, 40_000), (14 * 64, 1024, None)])
def test_gpu_mugs_sizes(monkeypatch, rows, dim, n_valid):
    """A normalised bf16 memory shadow of 65,536 rows, k = 8: values within bf16 accuracy of the fp32 search,
    indices that differ only among near-ties."""
    monkeypatch.delenv("MUGS_KERNELS", raising=False)
    g = torch.Generator(device="cuda").manual_seed(0)
    memory = torch.randn(65536, dim, device="cuda", generator=g)
    shadow = F.normalize(memory, dim=1).bfloat16()
    queries = torch.randn(rows, dim, device="cuda", generator=g) + memory[:rows]  # real neighbours exist
    sims, idx = kernels.topk_cosine(queries, shadow, 8, n_valid)
    ref_sims, _ = kernels.topk_cosine_ref(queries, memory, 8, n_valid)
    n = n_valid or memory.shape[0]
    assert ((idx >= 0) & (idx < n)).all() and (idx.sort(dim=1).values.diff(dim=1) > 0).all()
    torch.testing.assert_close(sims, ref_sims, atol=1e-2, rtol=0)
    true_sims = F.cosine_similarity(queries[:, None].double(), memory[idx].double(), dim=-1)  # (Q, 8)
    torch.testing.assert_close(sims.double(), true_sims, atol=1e-2, rtol=0)
