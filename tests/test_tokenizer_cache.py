"""The embedded tokenizer's pickle (workbench.lm.embedded_tokenizer): the same tokenizer as transformers loads, written
once, read after, rebuilt when broken, skipped when it cannot be written; and TransformerLens keeps it (no reload)."""
import os
import shutil

import pytest
import transformers

import evals  # noqa: F401  (registers the evals with the config loader)
import trainers  # noqa: F401
from workbench import lm
from workbench.config import load_config
from workbench.text import documents

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A directory with the embedded checkpoint's tokenizer files only (the weights are not needed)."""
    source = lm.embedded_checkpoint(load_config("run_configs/quickstart.toml").model)
    target = tmp_path_factory.mktemp("tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(source / name, target / name)
    return target


@pytest.fixture(scope="module")
def text():
    cfg = load_config("run_configs/quickstart.toml")
    return "\n".join(doc for doc, _ in zip(documents(cfg.data, held_out=True, seed=0), range(20)))


def pickles(path):
    return sorted(p.name for p in path.iterdir() if p.suffix in (".pkl", ".tmp"))


def assert_same(tok, ref, text):
    assert type(tok) is type(ref)
    assert tok.backend_tokenizer.to_str() == ref.backend_tokenizer.to_str()
    assert tok.init_kwargs == ref.init_kwargs and tok.init_kwargs["add_bos_token"] is True
    assert tok.special_tokens_map == ref.special_tokens_map and tok.padding_side == ref.padding_side
    ids = ref(text).input_ids
    assert len(ids) > 1000 and ids[0] == ref.bos_token_id
    assert tok(text).input_ids == ids
    assert tok(text, add_special_tokens=False).input_ids == ref(text, add_special_tokens=False).input_ids


def test_the_pickle_is_written_once_then_read_and_is_the_same_tokenizer(checkpoint, text, monkeypatch):
    ref = transformers.AutoTokenizer.from_pretrained(checkpoint, local_files_only=True, add_bos_token=True)
    for p in checkpoint.glob("*.pkl"):
        p.unlink()
    first = lm.embedded_tokenizer(checkpoint)
    written = pickles(checkpoint)
    assert len(written) == 1 and transformers.__version__ in written[0]  # one pickle, no temporary left
    assert_same(first, ref, text)

    def no_slow_load(*args, **kwargs):
        raise AssertionError("the pickle was there: transformers must not load the tokenizer")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_slow_load)
    assert_same(lm.embedded_tokenizer(checkpoint), ref, text)


def test_a_broken_pickle_is_rebuilt(checkpoint, text):
    ref = lm.embedded_tokenizer(checkpoint)
    (pickled,) = checkpoint.glob("*.pkl")
    pickled.write_bytes(b"not a pickle")
    assert_same(lm.embedded_tokenizer(checkpoint), ref, text)
    assert pickled.stat().st_size > 1_000_000 and pickles(checkpoint) == [pickled.name]


def test_a_pickle_that_cannot_be_written_is_skipped(checkpoint, text, monkeypatch):
    ref = lm.embedded_tokenizer(checkpoint)
    for p in checkpoint.glob("*.pkl"):
        p.unlink()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # the temporary file is written, then the disk is full
    assert_same(lm.embedded_tokenizer(checkpoint), ref, text)
    assert pickles(checkpoint) == []  # neither the pickle nor its temporary


def test_transformer_lens_keeps_the_tokenizer_it_is_given(monkeypatch):
    """HookedTransformer.set_tokenizer loads the tokenizer again unless it adds BOS; the pickled one does, so load_lm
    loads no tokenizer through transformers once the pickle exists."""
    cfg = load_config("run_configs/quickstart.toml", ["model.dtype=float32"])
    lm.embedded_tokenizer(lm.embedded_checkpoint(cfg.model))  # the pickle exists from here
    calls = []
    real = transformers.AutoTokenizer.from_pretrained.__func__
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        classmethod(lambda cls, *a, **kw: calls.append(a) or real(cls, *a, **kw)))
    model = lm.load_lm(cfg.model)
    assert calls == []
    assert model.tokenizer.init_kwargs["add_bos_token"] is True
    assert model.to_tokens("The cat sat.")[0].tolist() == model.tokenizer("The cat sat.").input_ids
    assert model.to_tokens("The cat sat.")[0, 0].item() == model.tokenizer.bos_token_id
