"""SentencePiece tokenizers: train one on the input documents, or load a given model file."""
from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterable, Iterator

import sentencepiece as spm

from sparse_dc.data.sources import DataError

log = logging.getLogger(__name__)

# Fixed special ids so every prepared directory agrees: <unk>=0, <s>=1, </s>=2 (EOS joins documents), no pad.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
MAX_TRAINING_SENTENCES = 2_000_000  # sentencepiece samples this many lines; more only costs memory and time


def train_tokenizer(documents: Iterable[str], vocab_size: int, model_type: str = "bpe", threads: int = 1,
                    seed: int = 0) -> bytes:
    """Train a SentencePiece model on `documents` and return the serialized model proto."""
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)  # the sentence sample is random when the corpus exceeds the cap
    failure: list[BaseException] = []
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(documents, failure),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,  # no <unk> on unseen characters: bytes are in the vocabulary
            character_coverage=0.9995,
            # Llama's settings: the text is kept as is (no NFKC, no collapsing of spaces, newlines as byte pieces),
            # so decode(encode(text)) == text: indentation and line structure of code survive, and Hugging Face's
            # LlamaTokenizer built from the same file encodes identically (see `sparse-dc export`).
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
            input_sentence_size=MAX_TRAINING_SENTENCES,
            shuffle_input_sentence=True,
            num_threads=max(1, threads),
            minloglevel=2,  # sentencepiece's own per-line logging is noise in our progress output
        )
    except RuntimeError as exc:
        if failure:  # sentencepiece wraps errors raised by our iterator: surface the original one
            raise failure[0] from None
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
        raise DataError(f"sentencepiece training failed with vocab_size={vocab_size}: {first}") from None
    return model.getvalue()


def _lines(documents: Iterable[str], failure: list[BaseException]) -> Iterator[str]:
    # sentencepiece trains on sentences (it skips lines over 4192 bytes), so feed it lines, not whole documents.
    try:
        for doc in documents:
            for line in doc.splitlines():
                if line.strip():
                    yield line
    except BaseException as exc:  # kept for train_tokenizer to re-raise: sentencepiece would hide it
        failure.append(exc)
        raise


def load_tokenizer_bytes(path: str) -> bytes:
    """Read a SentencePiece model file, checking that it loads and has our special ids."""
    try:
        with open(path, "rb") as fh:
            proto = fh.read()
    except OSError as exc:
        raise DataError(f"tokenizer {path!r} cannot be read: {exc.strerror}") from None
    processor = processor_from_bytes(proto, name=path)
    if processor.eos_id() < 0:
        raise DataError(f"tokenizer {path!r} has no EOS piece: expected a model trained with eos_id >= 0")
    return proto


def processor_from_bytes(proto: bytes, name: str = "tokenizer") -> spm.SentencePieceProcessor:
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(proto)
    except RuntimeError:
        raise DataError(f"{name!r} is not a valid SentencePiece model") from None
    return processor


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
