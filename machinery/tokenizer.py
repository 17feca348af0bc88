"""WordPiece vocabularies: the released mimic_wordpiece.json or a BERT vocab.txt, or one built from the reports."""
import os
from collections import Counter

from machinery.errors import ConfigError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[MASK]")  # ids 0..3, as the released tokenizer


def load_tokenizer(path):
    """A `tokenizers` JSON file (e.g. the released mimic_wordpiece.json) or a BERT vocab.txt."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordPiece

    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such tokenizer file")
    try:
        if path.endswith(".txt"):  # BERT style: one token a line, its id the line number
            tok = Tokenizer(WordPiece.from_file(path, unk_token="[UNK]"))
            tok.normalizer = normalizers.BertNormalizer(lowercase=True)
            tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        else:
            tok = Tokenizer.from_file(path)
    except Exception as e:
        raise ConfigError(f"{path}: not a tokenizer file ({type(e).__name__}: {e})") from None
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise ConfigError(f"{path}: the tokenizer lacks the special tokens {missing}")
    return tok


def _released_pipeline(tok):
    """The released tokenizer's text handling: lowercase, NFKD, no accents; split at spaces, punctuation, digits."""
    from tokenizers import decoders, normalizers, pre_tokenizers

    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.NFKD(), normalizers.StripAccents()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits()])
    tok.decoder = decoders.WordPiece()
    return tok


def train_tokenizer(reports, vocab_size: int = 30000):
    """A WordPiece tokenizer for these reports: the special tokens, every character alone and as '##' (no [UNK]),
    then words by frequency, ties alphabetical, up to vocab_size. Not the `tokenizers` trainer: ties in hash order."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece

    probe = _released_pipeline(Tokenizer(WordPiece({"[UNK]": 0}, unk_token="[UNK]")))
    counts = Counter()
    for report in reports:
        counts.update(w for w, _ in probe.pre_tokenizer.pre_tokenize_str(probe.normalizer.normalize_str(report)))
    chars = sorted({c for word in counts for c in word})
    vocab = list(SPECIAL_TOKENS) + chars + ["##" + c for c in chars]
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    vocab += words[: max(0, vocab_size - len(vocab))]
    return _released_pipeline(Tokenizer(WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]")))
