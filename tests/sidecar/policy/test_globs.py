"""Glob dialects of AccessPolicies: path globs (segments, "**") and name/host globs."""

from __future__ import annotations

import pytest

from chaperone_sidecar.policy.globs import GlobSet, compile_glob, glob_error, is_literal, match, translate

MATCH_CASES = [
    # pattern, kind, value, expected
    ("/repos/*", "path", "/repos/chaperone", True),
    ("/repos/*", "path", "/repos/a/b", False),  # "*" stays in one segment
    ("/repos/*", "path", "/repos/", True),
    ("/repos/**", "path", "/repos/a/b/c", True),  # "**" crosses "/"
    ("/repos/**", "path", "/repos", True),  # a final "/**" covers its root too
    ("/repos/**", "path", "/repos/", True),
    ("/repos/**", "path", "/reposx", False),
    ("/a/**/b/**", "path", "/a/b", True),
    ("/a/**/b", "path", "/a/b", True),  # "/**/" may be zero segments
    ("/a/**/b", "path", "/a/x/y/b", True),
    ("/a/**/b", "path", "/a/xb", False),
    ("/a/?", "path", "/a/b", True),
    ("/a/?", "path", "/a/bc", False),
    ("/a?b", "path", "/a/b", False),  # "?" never matches "/" in paths
    ("/v1/messages", "path", "/v1/messages", True),
    ("/v1/messages", "path", "/v1/messages/", False),  # anchored
    ("/a.b", "path", "/axb", False),  # regex metacharacters are literal
    ("/a+(b)", "path", "/a+(b)", True),
    ("*.example.com", "host", "api.example.com", True),
    ("*.example.com", "host", "a.b.example.com", True),  # "*" is any characters for names
    ("*.example.com", "host", "example.com", False),
    ("*.example.com", "host", "API.Example.COM", True),  # hosts are case-insensitive
    ("api.github.com", "host", "api.github.com.evil", False),
    ("aws-*", "name", "aws-prod", True),
    ("aws-*", "name", "gcp-prod", False),
    ("s3:Delete*", "name", "s3:DeleteBucket", True),
    ("s3:Delete*", "name", "s3:deletebucket", False),  # names are case-sensitive unless asked
    ("team-?", "name", "team-a", True),
    ("team-?", "name", "team-ab", False),
    ("bucket/*", "name", "bucket/a/b/c", True),  # name globs cross "/"
    ("a**b", "name", "axxb", True),
    ("", "name", "", True),  # the core API group is ""
]


@pytest.mark.parametrize("pattern,kind,value,expected", MATCH_CASES)
def test_match(pattern, kind, value, expected):
    assert match(pattern, value, kind, ignore_case=(kind == "host")) is expected
    assert GlobSet([pattern], kind).match(value) is expected


@pytest.mark.parametrize("pattern,kind,reason", [
    ("", "name", "must not be empty"),
    ("repos/*", "path", 'invalid path glob "repos/*": must start with "/"'),
    ("/a/***", "path", 'invalid glob "/a/***": use "*" or "**", not three or more "*" in a row'),
    ("/a b", "path", 'invalid glob "/a b": must not contain whitespace'),
    ("https://api.github.com", "host", 'invalid host glob "https://api.github.com": give the host name only, without a scheme'),
    ("api.github.com/repos", "host", 'invalid host glob "api.github.com/repos": give the host name only, without a path'),
    ("api.github.com:443", "host", 'invalid host glob "api.github.com:443": give the host name only, without a port'),
])
def test_glob_errors(pattern, kind, reason):
    assert glob_error(pattern, kind) == reason


@pytest.mark.parametrize("pattern,kind", [
    ("/repos/**", "path"), ("/", "path"), ("*.example.com", "host"), ("*", "name"), ("s3:*", "name"),
])
def test_valid_globs(pattern, kind):
    assert glob_error(pattern, kind) is None


def test_empty_allowed_when_asked():
    assert glob_error("", "name", allow_empty=True) is None


def test_globset_mixes_literals_and_wildcards():
    gs = GlobSet(["GET", "s3:Get*", "iam:ListRoles"], ignore_case=True)
    assert gs.match("get") and gs.match("S3:GETOBJECT") and gs.match("iam:listroles")
    assert not gs.match("iam:CreateRole")


def test_first_match_reports_the_pattern_as_written():
    gs = GlobSet(["*.internal", "*.example.com", "api.example.com"], "host")
    assert gs.first_match("API.example.com") == "*.example.com"
    assert gs.first_match("example.org") is None


def test_compilation_is_cached_and_translation_is_plain_regex():
    assert compile_glob("/a/*", "path") is compile_glob("/a/*", "path")
    assert translate("/a/*", "path") == "/a/[^/]*"
    assert translate("/a/**", "path") == "/a(?:/.*)?"
    assert translate("a*", "name") == "a.*"
    assert is_literal("s3:DeleteBucket") and not is_literal("s3:*") and not is_literal("a?")


def test_anchored_at_the_very_end():
    # "\Z", not "$": a trailing newline does not end the value, so it cannot sneak past a literal.
    assert not match("api.github.com", "api.github.com\n", "host")
    assert not match("/admin/*", "/admin/x\n/y", "path")
    assert not GlobSet(["api.github.com"], "host").match("api.github.com\n")
    # "*" in a name glob is any character, newline included (nothing hides from a block rule)
    assert match("*.evil.com", "x\n.evil.com", "host")
