"""Records to training examples: prompt masked, truncated, optionally packed.

An example is ``[BOS] prompt response [EOS]``; the labels are -100 over BOS and
the prompt, so the loss covers the response and the EOS only. The prompt and the
response are tokenized as one text, as inference sees them, and masked by where
the prompt ends: tokenized apart, a SentencePiece tokenizer (LLaMA 1 and 2) would
put a prefix-space token before the response that generation never produces.

Packing concatenates examples into one ``max_seq_len`` row with ``position_ids``
restarting at 0 for each example and no attention mask. transformers turns such
position ids into a block-diagonal causal mask (``find_packed_sequence_indices``
in ``masking_utils``), so no token attends across an example boundary.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

from raytune_it.data.prompt_format import PromptFormat

IGNORE_INDEX = -100
#: Batches are right-padded to a multiple of this many tokens (tensor-core friendly widths).
PAD_TO_MULTIPLE_OF = 8


@dataclass
class TokenizeStats:
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    max_length: int = 0
    truncated: int = 0
    #: Examples whose whole response fell past max_seq_len: nothing left to train on.
    dropped_no_response: int = 0

    @property
    def mean_length(self) -> float:
        return self.tokens / self.examples if self.examples else 0.0

    def add(self, length: int, trained: int, truncated: bool) -> None:
        self.examples += 1
        self.tokens += length
        self.trained_tokens += trained
        self.max_length = max(self.max_length, length)
        self.truncated += int(truncated)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for one batch.

    Tokenizing a batch makes thousands of new lists and dicts, so the collector runs every few hundred of
    them, and its full passes walk the process's few hundred thousand long-lived objects (transformers,
    torch) to find nothing: tokenizing makes no reference cycles. That was a sixth of a chunk's time, on
    both preparation paths. Reference counting still frees everything, and the collector, back on after
    the batch, still collects what cycles other code makes."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def tokenize_records(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_seq_len: int,
    stats: TokenizeStats | None = None,
    chat_template: str | None = None,
) -> list[dict[str, list[int]]]:
    """Tokenize a batch of records at once (the fast tokenizer runs the batch in Rust threads), rendered
    by the run's prompt format (``prompt_format.PromptFormat``): Alpaca records without a ``chat_template``
    get the Alpaca prompt; conversations, and Alpaca records with a template, are rendered with the template
    and train every assistant turn (``data.chat``)."""
    with collector_paused():
        return _tokenize(records, tokenizer, max_seq_len, stats, chat_template)


def _tokenize(records: Sequence[Mapping[str, Any]], tokenizer: Any, max_seq_len: int, stats: TokenizeStats | None,
              chat_template: str | None) -> list[dict[str, list[int]]]:
    prompt_format = PromptFormat(tokenizer, chat_template)
    eos = [tokenizer.eos_token_id]
    ids, trained_spans = prompt_format.training_ids(records)
    out = []
    for text_ids, spans in zip(ids, trained_spans):
        prefix = prompt_format.bos(text_ids)  # a template that writes BOS itself has it already
        input_ids = prefix + text_ids + eos
        labels = [IGNORE_INDEX] * (len(prefix) + len(text_ids)) + eos
        for start, end in spans:  # list slices, not a Python step per token
            labels[len(prefix) + start:len(prefix) + end] = text_ids[start:end]
        truncated = len(input_ids) > max_seq_len
        input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
        trained = len(labels) - labels.count(IGNORE_INDEX)
        if trained == 0:
            if stats is not None:
                stats.dropped_no_response += 1
            continue
        if stats is not None:
            stats.add(len(input_ids), trained, truncated)
        out.append({"input_ids": input_ids, "labels": labels})
    return out


def pack_examples(examples: Iterable[Mapping[str, list[int]]], max_seq_len: int) -> Iterator[dict[str, list[int]]]:
    """Greedily fill rows of up to max_seq_len tokens; each example keeps its own positions."""
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        length = len(example["input_ids"])
        if row["input_ids"] and len(row["input_ids"]) + length > max_seq_len:
            yield row
            row = {"input_ids": [], "labels": [], "position_ids": []}
        row["input_ids"].extend(example["input_ids"])
        row["labels"].extend(example["labels"])
        row["position_ids"].extend(range(length))
    if row["input_ids"]:
        yield row


def collate(batch: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int,
            pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF) -> dict:
    """Right-pad a batch into tensors.

    Packed rows (with position_ids) get padding as one more segment and no
    attention mask; plain rows get an attention mask.
    """
    import torch

    longest = max(len(item["input_ids"]) for item in batch)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    packed = "position_ids" in batch[0]
    input_ids, labels, positions, mask = [], [], [], []
    for item in batch:
        pad = width - len(item["input_ids"])
        input_ids.append(list(item["input_ids"]) + [pad_token_id] * pad)
        labels.append(list(item["labels"]) + [IGNORE_INDEX] * pad)
        if packed:
            positions.append(list(item["position_ids"]) + list(range(pad)))
        else:
            mask.append([1] * len(item["input_ids"]) + [0] * pad)
    out = {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)}
    if packed:
        out["position_ids"] = torch.tensor(positions)
    else:
        out["attention_mask"] = torch.tensor(mask)
    return out


def collate_arrow(table: Any, pad_token_id: int, pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF) -> dict:
    """``collate`` for an Arrow batch, without a Python object per token.

    The same tensors as ``collate(table.to_pylist(), ...)``, built from the list
    columns' flat values and lengths with numpy: about a tenth of the time, and
    Ray Data runs it in threads that share the GIL with the training step.
    """
    import numpy as np
    import torch

    lengths = np.diff(table.column("input_ids").combine_chunks().offsets.to_numpy())
    width = -(-int(lengths.max()) // pad_to_multiple_of) * pad_to_multiple_of
    columns = np.arange(width)[None, :]
    real = columns < lengths[:, None]
    out = {}
    for name, fill in (("input_ids", pad_token_id), ("labels", IGNORE_INDEX)):
        padded = np.full(real.shape, fill, dtype=np.int64)
        padded[real] = table.column(name).combine_chunks().flatten().to_numpy()
        out[name] = torch.from_numpy(padded)
    if "position_ids" in table.column_names:  # packed rows: the padding is one more segment, no mask
        positions = (columns - lengths[:, None]).astype(np.int64)  # 0, 1, ... over the padding
        positions[real] = table.column("position_ids").combine_chunks().flatten().to_numpy()
        out["position_ids"] = torch.from_numpy(positions)
    else:
        out["attention_mask"] = torch.from_numpy(real.astype(np.int64))
    return out
