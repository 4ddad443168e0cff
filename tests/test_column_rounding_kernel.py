"""The codebook-rounding kernel against :func:`vqad_nerfstudio.rounding.rounded_columns`, bit for bit (a file decodes
what training read), and a store's step reading it.

These run where CUDA and Triton are present, or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import pytest
import torch

from vqad_nerfstudio.encodings import vertex_features
from vqad_nerfstudio.fields.quantized_linear import QuantizedConvTranspose2d, QuantizedLinear
from vqad_nerfstudio.kernels import column_rounding
from vqad_nerfstudio.rounding import rounded_columns, rounded_rows

from kernel_device import DEVICE, needs_kernel

pytestmark = needs_kernel


def _codebooks(count: int, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Random codebooks with the cases rounding can get wrong: values on the halfway points of their column's grid
    (they go to the even level), a zero column (the smallest fp16 scale) and a column whose peak divides exactly."""
    generator = torch.Generator().manual_seed(seed)
    books = torch.randn(count, rows, cols, generator=generator) * torch.rand(count, 1, cols, generator=generator)
    if rows >= 4 and cols >= 3:
        books[:, :, 0] = 0.0
        books[:, 0, 1] = 7.0  # the peak: with 4 bits (q = 7) the scale is exactly 1
        books[:, 1:4, 1] = torch.tensor([0.5, 1.5, -2.5])  # halfway: 0, 2, -2 (torch.round's halves to even)
    return books.to(DEVICE)


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 256, 16), (2, 70, 3), (1, 1024, 16), (3, 16, 256)])
def test_the_kernel_rounds_as_the_reference_bit_for_bit(bits, shape) -> None:
    books = _codebooks(*shape)
    got = column_rounding.rounded_columns(books, bits)
    expected = rounded_columns(books, bits)
    assert got.dtype == torch.float32 and got.shape == books.shape
    assert torch.equal(got, expected)
    if shape[1] >= 4 and shape[2] >= 3 and bits == 4:
        assert got[0, :4, 1].tolist() == [7.0, 0.0, 2.0, -2.0]


def test_a_single_codebook_and_an_empty_one() -> None:
    book = _codebooks(1, 256, 16)[0]
    assert torch.equal(column_rounding.rounded_columns(book, 6), rounded_columns(book, 6))
    empty = torch.zeros(0, 256, 16, device=DEVICE)
    assert column_rounding.rounded_columns(empty, 6).shape == (0, 256, 16)


def test_bad_bits_and_unsupported_matrices_are_refused() -> None:
    with pytest.raises(ValueError, match="2..8 bits, got 9"):
        column_rounding.rounded_columns(_codebooks(1, 4, 4), 9)
    assert not column_rounding.available(_codebooks(1, 4, 4).double())
    assert not column_rounding.available(torch.zeros(4, column_rounding.MAX_COLUMNS + 1, device=DEVICE))
    assert not column_rounding.available(torch.zeros(4, device=DEVICE))


@pytest.mark.parametrize("bits", [2, 7, 8])
@pytest.mark.parametrize("shape", [(64, 35), (1, 1), (16, 64), (256, 3), (8, 4, 3, 3)])
def test_weights_are_rounded_by_rows_as_the_reference_bit_for_bit(bits, shape) -> None:
    """Decoder weights (linear ``[out, in]``, transposed convolutions ``[in, out, h, w]``) rounded per row of their
    2-d flattening, halfway points and an all-zero row among them (the columns of :func:`_codebooks`)."""
    weight = _codebooks(1, int(torch.tensor(shape[1:]).prod()), shape[0], seed=bits)[0].t().reshape(shape)
    assert column_rounding.rows_available(weight)
    got = column_rounding.rounded_rows(weight, bits)
    assert got.shape == weight.shape and got.is_contiguous()
    assert torch.equal(got, rounded_rows(weight, bits))


def test_quantised_layers_round_their_weights_with_the_kernel() -> None:
    """A decoder layer's rounded weight is the kernel's where it runs, and equal to the reference's; weights it
    cannot take (more than MAX_COLUMNS rows) take the reference."""
    torch.manual_seed(0)
    for layer in (QuantizedLinear(35, 64), QuantizedConvTranspose2d(8, 4, 3), QuantizedLinear(3, 300)):
        layer = layer.to(DEVICE)
        layer.bits = 7
        layer.hold_rounding(True)
        assert torch.equal(layer._held, rounded_rows(layer.weight, 7))
    assert column_rounding.rows_available(torch.zeros(64, 35, device=DEVICE))
    assert not column_rounding.rows_available(torch.zeros(column_rounding.MAX_COLUMNS + 1, 3, device=DEVICE))
    assert not column_rounding.rows_available(torch.zeros(4, device=DEVICE))


def test_held_codebooks_are_rounded_by_the_kernel_as_by_the_reference(monkeypatch) -> None:
    """prepare_held_steps rounds a grid's codebooks with one launch where the stores use kernels, and the
    codebooks lookups read are those of the reference; stores without kernels keep the reference."""
    stores = []
    for use_kernels in (True, True, False):
        store = vertex_features.CodebookFeatures(64, 4, 8, codebook_init_std=0.5, use_kernels=use_kernels)
        store.codebook_bits = 6
        stores.append(store.to(DEVICE).train())
    calls = []
    kernel = column_rounding.rounded_columns
    monkeypatch.setattr(column_rounding, "rounded_columns", lambda *args: calls.append(args[0].shape) or kernel(*args))
    for store in stores:
        store.hold_indices(True)
    vertex_features.prepare_held_steps(stores)
    assert calls == [(2, 16, 8)]
    for store in stores:
        torch.testing.assert_close(store.lookup_codebook(), rounded_columns(store.codebook, 6), rtol=0, atol=0)


def test_transposed_storage_holds_the_same_values_for_column_reads() -> None:
    books = _codebooks(3, 256, 16)
    got = column_rounding.rounded_columns(books, 6, transposed_storage=True)
    assert got.shape == books.shape and not got.is_contiguous() and got.transpose(-1, -2).is_contiguous()
    assert torch.equal(got, rounded_columns(books, 6))


def test_a_training_steps_codebook_reaches_the_adam_kernel_without_a_copy() -> None:
    """Held codebooks are stored transposed: the logits' gradient kernel's ``[k, c]`` operand is a view of them, and
    the codeword table reads them as they are."""
    from vqad_nerfstudio.kernels import relaxed_indices

    store = vertex_features.CodebookFeatures(300, 8, 16, logit_init_std=3.0, codebook_init_std=0.5)
    store.codebook_bits = 6
    store = store.to(DEVICE).train()
    store.hold_indices(True)
    vertex_features.prepare_held_steps([store])
    codebook = store.lookup_codebook()
    _, codebook_t, _ = relaxed_indices._gradient_terms(
        store.logits, torch.zeros(300, 16, device=DEVICE), codebook, None
    )
    assert codebook_t.data_ptr() == codebook.data_ptr()
    hard = store.hard_indices()
    assert torch.equal(relaxed_indices.codeword_table(hard, codebook), codebook.index_select(0, hard))
    with torch.no_grad():
        table = store.table()
    assert torch.equal(table, rounded_columns(store.codebook, 6).index_select(0, hard))
    store.hold_indices(False)
