"""Caption tidying."""

import pytest

from model.text import tidy_caption

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "raw, tidy",
    [
        ("a red cup of coffee on a tabby cat on the launch pad , and a pink nose .",
         "A red cup of coffee on a tabby cat on the launch pad, and a pink nose."),
        ("a chain - link fence", "A chain-link fence."),
        ("the cup ' s handle is red . it is hot", "The cup's handle is red. It is hot."),
        ("wow ! a dog ? yes", "Wow! A dog? Yes."),
        ("it was 3 . 5 m tall , 1 , 000 people came", "It was 3.5 m tall, 1,000 people came."),
        ("a man ( in red ) waves", "A man (in red) waves."),
        ("a dog ,", "A dog."),
        ("a cat,a dog.it sleeps;well", "A cat, a dog. It sleeps; well."),  # one space after punctuation
        ("  spaced   out  ", "Spaced out."),
        ("", ""),
    ],
)
def test_tidy_caption(raw, tidy):
    assert tidy_caption(raw) == tidy


def test_space_before_punctuation_rule_equals_its_template_form_on_random_text():
    """The lookahead rule removes exactly what `\\s+([.,!?;:%)\\]])` -> `\\1` removed."""
    import random
    import re

    from model.text import _SPACE_BEFORE_PUNCT

    template = re.compile(r"\s+([.,!?;:%)\]])")
    generator = random.Random(0)
    alphabet = "ab1 .,!?;:%)(][-'\"\t\n\u00a0"
    for _ in range(20_000):
        text = "".join(generator.choice(alphabet) for _ in range(generator.randrange(0, 14)))
        assert _SPACE_BEFORE_PUNCT.sub("", text) == template.sub(r"\1", text), repr(text)
