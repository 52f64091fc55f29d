"""The end-of-run sample of a byte-level model is printable text: invalid UTF-8, ids above 255 and
control characters (escape sequences, carriage returns) become U+FFFD; tab and newline stay.
``Trainer.sample`` returns ``printable(decode(tokenizer, tokens))``."""
import pytest

from trainer import _sample, _tokenizer

R = "\ufffd"


@pytest.mark.parametrize("tokens, text", [
    (list(b"def f():\n\treturn 1"), "def f():\n\treturn 1"),
    ([0xC3, 0xA9, 0xE2, 0x82, 0xAC], "\u00e9\u20ac"),  # two- and three-byte characters stay
    ([104, 105, 0xC3], "hi" + R),  # a character cut off by the end of the sample
    ([0xFF, 0x80, 104], R + R + "h"),  # bytes that never start a character
    ([27, 91, 50, 74, 13, 8, 7, 0, 127], R + "[2J" + R * 5),  # ESC [2J clears a terminal
    ([0xC2, 0x9B, 65], R + "A"),  # U+009B, a one-character escape on some terminals
    ([65, 256, 300, 66], "A" + R + R + "B"),  # ids of a vocabulary larger than bytes
])
def test_bytes_decode_to_printable_text(tokens, text):
    assert _sample.printable(_tokenizer.decode(None, tokens)) == text
