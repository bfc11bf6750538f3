"""Symmetric products on their upper block staircase (Newton-Schulz's m x m products): equal to the full
product in float64, the lower blocks mirrored, and the iteration built on them equal to the standard form."""

import pytest
import torch


def assert_mirrored(c, bounds):
    """Every block below the diagonal blocks is the transpose of its mirror block (bit for bit)."""
    for lo, hi in zip(bounds[1:-1], bounds[2:]):
        assert torch.equal(c[:, lo:hi, :lo], c[:, :lo, lo:hi].mT)

from deepopt.levels.orthogonal import symmetric
from deepopt.levels.orthogonal.batched import (_use_symmetric, gram_newton_schulz, newton_schulz_batched,
                                               ns_flops)
from deepopt.levels.orthogonal.symmetric import block_bounds, flop_fraction, symmetric_baddbmm


@pytest.mark.parametrize("m,blocks", [(8, 1), (8, 3), (70, 2), (200, 4), (256, 4), (130, 7)])
def test_block_bounds_cover_the_rows_in_increasing_order(m, blocks):
    b = block_bounds(m, blocks)
    assert b[0] == 0 and b[-1] == m and all(x < y for x, y in zip(b, b[1:]))
    assert len(b) - 1 == min(blocks, m)
    if m >= 64 * blocks:
        assert all(x % 64 == 0 for x in b[1:-1])  # tensor-core tiles
    assert block_bounds(2048) == [0, 512, 1024, 1536, 2048] and block_bounds(511) == [0, 511]
    with pytest.raises(ValueError, match="blocks"):
        block_bounds(8, 0)


def test_flop_fraction():
    assert flop_fraction(2048) == 0.625 and flop_fraction(1024) == 0.75 and flop_fraction(300) == 1.0
    assert flop_fraction(9, 3) == pytest.approx((3 + 1) / (2 * 3))


@pytest.mark.parametrize("blocks", [1, 2, 3, 5])
def test_symmetric_product_equals_the_full_product(blocks):
    torch.manual_seed(0)
    x = torch.randn(3, 40, 90, dtype=torch.float64)
    full = x @ x.mT
    c = symmetric_baddbmm(x, x, alpha=0.5, blocks=blocks)
    torch.testing.assert_close(c, 0.5 * full, rtol=0, atol=1e-12)
    assert_mirrored(c, block_bounds(40, blocks))
    # a product of two commuting symmetric matrices (polynomials in one A), with an added symmetric term
    a = full / full.norm(dim=(-2, -1), keepdim=True)
    b = 2.0 * a + 3.0 * a @ a
    c = symmetric_baddbmm(b, a.mT, alpha=1.5, beta=-0.7, add=a, blocks=blocks)
    torch.testing.assert_close(c, -0.7 * a + 1.5 * b @ a, rtol=0, atol=1e-12)
    assert_mirrored(c, block_bounds(40, blocks))
    # transposed views (the tall orientation's X = x^T) and beta = 0 ignore a NaN in add
    xt = torch.randn(3, 90, 40, dtype=torch.float64).mT
    nan = torch.full((3, 40, 40), float("nan"), dtype=torch.float64)
    torch.testing.assert_close(symmetric_baddbmm(xt, xt, add=nan, beta=0.0, blocks=blocks), xt @ xt.mT,
                               rtol=0, atol=1e-12)


def test_symmetric_product_reads_add_on_its_staircase_only():
    x = torch.randn(2, 16, 8, dtype=torch.float64)
    a = x @ x.mT
    block = torch.arange(16) // 4  # blocks=4: rows 0-3, 4-7, ...
    lower_garbage = a + 1e6 * (block[:, None] > block[None, :])
    torch.testing.assert_close(symmetric_baddbmm(x, x, beta=2.0, add=lower_garbage, blocks=4), 2 * a + a,
                               rtol=0, atol=1e-10)


def test_symmetric_product_rejects_bad_shapes():
    x = torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match="left and right"):
        symmetric_baddbmm(x, torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match="add must be"):
        symmetric_baddbmm(x, x, add=torch.randn(2, 8, 7), beta=1.0)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 16 rows (the default 512 would give one block at these sizes)."""
    monkeypatch.setattr(symmetric, "BLOCK_ROWS", 16)


@pytest.mark.parametrize("tall", [False, True])
@pytest.mark.parametrize("cols", [48, 160])
def test_iterations_on_symmetric_products_equal_the_standard_form_in_float64(small_blocks, tall, cols):
    torch.manual_seed(1)
    x = torch.randn(3, 48, cols, dtype=torch.float64)
    x = x.mT.contiguous() if tall else x
    ref = newton_schulz_batched(x, method="standard")
    std = newton_schulz_batched(x, method="standard", symmetric=True)
    gram = gram_newton_schulz(x, symmetric=True)
    assert len(block_bounds(48)) - 1 == 3
    torch.testing.assert_close(std, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(gram, ref, rtol=0, atol=1e-12)
    assert std.shape == gram.shape == x.shape and gram.is_contiguous()


def test_symmetric_products_keep_the_16_bit_rounding_error(small_blocks):
    """In bf16 (standard form) and float16 (Gram form) the staircase rounds each entry as the full
    product does: the error against float64 stays within 10% of the full products'."""
    torch.manual_seed(2)
    x = torch.randn(4, 64, 256, dtype=torch.float64)
    ref = newton_schulz_batched(x, method="standard")
    x16 = x.bfloat16()

    def err(o):
        return float((o.double() - ref).norm() / ref.norm())

    for form in (lambda s: newton_schulz_batched(x16, method="standard", symmetric=s),
                 lambda s: gram_newton_schulz(x16, symmetric=s)):
        assert err(form(True)) <= 1.1 * err(form(False))


def test_dispatch_and_flops():
    assert _use_symmetric("auto", "cuda") and _use_symmetric("gram", "cuda") and _use_symmetric("auto")
    assert not _use_symmetric("standard", "cuda") and not _use_symmetric("auto", "cpu")
    m = 2048
    assert ns_flops(m, m, method="standard") == 5 * 6 * m**3
    assert ns_flops(m, m, method="auto") == 5 * (2 * m**3 * 1.625 + 2 * m**3 * 0.625)  # 0.75x
    assert ns_flops(m, 4 * m, method="auto") == 6.5 * m * m * 4 * m + 17.5 * m**3
