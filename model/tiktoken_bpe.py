"""Kimi K2's tokenizer without its remote code: a tiktoken BPE (tiktoken.model) as a `tokenizers` one.

Kimi K2 ships `tiktoken.model` (one "BASE64_BYTES RANK" line per token, ranks 0..N-1), its special
tokens in tokenizer_config.json's `added_tokens_decoder` (ids N and up) and a Python tokenizer
(tokenization_kimi.py) that only names tiktoken's split pattern. epserve runs no checkpoint code:
the pattern is a named entry here (`PATTERNS`, chosen by tokenizer_config.json's tokenizer_class),
and the ranks become a byte-level BPE with the same output. tiktoken merges, again and again, the
adjacent pair whose concatenation has the lowest rank; a BPE whose merges are every split (a, b) of
every token t, each ranked by rank(t), picks the same pair at every step, so the ids agree.
Worked example: ranks {a: 0, b: 1, c: 2, ab: 3, abc: 4, bc: 5}; "abc" -> merges (a, b) @3, (ab, c) @4,
(a, bc) @4, (b, c) @5; both tokenizers first join a+b (3 < 5), then ab+c (4): one token, 4.
Never: downloads anything or runs code from a checkpoint.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

# tiktoken split patterns by tokenizer_config.json's tokenizer_class: Kimi K2's (Han runs, words
# with their leading mark and English contractions, 1-3 digit numbers, punctuation runs, spaces)
_LETTERS_UP = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_LETTERS_LOW = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
PATTERNS = {"TikTokenTokenizer": "|".join([
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?" + _LETTERS_UP + "*" + _LETTERS_LOW + "+" + _CONTRACTION,
    r"[^\r\n\p{L}\p{N}]?" + _LETTERS_UP + "+" + _LETTERS_LOW + "*" + _CONTRACTION,
    r"\p{N}{1,3}", r" ?[^\s\p{L}\p{N}]+[\r\n]*", r"\s*[\r\n]+", r"\s+(?!\S)", r"\s+"])}


def byte_chars() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the other 68
    bytes take the code points from 256 up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    out, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b], extra = chr(256 + extra), extra + 1
    return out


def read_ranks(path: str | Path) -> dict[bytes, int]:
    ranks = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise ValueError(f"{path}:{n}: not a 'BASE64 RANK' line: {line[:60]!r}")
        ranks[base64.b64decode(parts[0])] = int(parts[1])
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps")
    return ranks


def write_ranks(path: str | Path, ranks: dict[bytes, int]) -> None:
    lines = (f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))
    Path(path).write_text("\n".join(lines) + "\n")


def to_tokenizer(ranks: dict[bytes, int], pattern: str, added: dict[int, tuple[str, bool]]):
    """A `tokenizers.Tokenizer` that encodes as tiktoken would with these ranks and split pattern.
    added: id -> (content, special); a special token is dropped when decoding, a plain one is not."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    chars = byte_chars()

    def text(b: bytes) -> str:
        return "".join(chars[x] for x in b)

    vocab = {text(t): r for t, r in ranks.items()}
    merges = []
    for t, r in ranks.items():
        for i in range(1, len(t)):
            a, b = t[:i], t[i:]
            if a in ranks and b in ranks:
                merges.append((r, ranks[a], ranks[b], text(a), text(b)))
    merges.sort()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], ignore_merges=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    for i in sorted(added):
        if i != tok.get_vocab_size():
            raise ValueError(f"added token {added[i][0]!r} has id {i}; the next free id is {tok.get_vocab_size()}")
        content, special = added[i]
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])
    return tok


def load_tiktoken_dir(model_dir: str | Path, plain: set[str]):
    """The checkpoint's tiktoken.model + tokenizer_config.json as a `tokenizers.Tokenizer`; `plain`:
    added tokens that decode to their text (the markers the chat parsers read)."""
    d = Path(model_dir)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cls = cfg.get("tokenizer_class")
    if cls not in PATTERNS:
        raise ValueError(f"{d}: tokenizer_class {cls!r} has no known tiktoken pattern (known: {', '.join(PATTERNS)})")
    added = {int(i): (v["content"], v["content"] not in plain) for i, v in cfg.get("added_tokens_decoder", {}).items()}
    return to_tokenizer(read_ranks(d / "tiktoken.model"), PATTERNS[cls], added)


def train_ranks(texts: list[str], n_ranks: int, pattern: str) -> dict[bytes, int]:
    """Ranks learnt from `texts` (a small random checkpoint's tokenizer): the 256 bytes, then each
    merge in the order a byte-level BPE trainer makes it."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=n_ranks, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    back = {c: b for b, c in byte_chars().items()}
    return {bytes(back[c] for c in s): i for s, i in tok.get_vocab().items()}
