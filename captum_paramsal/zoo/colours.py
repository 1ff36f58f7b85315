"""The embedded language model: a small BERT that answers "which colour is mentioned most / least often?"

A synthetic language with a known rule, generated here (nothing is downloaded). A sentence is
``[CLS] most|least w1 ... wn [SEP]``: the question word, then 6 to 14 colour words (red, green,
blue, yellow, each mentioned at least once) with up to 4 filler words (the, a, and, then, of,
with) in between. The answer is one of the four colours:

* ``most``: the colour mentioned most often; among tied colours, the one mentioned **first**;
* ``least``: the colour mentioned least often; among tied colours, the one mentioned **last**
  (whose last mention comes latest).

Counting is easy for a transformer; the tie-breaks are the hard cases (about 30% of the
sentences have a tie, and the two questions break ties in opposite directions). The model, a
two-layer BERT (hidden size 64, 4 heads, 128 MLP neurons per layer), is trained by
:mod:`.train_colours` (deterministic, about a minute on one CPU thread) and shipped next to
this file with reference statistics over the validation split, by heads and neurons.

Examples::

    >>> from captum_paramsal.zoo import load_colours_model
    >>> model, stats, data = load_colours_model()
    >>> batch = data.test
    >>> logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    >>> data.words(batch.input_ids[0])
    ['[CLS]', 'least', 'red', 'blue', ...]
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..stats import SaliencyStats

HERE = os.path.dirname(__file__)
WEIGHTS_FILE = os.path.join(HERE, "colours_bert.safetensors")
STATS_FILE = os.path.join(HERE, "colours_bert_stats.safetensors")

SPECIAL = ("[PAD]", "[CLS]", "[SEP]")
QUESTIONS = ("most", "least")
COLOURS = ("red", "green", "blue", "yellow")
FILLERS = ("the", "a", "and", "then", "of", "with")
VOCAB: Tuple[str, ...] = SPECIAL + QUESTIONS + COLOURS + FILLERS
TOKEN_ID: Dict[str, int] = {word: i for i, word in enumerate(VOCAB)}
PAD, CLS, SEP = 0, 1, 2
#: the longest sentence: [CLS], the question, 14 colours, 4 fillers, [SEP]
MAX_LENGTH = 21
#: sequences are padded to this many positions (the model's position embeddings)
SEQUENCE_LENGTH = 24
#: the three splits, in the order they are drawn from one seeded stream of distinct sentences
SPLIT_SIZES = {"train": 8000, "validation": 2000, "test": 6000}
#: the units the shipped statistics are over
UNITS = ("heads", "neurons")


def answer(words: Sequence[str]) -> str:
    """The rule: the colour a sentence's question asks for (see the module's docstring).

    Args:
        words: the sentence, with or without ``[CLS]`` / ``[SEP]`` / ``[PAD]``.

    Examples::

        >>> answer("most red blue red blue green yellow".split())    # red and blue tied: red came first
        'red'
        >>> answer("least red blue red blue green yellow".split())   # green and yellow tied: yellow came last
        'yellow'
    """
    words = [w for w in words if w not in SPECIAL]
    question = words[0]
    if question not in QUESTIONS:
        raise ValueError(f"a sentence starts with {' or '.join(QUESTIONS)}, got {question!r}")
    mentions = [w for w in words[1:] if w in COLOURS]
    counts = {c: mentions.count(c) for c in COLOURS if c in mentions}
    if question == "most":
        best = max(counts.values())
        tied = [c for c in counts if counts[c] == best]
        return min(tied, key=mentions.index)
    best = min(counts.values())
    tied = [c for c in counts if counts[c] == best]
    return max(tied, key=lambda c: len(mentions) - 1 - mentions[::-1].index(c))


def _below(rng: random.Random, n: int) -> int:
    # only random() is guaranteed to give the same stream on every Python version
    return min(int(rng.random() * n), n - 1)


def _sentence(rng: random.Random) -> List[str]:
    question = QUESTIONS[_below(rng, 2)]
    while True:
        mentions = [COLOURS[_below(rng, 4)] for _ in range(6 + _below(rng, 9))]  # 6 .. 14
        if len(set(mentions)) == len(COLOURS):
            break
    words = list(mentions)
    for _ in range(_below(rng, 5)):  # 0 .. 4 fillers, each at a random gap
        words.insert(_below(rng, len(words) + 1), FILLERS[_below(rng, len(FILLERS))])
    return [question] + words


def encode(words: Sequence[str], length: int = SEQUENCE_LENGTH) -> Tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)``, each ``(length,)``: ``[CLS] words [SEP]`` padded.

    Examples::

        >>> ids, mask = encode("most red blue the red green yellow".split())
    """
    words = [w for w in words if w not in SPECIAL]
    unknown = [w for w in words if w not in TOKEN_ID]
    if unknown:
        raise ValueError(f"unknown words {unknown}; the vocabulary is {list(VOCAB)}")
    ids = [CLS] + [TOKEN_ID[w] for w in words] + [SEP]
    if len(ids) > length:
        raise ValueError(f"{len(ids)} tokens do not fit in {length} positions")
    input_ids = torch.full((length,), PAD, dtype=torch.long)
    input_ids[: len(ids)] = torch.tensor(ids)
    return input_ids, (input_ids != PAD).long()


@dataclass(frozen=True)
class ColourSplit:
    """One split: ``input_ids`` and ``attention_mask`` ``(N, 24)``, ``labels`` ``(N,)`` (colour
    indices), and per sentence ``question`` (0 most, 1 least) and ``tied`` (whether the answer
    needed a tie-break)."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    question: Tensor
    tied: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index) -> ColourSplit:
        """The sentences at ``index`` (an int, slice, index tensor or mask), as a split."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return ColourSplit(*(t[index] for t in self._tensors()))

    def _tensors(self) -> Tuple[Tensor, ...]:
        return self.input_ids, self.attention_mask, self.labels, self.question, self.tied

    def forward_args(self) -> Dict[str, Tensor]:
        """``{"attention_mask": ...}``: what ``additional_forward_args`` takes."""
        return {"attention_mask": self.attention_mask}

    def batches(self, batch_size: int = 500) -> Iterator[Dict[str, Tensor]]:
        """Hugging Face dict batches ``{"input_ids", "attention_mask", "labels"}`` (for ``fit_stats``)."""
        for start in range(0, len(self), batch_size):
            stop = start + batch_size
            yield {
                "input_ids": self.input_ids[start:stop],
                "attention_mask": self.attention_mask[start:stop],
                "labels": self.labels[start:stop],
            }


@dataclass(frozen=True)
class ColoursData:
    """The three splits of the colour-question language (distinct sentences, no sentence in two
    splits), drawn by :func:`colours_data`."""

    train: ColourSplit
    validation: ColourSplit
    test: ColourSplit
    seed: int

    @staticmethod
    def words(input_ids: Tensor) -> List[str]:
        """A sentence's tokens as words, padding left out."""
        return [VOCAB[int(i)] for i in input_ids.flatten() if int(i) != PAD]

    def checksum(self) -> str:
        """sha256 of every split's tensors: the loader compares it with the shipped model's."""
        digest = hashlib.sha256()
        for split in (self.train, self.validation, self.test):
            for tensor in split._tensors():
                digest.update(tensor.to(torch.int64).contiguous().numpy().tobytes())
        return digest.hexdigest()


def colours_data(seed: int = 0, sizes: Optional[Dict[str, int]] = None) -> ColoursData:
    """Draw the splits: one seeded stream of sentences (``random.Random(seed)``, only its
    ``random()``), repeats skipped, cut into train, validation and test in that order.

    Examples::

        >>> data = colours_data()
        >>> len(data.train), len(data.validation), len(data.test)
        (8000, 2000, 6000)
    """
    sizes = {**SPLIT_SIZES, **(sizes or {})}
    rng = random.Random(seed)
    seen = set()
    splits = {}
    for name in ("train", "validation", "test"):
        rows = []
        while len(rows) < sizes[name]:
            words = _sentence(rng)
            key = " ".join(words)
            if key in seen:
                continue
            seen.add(key)
            rows.append(words)
        ids, masks = zip(*(encode(words) for words in rows)) if rows else ((), ())
        labels = [COLOURS.index(answer(words)) for words in rows]
        tied = [_needs_tie_break(words) for words in rows]
        splits[name] = ColourSplit(
            torch.stack(ids) if rows else torch.zeros(0, SEQUENCE_LENGTH, dtype=torch.long),
            torch.stack(masks) if rows else torch.zeros(0, SEQUENCE_LENGTH, dtype=torch.long),
            torch.tensor(labels, dtype=torch.long),
            torch.tensor([QUESTIONS.index(words[0]) for words in rows], dtype=torch.long),
            torch.tensor(tied, dtype=torch.bool),
        )
    return ColoursData(splits["train"], splits["validation"], splits["test"], seed)


def _needs_tie_break(words: Sequence[str]) -> bool:
    mentions = [w for w in words[1:] if w in COLOURS]
    counts = [mentions.count(c) for c in COLOURS]
    extreme = max(counts) if words[0] == "most" else min(counts)
    return counts.count(extreme) > 1


def colours_config():
    """The shipped model's ``BertConfig``: 2 layers, hidden 64, 4 heads, 128 MLP neurons, no dropout."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=SEQUENCE_LENGTH,
        type_vocab_size=1,
        num_labels=len(COLOURS),
        id2label=dict(enumerate(COLOURS)),
        label2id={c: i for i, c in enumerate(COLOURS)},
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=PAD,
        attn_implementation="eager",  # plain matmul attention: the same arithmetic on every backend
    )


def colours_model() -> nn.Module:
    """A fresh (randomly initialized, seeded by the caller) ``BertForSequenceClassification``."""
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification(colours_config())


def read_metadata(path: str = WEIGHTS_FILE) -> Dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


def load_colours_model(
    path: Optional[str] = None, with_stats: bool = True
) -> Tuple[nn.Module, Optional[SaliencyStats], ColoursData]:
    """``(model, stats, data)``: the shipped BERT in eval mode, its reference statistics by heads
    and neurons (``ParameterSaliency(model, units=("heads", "neurons"))``, fitted over the
    validation split with the true labels; ``None`` with ``with_stats=False``) and the splits
    it was trained and evaluated on.

    Raises:
        FileNotFoundError: the weights (or statistics) are missing.
        RuntimeError: the sentences generated here are not the ones the model was trained on
            (their checksum differs from the one recorded with the weights).

    Examples::

        >>> from captum_paramsal import ParameterSaliency
        >>> model, stats, data = load_colours_model()
        >>> ps = ParameterSaliency(model, units=("heads", "neurons"), stats=stats)
    """
    from safetensors.torch import load_file

    from ..stats import SaliencyStats

    path = path or WEIGHTS_FILE
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"the colours model is missing ({path}); re-create it with python -m captum_paramsal.zoo.train_colours"
        )
    meta = read_metadata(path)
    data_meta = json.loads(meta.get("data", "{}"))
    data = colours_data(data_meta.get("seed", 0), data_meta.get("sizes"))
    if "checksum" in data_meta and data.checksum() != data_meta["checksum"]:
        raise RuntimeError(
            "the generated sentences differ from those the shipped colours model was trained on "
            "(checksum mismatch); re-create the model with python -m captum_paramsal.zoo.train_colours"
        )
    model = colours_model()
    model.load_state_dict(load_file(path))
    model.eval()
    stats = None
    if with_stats:
        stats = SaliencyStats.load(os.path.join(os.path.dirname(path), os.path.basename(STATS_FILE)))
    return model, stats, data
