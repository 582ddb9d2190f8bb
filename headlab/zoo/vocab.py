"""Word-level tokenizers for the trained zoo models.

The zoo's tasks are written in a closed vocabulary (names, colors, "w17" tokens, two-digit numbers, ...), so a
word-level tokenizer makes every answer one token, which keeps the ground truth of the generators exact:
the IOI answer " Mary" is the single token "Mary", a year "1732" is "17" "32" (digits are split in pairs,
as the greater-than task needs). Unknown words map to <unk>. Built with the `tokenizers` library and saved as
a real `PreTrainedTokenizerFast`, so `from_pretrained` reads it back.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import transformers as tf
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

BOS, EOS, PAD, UNK, IMAGE = "<s>", "</s>", "<pad>", "<unk>", "<image>"
# words (a letter first: "w17" stays whole), numbers cut in digit pairs, punctuation runs
_PIECE = r"\d\d|[A-Za-z_][A-Za-z_0-9]*|\d|[^A-Za-z_0-9\s]+"


def split_words(text: str) -> list[str]:
    """The pre-tokenization the tokenizer applies (same pattern)."""
    return re.findall(_PIECE, text)


def word_tokenizer(texts: Iterable[str], *, extra: Iterable[str] = (), image: bool = False):
    """A word-level tokenizer over every word of `texts` plus `extra`, adding <s> in front of each text."""
    specials = [BOS, EOS, PAD, UNK] + ([IMAGE] if image else [])
    words = sorted({w for t in texts for w in split_words(t)} | set(extra))
    vocab = {tok: i for i, tok in enumerate(specials + [w for w in words if w not in specials])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(_PIECE), behavior="isolated")]
    )
    return wrap_tokenizer(tok, image=image)


def wrap_tokenizer(tok: Tokenizer, *, image: bool, bos: bool = True) -> tf.PreTrainedTokenizerFast:
    """`tok` as a transformers tokenizer with the zoo's special tokens: <s> in front of each text when `bos`,
    <image> as its image token when `image`."""
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
        )
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        **({"extra_special_tokens": {"image_token": IMAGE}} if image else {}),
    )
