"""WordPiece vocabularies for the reports: the released one (mimic_wordpiece.json) or a BERT vocab.txt
loaded with a clear refusal, or one built from the reports, the same every time."""
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
    """The released tokenizer's text handling: lowercase, NFKD, accents stripped; split on whitespace,
    punctuation and digits; '##' pieces glued back when decoding."""
    from tokenizers import decoders, normalizers, pre_tokenizers

    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.NFKD(), normalizers.StripAccents()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits()])
    tok.decoder = decoders.WordPiece()
    return tok


def train_tokenizer(reports, vocab_size: int = 30000):
    """A WordPiece tokenizer for these reports, deterministically: [PAD] [UNK] [CLS] [MASK] = 0 1 2 3, every
    character seen, alone and as a '##' continuation (so no word becomes [UNK]), then whole words by
    frequency, ties in alphabetical order, up to vocab_size. Words left out are spelled in pieces.

    Why not the `tokenizers` WordPiece trainer: it breaks ties between equal counts in hash order, so two
    trainings on the same reports give different vocabularies (and two runs of one seed, different losses).
    """
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

