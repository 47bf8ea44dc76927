"""containerd's filter syntax: the cases of containerd's own filter tests, plus snapshot fields."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from snapshotter.service import InvalidArgumentError
from snapshotter.service.filters import parse, parse_all


@dataclass
class Entry:
    name: str
    other: str = ""
    labels: dict[str, str] = field(default_factory=dict)


CORPUS = [
    Entry("foo", labels={"foo": "true"}),
    Entry("bar"),
    Entry("foo", labels={"foo": "present", "more complex label": "present"}),
    Entry("bar", labels={"bar": "true"}),
    Entry("fooer", labels={'more complex label with \\ and "': "present"}),
    Entry("fooer", labels={'more complex label with \\ and ".post': "present"}),
    Entry("baz", other="too complex, yo"),
    Entry("bazo", other="abc"),
    Entry("compound", labels={"foo": "omg_asdf.asdf-qwer"}),
]


def lookup(e: Entry):  # type: ignore[no-untyped-def]
    def fn(path: Sequence[str]) -> tuple[str, bool]:
        if path[0] == "name":
            return e.name, bool(e.name)
        if path[0] == "other":
            return e.other, bool(e.other)
        if path[0] == "labels":
            k = ".".join(path[1:])
            return e.labels.get(k, ""), k in e.labels
        return "", False

    return fn


def matches(text: str) -> list[int]:
    f = parse(text)
    return [i for i, e in enumerate(CORPUS) if f.match(lookup(e))]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", list(range(9))),
        ("name", list(range(9))),
        ("labels.foo", [0, 2, 8]),
        ("labels.foo,name", [0, 2, 8]),
        ("labels.foo==true", [0]),
        ("labels.foo==omg_asdf.asdf-qwer", [8]),
        ("name==bar", [1, 3]),
        ("name!=bar", [0, 2, 4, 5, 6, 7, 8]),
        ("name==bar,labels.bar", [3]),
        ('other=="too complex, yo"', [6]),
        ("other~=[abc]+,name!=foo", [6, 7]),
        ("other~=/[abc]+/,name!=foo", [6, 7]),
        ("other~=/[abc]{1,2}/,name!=foo", [6, 7]),
        ('other~=/[abc]{0,1}"\\//,name!=foo', []),
        ("name==bar,labels.bar==true", [3]),
        ("name==bar,labels.bar==wrong", []),
        ('name==foo,labels."more complex label"', [2]),
        ('labels."more complex label with \\\\ and \\""==present', [4]),
        ('labels."more complex label with \\\\ and \\"".post==present', [5]),
        ("name == bar", [1, 3]),
        ("other~=|b.z|", []),
        ("other~=|o|", [6]),
        ('name=="\\x66oo"', [0, 2]),
        ('name=="\\146oo"', [0, 2]),
        ('name=="\\u0066oo"', [0, 2]),
    ],
)
def test_containerd_filter_cases(text: str, expected: list[int]) -> None:
    assert matches(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "labels.|foo|==omg_asdf.asdf-qwer",
            "filters: parse error: [labels. >|||< foo|==omg_asdf.asdf-qwer]: "
            "invalid quote encountered",
        ),
        (
            'labels.?"more complex label with \\\\ and \\"".post==present',
            'filters: parse error: [labels. >|?|< "more complex label with \\\\ and \\"".post'
            "==present]: expected field or quoted",
        ),
        ("name==foo,", "filters: parse error: [name==foo,]: expected field or quoted"),
        ("labels.", "filters: parse error: [labels.]: expected field or quoted"),
        (
            "image~=,id?=?fbaq",
            "filters: parse error: [image~= >|,|< id?=?fbaq]: expected value or quoted",
        ),
        (
            "labels.ns/key==value",
            "filters: parse error: [labels.ns >|/|< key==value]: quoted literal not terminated",
        ),
        (
            "labels.key==/value",
            "filters: parse error: [labels.key== >|/|< value]: quoted literal not terminated",
        ),
    ],
)
def test_containerd_filter_errors(text: str, message: str) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        parse(text)
    assert str(e.value) == message


@pytest.mark.parametrize(
    "text",
    [
        "name=bar",  # unsupported operator
        "name===bar",
        "name==",  # missing value
        "name==a b",  # trailing input
        'name=="unterminated',
        'name=="bad \\q escape"',
        'name=="\\xZZ"',
        "name~=/(/",  # bad regular expression
        "name==/x/",  # alternative quotes only after ~=
        "name\x00==x",
        ",name",
        "name,,kind",
    ],
)
def test_bad_syntax_is_invalid_argument(text: str) -> None:
    with pytest.raises(InvalidArgumentError):
        parse(text)


def test_several_filters_are_alternatives() -> None:
    f = parse_all(["name==foo,labels.foo==true", "name==bazo"])
    assert [i for i, e in enumerate(CORPUS) if f.match(lookup(e))] == [0, 7]
    assert all(parse_all([]).match(lookup(e)) for e in CORPUS)
    assert all(parse_all(["name==nothing", ""]).match(lookup(e)) for e in CORPUS)
    with pytest.raises(InvalidArgumentError):
        parse_all(["name==foo", "name="])


def test_values_keep_punctuation_and_quoted_fields_join_with_dots() -> None:
    # an unquoted value runs to the next comma or space, '=' and '.' included
    e = Entry("x", labels={"a.b": "sha256:abc=d.e"})
    assert parse('labels."a.b"==sha256:abc=d.e').match(lookup(e))
    assert parse("labels.a.b==sha256:abc=d.e").match(lookup(e))
    assert not parse("labels.a.b!=sha256:abc=d.e").match(lookup(e))


def test_regular_expressions_are_re2s() -> None:
    """Go's syntax and linear matching: no backreferences, no catastrophic backtracking."""
    from snapshotter.service import InvalidArgumentError
    from snapshotter.service.filters import parse

    f = parse("labels.a~=(a+)+$")
    assert not f.match(lambda path: ("a" * 4000 + "!", True))
    assert f.match(lambda path: ("aaa", True))
    with pytest.raises(InvalidArgumentError, match="bad regular expression"):
        parse(r"labels.a~=(a)\1")


def test_error_messages_quote_a_bounded_part_of_the_filter() -> None:
    from snapshotter.service import InvalidArgumentError
    from snapshotter.service.filters import parse

    with pytest.raises(InvalidArgumentError) as e:
        parse("name" + "x" * 100_000 + "=!=!")
    assert len(str(e.value)) < 1000
