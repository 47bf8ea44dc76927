"""containerd's filter syntax (as used by List/Walk), parsed and matched the way containerd does.

    filter    := selector ("," selector)*            all selectors must match
    selector  := fieldpath [operator value]          no operator: the field is present
    fieldpath := field ("." field)*
    field     := quoted | [A-Za-z0-9_]+
    operator  := "==" | "!=" | "~="                  ~= is a regular expression search
    value     := quoted | [^\\s,]+
    quoted    := "..." with Go escapes; after ~= also /.../ and |...|

Several filters are alternatives: an object matches when any of them matches; no filters (or an
empty one) match everything. A malformed filter or regular expression is an InvalidArgumentError.

Regular expressions are RE2's, like Go's `regexp` that containerd uses: the same syntax, and
matching in time linear in the value. (Python's `re` backtracks: `labels.x~=(a+)+$` against a
4 KiB label would run for ever, holding the GIL that every thread of the daemon needs.)
Parsing is one pass over the filter; error messages quote at most `QUOTE_CHARS` of it.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Final, Protocol

import re2  # type: ignore[import-untyped]

from snapshotter.service import InvalidArgumentError

FieldLookup = Callable[[Sequence[str]], tuple[str, bool]]
"""Maps a field path to (value, present) for the object being matched."""

_EOF = "<eof>"
_ILLEGAL = "<illegal>"
QUOTE_CHARS: Final = 256
"""Most characters of a filter an error message shows on each side of the error."""


class Searcher(Protocol):
    """A compiled regular expression (RE2)."""

    def search(self, text: str) -> object | None:
        """A match somewhere in `text`, or None."""
        ...


def _re2_options() -> object:
    options = re2.Options()
    options.log_errors = False  # RE2 would print its own lines on stderr (the daemon's log)
    return options


_RE2_OPTIONS: Final = _re2_options()


def compile_regex(pattern: str) -> Searcher:
    """`pattern` compiled by RE2 (Go's regexp syntax); InvalidArgumentError if it is not one."""
    try:
        return re2.compile(pattern, options=_RE2_OPTIONS)  # type: ignore[no-any-return]
    except re2.error as e:
        detail = (
            e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else e
        )
        raise InvalidArgumentError(
            f"filters: bad regular expression {_shown(pattern)}: {detail}"
        ) from None


def _shown(text: str) -> str:
    """`text` quoted for a message, its middle cut when it is long."""
    if len(text) <= 2 * QUOTE_CHARS:
        return repr(text)
    cut = len(text) - 2 * QUOTE_CHARS
    return f"{text[:QUOTE_CHARS]!r} [… {cut} characters …] {text[-QUOTE_CHARS:]!r}"


class _Tok(Enum):
    EOF = "EOF"
    QUOTED = "Quoted"
    VALUE = "Value"
    FIELD = "Field"
    SEPARATOR = "Separator"
    OPERATOR = "Operator"
    ILLEGAL = "Illegal"
    OTHER = "Other"


class _Op(Enum):
    PRESENT = "?"
    EQUAL = "=="
    NOT_EQUAL = "!="
    MATCHES = "~="


def _is_space(ch: str) -> bool:
    return len(ch) == 1 and ch.isspace()


def _is_field_rune(ch: str) -> bool:
    return len(ch) == 1 and (ch == "_" or "a" <= ch <= "z" or "A" <= ch <= "Z" or "0" <= ch <= "9")


def _is_value_rune(ch: str) -> bool:
    if len(ch) != 1 or ch == "," or ch.isspace():
        return False
    return ch.isprintable() or unicodedata.category(ch)[0] in "LNPS"


def _digit_val(ch: str) -> int:
    if len(ch) == 1:
        if "0" <= ch <= "9":
            return ord(ch) - ord("0")
        if "a" <= ch <= "f":
            return ord(ch) - ord("a") + 10
        if "A" <= ch <= "F":
            return ord(ch) - ord("A") + 10
    return 16


class _Scanner:
    """containerd's filter scanner: runes in, (position, token, text) out."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0  # start of the current rune
        self.ppos = 0  # start of the next rune
        self.value = False  # the next bare word is a value (after an operator)
        self.err = ""

    def _error(self, msg: str) -> None:
        if not self.err:
            self.err = msg

    def next(self) -> str:
        self.pos = self.ppos
        if self.ppos >= len(self.text):
            return _EOF
        ch = self.text[self.ppos]
        self.ppos += 1
        if ch == "\0":
            self._error("unexpected null")
            return _ILLEGAL
        return ch

    def peek(self) -> str:
        pos, ppos = self.pos, self.ppos
        ch = self.next()
        self.pos, self.ppos = pos, ppos
        return ch

    def scan(self) -> tuple[int, _Tok, str]:
        ch = self.next()
        while _is_space(ch):
            ch = self.next()
        pos = self.pos
        if ch == _EOF:
            return pos, _Tok.EOF, ""
        if ch == _ILLEGAL:
            return pos, _Tok.ILLEGAL, ""
        if ch in ('"', "/", "|"):
            ok = self._scan_quoted(ch)
            return pos, (_Tok.QUOTED if ok else _Tok.ILLEGAL), self.text[pos : self.ppos]
        if ch in (",", "."):
            self.value = False
            return pos, _Tok.SEPARATOR, ch
        if ch in ("=", "!", "~"):
            while self.peek() in ("=", "!", "~"):
                self.next()
            self.value = True
            return pos, _Tok.OPERATOR, self.text[pos : self.ppos]
        if self.value:
            while _is_value_rune(self.peek()):
                self.next()
            self.value = False
            return pos, _Tok.VALUE, self.text[pos : self.ppos]
        if _is_field_rune(ch):
            while _is_field_rune(self.peek()):
                self.next()
            return pos, _Tok.FIELD, self.text[pos : self.ppos]
        return pos, _Tok.OTHER, ch

    def _scan_quoted(self, quote: str) -> bool:
        illegal = False
        ch = self.next()
        while ch != quote:
            if ch in ("\n", _EOF, _ILLEGAL):
                self._error("quoted literal not terminated")
                return False
            if ch == "\\":
                ch, legal = self._scan_escape(quote)
                illegal = illegal or not legal
            else:
                ch = self.next()
        return not illegal

    def _scan_escape(self, quote: str) -> tuple[str, bool]:
        ch = self.next()
        if ch in ("a", "b", "f", "n", "r", "t", "v", "\\", quote):
            return self.next(), True
        if ch in "01234567" and len(ch) == 1:
            return self._scan_digits(ch, 8, 3)
        if ch == "x":
            return self._scan_digits(self.next(), 16, 2)
        if ch == "u":
            return self._scan_digits(self.next(), 16, 4)
        if ch == "U":
            return self._scan_digits(self.next(), 16, 8)
        self._error("illegal escape sequence")
        return ch, False

    def _scan_digits(self, ch: str, base: int, n: int) -> tuple[str, bool]:
        while n > 0 and _digit_val(ch) < base:
            ch = self.next()
            n -= 1
        if n > 0:
            self._error("illegal numeric escape sequence")
            return ch, False
        return ch, True


_SIMPLE_ESCAPES = {
    "a": 0x07,
    "b": 0x08,
    "f": 0x0C,
    "n": 0x0A,
    "r": 0x0D,
    "t": 0x09,
    "v": 0x0B,
    "\\": 0x5C,
}


def _unquote(s: str) -> str:
    """Go's strconv.Unquote, extended (as containerd does) to / and | as double quotes."""
    if len(s) < 2 or s[0] != s[-1] or s[0] not in ('"', "/", "|"):
        raise ValueError("invalid syntax")
    quote, body = s[0], s[1:-1]
    if "\n" in body:
        raise ValueError("invalid syntax")
    out = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c == quote:
            raise ValueError("invalid syntax")
        if c != "\\":
            out += c.encode("utf-8", "surrogateescape")
            i += 1
            continue
        if i + 1 >= len(body):
            raise ValueError("invalid syntax")
        e = body[i + 1]
        i += 2
        if e in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[e])
        elif e in ("x", "u", "U"):
            n = {"x": 2, "u": 4, "U": 8}[e]
            digits = body[i : i + n]
            if len(digits) < n or any(_digit_val(d) >= 16 for d in digits):
                raise ValueError("invalid syntax")
            v = int(digits, 16)
            i += n
            if e == "x":
                out.append(v)
            elif v > 0x10FFFF or 0xD800 <= v <= 0xDFFF:
                raise ValueError("invalid syntax")
            else:
                out += chr(v).encode("utf-8")
        elif e in "01234567":
            digits = body[i : i + 2]
            if len(digits) < 2 or any(d not in "01234567" for d in digits):
                raise ValueError("invalid syntax")
            v = int(e + digits, 8)
            i += 2
            if v > 255:
                raise ValueError("invalid syntax")
            out.append(v)
        elif e in ("'", '"', "|", "/"):
            if e != quote:
                raise ValueError("invalid syntax")
            out += e.encode()
        else:
            raise ValueError("invalid syntax")
    return out.decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Selector:
    """One `<fieldpath><op><value>` term."""

    fieldpath: tuple[str, ...]
    op: _Op
    value: str = ""
    regex: Searcher | None = None

    def match(self, lookup: FieldLookup) -> bool:
        """Whether the object `lookup` describes satisfies this term."""
        value, present = lookup(self.fieldpath)
        if self.op is _Op.PRESENT:
            return present
        if self.op is _Op.EQUAL:
            return present and value == self.value
        if self.op is _Op.NOT_EQUAL:
            return value != self.value
        assert self.regex is not None
        return self.regex.search(value) is not None


@dataclass(frozen=True)
class Filter:
    """Alternatives (any must match), each a conjunction of selectors (all must match)."""

    alternatives: tuple[tuple[Selector, ...], ...]

    def match(self, lookup: FieldLookup) -> bool:
        """Whether the object `lookup` describes passes the filter."""
        return any(all(s.match(lookup) for s in alt) for alt in self.alternatives)


ALWAYS = Filter(((),))


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.sc = _Scanner(text)

    def error(self, pos: int, msg: str) -> InvalidArgumentError:
        t = self.text
        lo, hi = max(0, pos - QUOTE_CHARS), pos + 1 + QUOTE_CHARS
        before = ("…" if lo else "") + t[lo:pos]
        after = t[pos + 1 : hi] + ("…" if hi < len(t) else "")
        where = f"[{before} >|{t[pos]}|< {after}]" if pos < len(t) else f"[{before}]"
        return InvalidArgumentError(f"filters: parse error: {where}: {msg[:QUOTE_CHARS]}")

    def selectors(self) -> tuple[Selector, ...]:
        out = [self.selector()]
        while True:
            ch = self.sc.peek()
            if ch == _EOF:
                return tuple(out)
            if ch != ",":
                raise self.error(self.sc.ppos, f"unexpected input: {ch}")
            pos, tok, _ = self.sc.scan()
            if tok is not _Tok.SEPARATOR:
                raise self.error(pos, "expected a separator")
            out.append(self.selector())

    def selector(self) -> Selector:
        fieldpath = self.fieldpath()
        if self.sc.peek() in (",", _EOF):
            return Selector(fieldpath, _Op.PRESENT)
        op = self.operator()
        value = self.value(allow_alt_quotes=op is _Op.MATCHES)
        if op is _Op.MATCHES:
            return Selector(fieldpath, op, value, compile_regex(value))
        return Selector(fieldpath, op, value)

    def fieldpath(self) -> tuple[str, ...]:
        fields = [self.field()]
        while self.sc.peek() == ".":
            pos, tok, _ = self.sc.scan()
            if tok is not _Tok.SEPARATOR:
                raise self.error(pos, "expected a field separator (`.`)")
            fields.append(self.field())
        return tuple(fields)

    def field(self) -> str:
        pos, tok, text = self.sc.scan()
        if tok is _Tok.FIELD:
            return text
        if tok is _Tok.QUOTED:
            return self.unquote(pos, text, allow_alts=False)
        if tok is _Tok.ILLEGAL:
            raise self.error(pos, self.sc.err)
        raise self.error(pos, "expected field or quoted")

    def operator(self) -> _Op:
        pos, tok, text = self.sc.scan()
        if tok is _Tok.OPERATOR:
            for op in (_Op.EQUAL, _Op.NOT_EQUAL, _Op.MATCHES):
                if text == op.value:
                    return op
            raise self.error(pos, f"unsupported operator {text!r}")
        if tok is _Tok.ILLEGAL:
            raise self.error(pos, self.sc.err)
        raise self.error(pos, 'expected an operator ("=="|"!="|"~=")')

    def value(self, *, allow_alt_quotes: bool) -> str:
        pos, tok, text = self.sc.scan()
        if tok in (_Tok.VALUE, _Tok.FIELD):
            return text
        if tok is _Tok.QUOTED:
            return self.unquote(pos, text, allow_alts=allow_alt_quotes)
        if tok is _Tok.ILLEGAL:
            raise self.error(pos, self.sc.err)
        raise self.error(pos, "expected value or quoted")

    def unquote(self, pos: int, text: str, *, allow_alts: bool) -> str:
        if not allow_alts and text[0] != '"':
            raise self.error(pos, "invalid quote encountered")
        try:
            return _unquote(text)
        except ValueError as e:
            raise self.error(pos, f"unquoting failed: {e}") from None


def parse(text: str) -> Filter:
    """One filter (a conjunction); the empty string matches everything."""
    if text == "":
        return ALWAYS
    return Filter((_Parser(text).selectors(),))


def parse_all(texts: Sequence[str]) -> Filter:
    """Several filters, any of which may match; none at all matches everything."""
    if not texts:
        return ALWAYS
    return Filter(tuple(alt for t in texts for alt in parse(t).alternatives))
