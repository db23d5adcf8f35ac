"""The vendored vocabulary: checksum, special-token ids, decoding and encoding."""

import pytest

from model.config import CLS_ID, IMG_END_ID, IMG_START_ID, PAD_ID, SEP_ID, STYLE_TOKEN_IDS
from model.tokenizer import VOCAB_PATH, VOCAB_SHA256, Vocabulary, file_sha256

pytestmark = pytest.mark.unit


def test_vendored_vocab_checksum():
    assert file_sha256(VOCAB_PATH) == VOCAB_SHA256
    assert VOCAB_PATH.stat().st_size == 231_508


def test_special_token_ids():
    vocab = Vocabulary()
    assert len(vocab) == 30527
    assert [vocab.ids[t] for t in ("[PAD]", "[CLS]", "[SEP]")] == [PAD_ID, CLS_ID, SEP_ID]
    assert vocab.ids["[IMG_START]"] == IMG_START_ID == 30522
    assert vocab.ids["[IMG_END]"] == IMG_END_ID == 30523
    assert STYLE_TOKEN_IDS == {"descriptive": 30524, "narrative": 30525, "concise": 30526}


def test_decode_skips_special_tokens_and_joins_wordpieces(golden):
    vocab = Vocabulary()
    ids = golden["images"]["coffee.png"]["greedy"]["concise"]["ids"]
    assert vocab.decode(ids) == "a red cup of coffee on a tabby cat on the launch pad , and a pink nose ."
    assert vocab.decode([vocab.ids["play"], vocab.ids["##ing"], 30526, PAD_ID]) == "playing"


def test_decode_equals_the_word_by_word_rule_for_random_ids():
    """Special tokens anywhere, "##" pieces first, after a skipped token, or in a row."""
    import random

    vocab = Vocabulary()
    generator = random.Random(0)
    pieces = [i for i, t in enumerate(vocab.tokens) if t.startswith("##")]
    specials = [PAD_ID, CLS_ID, SEP_ID, vocab.unk_id, vocab.ids["[MASK]"], *STYLE_TOKEN_IDS.values()]
    for _ in range(500):
        ids = [generator.choice((generator.randrange(len(vocab)), generator.choice(pieces), generator.choice(specials)))
               for _ in range(generator.randrange(0, 12))]
        assert vocab.decode(ids) == vocab.decode_word_by_word(ids), ids
    assert vocab.decode([pieces[0], SEP_ID]) == vocab.tokens[pieces[0]]  # a leading piece keeps its "##"
    assert vocab.decode([CLS_ID, SEP_ID]) == ""


def test_encode_round_trips_golden_input_ids(golden):
    vocab = Vocabulary()
    for name, image in golden["images"].items():
        ids = image["teacher_forced"]["input_ids"][0].tolist()
        assert [CLS_ID] + vocab.encode(golden["captions"][name]["concise"]) == ids


def test_encode_lower_cases_strips_accents_and_splits_punctuation_as_bert_uncased_does():
    vocab = Vocabulary()
    ids = vocab.encode("Café, naïve!")
    assert [vocab.tokens[i] for i in ids] == ["cafe", ",", "naive", "!"]
    assert ids == vocab.encode("cafe , naive !")


def test_bad_vocabulary_file(tmp_path):
    short = tmp_path / "vocab.txt"
    short.write_text("[PAD]\n[UNK]\n")
    with pytest.raises(ValueError, match="expected 30522"):
        Vocabulary(short)
    with pytest.raises(ValueError, match="cannot read"):
        Vocabulary(tmp_path / "missing.txt")


def test_vocabulary_with_special_tokens_elsewhere_is_refused(tmp_path):
    tokens = VOCAB_PATH.read_text(encoding="utf-8").splitlines()
    tokens[CLS_ID], tokens[CLS_ID + 5] = tokens[CLS_ID + 5], tokens[CLS_ID]  # same size, [CLS] moved
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"\[CLS\] at line {CLS_ID + 6}"):
        Vocabulary(path)
