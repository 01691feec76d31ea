"""Mail header fields encoded by Dispatcher itself, which the email package writes as they are.

Python's email package decodes RFC 2047 encoded words in a header value given as a str
when it parses or refolds it, so `=?utf-8?q?a=0D=0AX-Evil:_1?=` in a subject became a
real line break on the wire (a new header, even a new body); the same through display
names, extra headers and attachment filenames. So no text from a job ever reaches the
email package as a header value: each value is encoded here to ASCII (or, for an
internationalized address, UTF-8), folded here, and handed over as a `Field`, which the
email package keeps and writes verbatim (`EmailPolicy.header_store_parse` keeps a value
with a matching `.name`; `EmailPolicy._fold` writes `value.fold(policy=...)`).

Text is carried literally: the recipient sees exactly the characters the client sent.
Plain printable ASCII (single spaces, no `=?`) goes as it is, folded at its spaces;
anything else becomes RFC 2047 base64 UTF-8 encoded words, split on character
boundaries, so that CR, LF, NUL, `=?...?=` or a boundary line in the text are only
ever base64 on the wire. Filenames go as RFC 2231 `filename*=utf-8''<percent-encoded>`
unless plainly safe.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Sequence
from email.policy import Policy

#: RFC 5322 asks for lines of at most 78 characters, RFC 2047 for at most 76 where encoded
#: words are; one limit for both keeps it simple.
LINE_LIMIT = 76
#: RFC 5322's hard limit on a line, CRLF excluded.
HARD_LINE_LIMIT = 998
#: RFC 2047's limit on one encoded word.
MAX_ENCODED_WORD = 75
_WORD_PREFIX = "=?utf-8?b?"
_WORD_SUFFIX = "?="
#: Printable ASCII words separated by single spaces: nothing a decoder could decode or unfold differently.
_PLAIN = re.compile(r"[!-~]+(?: [!-~]+)*")
#: Filename characters safe in a quoted-string and in every mail program's eyes.
_PLAIN_FILENAME = re.compile(r"[A-Za-z0-9._()+,~!#$&-]+(?: [A-Za-z0-9._()+,~!#$&-]+)*")
#: What RFC 2231 percent-encoding leaves as it is (a subset of its attribute-char): never `=`, `?`, `%`.
_PERCENT_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
#: A display name short enough to go as one quoted-string.
_MAX_QUOTED_NAME = 60


class HeaderEncodingError(ValueError):
    """A value cannot be written as a header (a lone surrogate, or UTF-8 where the policy allows none)."""


class Field(str):
    """A header field already encoded and folded: the email package writes it as it is.

    Its string value is the unfolded field body (what reading the header returns); `lines`
    are the folded lines, the first one starting with `name: `, the others with a space.
    `addresses` lists the mailboxes it names, for the SMTPUTF8 decision.
    """

    name: str
    lines: tuple[str, ...]
    addresses: tuple[str, ...]

    def __new__(cls, name: str, lines: Sequence[str], addresses: Sequence[str] = ()) -> Field:
        body = "".join(lines)[len(name) + 1 :].removeprefix(" ")
        field = super().__new__(cls, body)
        field.name = name
        field.lines = tuple(lines)
        field.addresses = tuple(addresses)
        return field

    def __reduce__(self) -> tuple:
        # str's own reduction would call __new__ with the body alone (copy.deepcopy does that).
        return (Field, (self.name, self.lines, self.addresses))

    @property
    def needs_utf8(self) -> bool:
        """It holds an internationalized address, which only SMTPUTF8 (RFC 6532) can carry."""
        return not all(line.isascii() for line in self.lines)

    def fold(self, *, policy: Policy) -> str:
        """The field as it goes on the wire, with the policy's line separator."""
        if self.needs_utf8 and not getattr(policy, "utf8", False):
            raise HeaderEncodingError(f"{self.name} holds UTF-8 (an internationalized address): it needs SMTPUTF8")
        return policy.linesep.join(self.lines) + policy.linesep


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise HeaderEncodingError("is not valid Unicode (a lone surrogate)") from None


def encoded_words(text: str, first_room: int = MAX_ENCODED_WORD) -> list[str]:
    """`text` as RFC 2047 base64 UTF-8 encoded words of at most 75 characters, cut between characters.

    The first word is at most `first_room` characters long when that leaves room for one character.
    """
    _utf8(text)
    words: list[str] = []
    chunk = bytearray()
    room = first_room if first_room >= _word_length(4) else MAX_ENCODED_WORD
    for char in text:
        encoded = char.encode("utf-8")
        if chunk and _word_length(len(chunk) + len(encoded)) > room:
            words.append(_word(bytes(chunk)))
            chunk.clear()
            room = MAX_ENCODED_WORD
        chunk += encoded
    if chunk:
        words.append(_word(bytes(chunk)))
    return words


def _word_length(size: int) -> int:
    return len(_WORD_PREFIX) + 4 * -(-size // 3) + len(_WORD_SUFFIX)


def _word(data: bytes) -> str:
    return _WORD_PREFIX + base64.b64encode(data).decode("ascii") + _WORD_SUFFIX


def is_plain(text: str) -> bool:
    """Printable ASCII with single spaces and no `=?`: safe to write as it is."""
    return _PLAIN.fullmatch(text) is not None and "=?" not in text


def fold(name: str, atoms: Iterable[str], addresses: Sequence[str] = ()) -> Field:
    """A field whose body is `atoms` separated by single spaces, folded at those spaces.

    Lines are at most LINE_LIMIT characters where the atoms allow it; the first atom always
    shares the line with the name (a line break right after the colon reads back as a space
    in some parsers).
    """
    lines: list[str] = []
    line = f"{name}:"
    first = True
    for atom in atoms:
        if not first and len(line) + 1 + len(atom) > LINE_LIMIT:
            lines.append(line)
            line = ""
        line += " " + atom
        first = False
    lines.append(line)
    if any(len(line) > HARD_LINE_LIMIT for line in lines):
        raise HeaderEncodingError(f"{name} would have a line over {HARD_LINE_LIMIT} characters")
    return Field(name, lines, addresses)


def unstructured(name: str, text: str) -> Field:
    """A field holding `text` literally (Subject, extra headers)."""
    if text == "":
        return Field(name, [f"{name}:"])
    if is_plain(text):
        try:
            return fold(name, text.split(" "))
        except HeaderEncodingError:
            pass  # a word too long for any line: encoded words can be cut anywhere
    return fold(name, encoded_words(text, LINE_LIMIT - len(name) - 2))


def phrase(text: str) -> list[str]:
    """A display name as atoms: a quoted-string when plain and short, encoded words otherwise."""
    if is_plain(text) and len(text) <= _MAX_QUOTED_NAME:
        return ['"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"']
    return encoded_words(text)


def mailboxes(name: str, boxes: Sequence[tuple[str, str]]) -> Field:
    """An address field (From, To, Cc, Reply-To) of `(display name, address)` pairs.

    The addresses must already be valid addr-specs (dispatcher.addresses); only the names are text.
    """
    atoms: list[str] = []
    for index, (display_name, address) in enumerate(boxes):
        last = index == len(boxes) - 1
        separator = "" if last else ","
        if display_name:
            atoms += phrase(display_name)
            atoms.append(f"<{address}>{separator}")
        else:
            atoms.append(address + separator)
    return fold(name, atoms, [address for _, address in boxes])


def attachment_disposition(filename: str) -> Field:
    """`Content-Disposition: attachment` with the filename, literal whatever it holds."""
    name = "Content-Disposition"
    if _PLAIN_FILENAME.fullmatch(filename) and len(filename) <= LINE_LIMIT - len(' filename=""'):
        return fold(name, ["attachment;", f'filename="{filename}"'])
    # RFC 2231: percent-encoded UTF-8, in sections short enough for a line each.
    pieces: list[str] = []
    piece = ""
    budget = LINE_LIMIT - len(" filename*00*=utf-8'';")
    for char in filename:
        encoded = "".join(chr(b) if b in _PERCENT_SAFE else f"%{b:02X}" for b in _utf8(char))
        if piece and len(piece) + len(encoded) > budget:
            pieces.append(piece)
            piece = ""
        piece += encoded
    pieces.append(piece)
    if len(pieces) == 1:
        return fold(name, ["attachment;", f"filename*=utf-8''{pieces[0]}"])
    atoms = ["attachment;"]
    for index, piece in enumerate(pieces):
        charset = "utf-8''" if index == 0 else ""
        separator = "" if index == len(pieces) - 1 else ";"
        atoms.append(f"filename*{index}*={charset}{piece}{separator}")
    return fold(name, atoms)
