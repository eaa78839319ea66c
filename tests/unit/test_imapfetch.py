"""Parsing of the bulk IMAP fetch: header fields and readable snippets."""

from __future__ import annotations

import base64
import imaplib
import re
from datetime import UTC
from email.utils import parsedate_to_datetime

import pytest

from webapp.services.imapfetch import (
    FetchError,
    _date,
    _parse,
    envelope,
    internal_date,
    receive_new,
    request_new,
    snippet_text,
    split_headers,
)
from webapp.services.mailconn import is_transient


def test_envelope_decodes_folded_encoded_headers_and_addresses():
    header = (
        b"Message-ID: <a@b>\r\nSubject: =?utf-8?q?caf=C3=A9?= and\r\n more\r\n"
        b'From: "Doe, John" <john@x.org>\r\nTo: a@b.com, C <c@d.com>\r\nCc: e@f.org\r\n'
        b"Date: Fri, 27 Nov 2026 07:00:00 +0100\r\n"
    )
    env = envelope(split_headers(header))
    assert env.message_id == "<a@b>"
    assert env.subject == "café and more"
    assert env.from_address == "john@x.org"
    assert env.to_addresses == ["a@b.com", "c@d.com"] and env.cc_addresses == ["e@f.org"]
    assert env.sent_at.isoformat() == "2026-11-27T06:00:00+00:00"


def test_envelope_tolerates_missing_and_broken_fields():
    env = envelope(split_headers(b"Date: not a date\r\n"))
    assert env.subject is None and env.from_address is None and env.sent_at is None


def test_snippet_of_a_multipart_quoted_printable_message():
    headers = split_headers(b'Content-Type: multipart/alternative; boundary="xyz"\r\n')
    body = (
        b"preamble\r\n--xyz\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\nCaf=C3=A9 au lait,\r\n  tomorrow?\r\n"
        b"--xyz\r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n--xyz--"
    )
    assert snippet_text(headers, body) == "Café au lait, tomorrow?"


def test_snippet_of_base64_html_even_when_cut_off():
    headers = split_headers(
        b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n"
    )
    encoded = base64.encodebytes(b"<p>Hello <b>world</b></p>")
    assert snippet_text(headers, encoded) == "Hello world"
    assert snippet_text(headers, encoded[:20]).startswith("Hello")


@pytest.mark.parametrize(
    ("html", "expected"),
    [
        (b"<html><head><title>Newsletter</title><style>p{color:red}</style></head>"
         b"<body><p>Hi there</p></body></html>", "Hi there"),
        (b"<STYLE type='text/css'>\r\np { color: red }\r\n</STYLE >A &amp; B&nbsp;C &lt;3",
         "A & B C <3"),
        (b"<script>var x = '<p>';</script><!-- hidden <b>note</b> --><header>Top</header> ok",
         "Top ok"),
        (b"<p>Visible</p><style>cut off by the prefix, never closed", "Visible"),
        (b"<p>Visible</p><!-- cut off", "Visible"),
        (b"<html><head><meta charset=utf-8><title>T</title><body><p>Hello reader</p>",
         "Hello reader"),  # </head> may be left out
    ],
)  # fmt: skip
def test_html_snippet_is_the_text_a_reader_sees(html, expected):
    """Found against hoodiecrow-imap: styles and titles were in snippets, entities raw."""
    headers = split_headers(b"Content-Type: text/html; charset=utf-8\r\n")
    assert snippet_text(headers, html) == expected


def test_parse_splits_prefix_into_header_and_body():
    data = [
        (
            b"1 (UID 7 FLAGS (\\Seen \\Recent \\Flagged) RFC822.SIZE 1500 BODY[]<0> {40}",
            b"Subject: hi\r\nTo: a@b.com\r\n\r\nbody text",
        ),
        b")",
        (
            b'2 (UID 9 FLAGS () INTERNALDATE " 7-Jul-2026 02:44:25 -0700" RFC822.SIZE 20 '
            b"MODSEQ (12) BODY[]<0> {11}",
            b"no-break-hd",
        ),
        b")",
    ]
    first, second = _parse(data)
    assert (first.uid, first.flags, first.size) == (7, ["\\Seen", "\\Flagged"], 1500)
    assert first.header.startswith(b"Subject: hi") and first.body == b"body text"
    assert second.uid == 9 and second.modseq == 12 and second.header == b""
    assert first.internaldate is None
    assert internal_date(second.internaldate).isoformat() == "2026-07-07T09:44:25+00:00"
    assert internal_date(b"garbage") is None and internal_date(None) is None


class _Wire:
    """The server's side of the stream, as imaplib reads it (readline, read)."""

    def __init__(self, data=b""):
        self.buffer = bytearray(data)

    def readline(self, limit=-1):
        end = self.buffer.find(b"\n") + 1 or len(self.buffer)
        end = min(end, limit) if limit >= 0 else end
        line = bytes(self.buffer[:end])
        del self.buffer[:end]
        return line

    def read(self, size):
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data


class _ScriptedIMAP(imaplib.IMAP4):
    """A real imaplib connection, in the SELECTED state, over canned server bytes: each
    command sent is answered by the next answer, its TAG replaced by the command's tag."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.commands = []
        super().__init__("scripted.example")
        self.state = "SELECTED"

    def open(self, host="", port=0, timeout=None):
        self.host, self.port = host, port
        self.file = _Wire(b"* OK ready\r\n")

    def send(self, data):
        tag, _, command = data.rstrip(b"\r\n").partition(b" ")
        if command == b"CAPABILITY":  # imaplib asks once it has read the greeting
            self.file.buffer += b"* CAPABILITY IMAP4rev1\r\n%s OK done\r\n" % tag
            return
        self.commands.append(tuple(command.decode().split(" ", 3)[1:]))
        self.file.buffer += self.answers.pop(0).replace(b"TAG", tag)

    def shutdown(self):
        pass


class _FakeClient:
    def __init__(self, imap):
        self._imap = imap


def fetch_new(client, uids):
    """What the sync does for a batch: send the FETCH, then read and complete it."""
    return receive_new(client, uids, request_new(client, uids))


def _literal(data):
    return b"{%d}\r\n%s" % (len(data), data)


def test_fetch_new_refetches_header_fields_when_the_header_is_longer_than_the_prefix():
    long_header_prefix = b"Received: " + b"x" * 100  # no blank line within the prefix
    imap = _ScriptedIMAP(
        [
            b"* 1 FETCH (UID 5 FLAGS () RFC822.SIZE 9000 BODY[]<0> "
            + _literal(long_header_prefix)
            + b")\r\n* 2 FETCH (UID 6 FLAGS (\\Seen) RFC822.SIZE 50 BODY[]<0> "
            + _literal(b"Subject: ok\r\n\r\nshort body")
            + b")\r\nTAG OK done\r\n",
            b"* 1 FETCH (UID 5 BODY[HEADER.FIELDS (SUBJECT)] "
            + _literal(b"Subject: long one\r\n\r\n")
            + b" BODY[TEXT]<0> "
            + _literal(b"body after\r\n\r\nthe long header")
            + b")\r\nTAG OK done\r\n",
        ]
    )
    long_one, short_one = fetch_new(_FakeClient(imap), [5, 6])
    assert envelope(split_headers(long_one.header)).subject == "long one"
    assert long_one.body == b"body after\r\n\r\nthe long header"  # not the header's text
    assert envelope(split_headers(short_one.header)).subject == "ok"
    assert short_one.body == b"short body"
    assert imap.commands[1][1] == "5"  # only the long one was fetched again
    assert "BODY.PEEK[TEXT]" in imap.commands[1][2]


def test_parse_files_each_literal_under_its_own_section_in_any_order():
    text_first, header_only = _parse(
        [
            (b"1 (UID 5 BODY[TEXT]<0> {12}", b"hello\r\n\r\nthere"),
            (b' BODY[HEADER.FIELDS ("SUBJECT")] {15}', b"Subject: a\r\n\r\n"),
            b")",
            (
                b'2 (UID 6 BODY[TEXT]<0> "" BODY[HEADER.FIELDS (SUBJECT)] {15}',
                b"Subject: b\r\n\r\n",
            ),
            b")",
        ]
    )
    assert (text_first.header, text_first.body) == (b"Subject: a\r\n\r\n", b"hello\r\n\r\nthere")
    assert (header_only.header, header_only.body) == (b"Subject: b\r\n\r\n", b"")


def test_fetch_new_merges_unsolicited_fetch_responses_and_drops_other_messages():
    """Another session set \\Flagged on UID 6 and touched UID 99 while this FETCH ran:
    with CONDSTORE the server slips those in as FETCH responses carrying a UID."""
    imap = _ScriptedIMAP(
        [
            b"* 1 FETCH (UID 5 FLAGS () RFC822.SIZE 30 BODY[]<0> "
            + _literal(b"Subject: a\r\n\r\nfirst body")
            + b")\r\n* 2 FETCH (UID 6 MODSEQ (40) FLAGS (\\Seen \\Flagged))\r\n"
            b"* 7 FETCH (UID 99 FLAGS (\\Seen) RFC822.SIZE 10 BODY[]<0> "
            + _literal(b"X: y\r\n\r\nzz")
            + b")\r\n* 2 FETCH (FLAGS (\\Seen) UID 6 RFC822.SIZE 31 BODY[]<0> "
            + _literal(b"Subject: b\r\n\r\nsecond body")
            + b" MODSEQ (41))\r\nTAG OK done\r\n"
        ]
    )
    first, second = fetch_new(_FakeClient(imap), [5, 6])
    assert len(imap.commands) == 1  # both headers were complete: nothing fetched again
    assert (first.uid, first.flags, first.body) == (5, [], b"first body")
    assert (second.uid, second.size, second.modseq) == (6, 31, 41)
    assert second.flags == ["\\Seen"]  # the later response wins
    assert envelope(split_headers(second.header)).subject == "b"


def test_parse_accepts_a_body_section_sent_as_a_quoted_string():
    data = [b'1 (UID 3 BODY[]<0> "Subject: short") ']
    (only,) = _parse(data)
    assert only.uid == 3 and only.body == b"Subject: short"
    quoted = _parse([b'1 (UID 4 BODY[]<0> "say \\"hi\\"")'])[0]
    assert quoted.body == b'say "hi"'


def test_snippet_folds_a_long_body_from_its_start():
    headers = split_headers(b"Content-Type: text/html\r\n")
    body = b"<p>" + b"<span> </span>" * 200 + b"Hello   there</p>" + b"x " * 3000
    snippet = snippet_text(headers, body, limit=50)
    assert snippet == ("Hello there " + "x " * 30)[:50].rstrip()
    plain = snippet_text({}, b"word\r\n\r\n  " * 1000, limit=30)
    assert plain == ("word " * 6).strip()


def test_parse_reads_items_in_any_order_and_ignores_look_alikes_in_quoted_strings():
    """A server may send the body section first, as a quoted string that itself reads
    like FETCH items; the items outside it are the message's."""
    (first,) = _parse(
        [
            b'1 (BODY[]<0> "UID 9 FLAGS (\\\\Deleted) RFC822.SIZE 1" '
            b'INTERNALDATE "07-Jul-2026 02:44:25 -0700" FLAGS (\\Seen) UID 3 RFC822.SIZE 20)'
        ]
    )
    assert (first.uid, first.flags, first.size) == (3, ["\\Seen"], 20)
    assert first.body == b"UID 9 FLAGS (\\Deleted) RFC822.SIZE 1"
    assert internal_date(first.internaldate).isoformat() == "2026-07-07T09:44:25+00:00"
    (nil,) = _parse([b"1 (UID 4 RFC822.SIZE 0 FLAGS () BODY[]<0> NIL)"])
    assert (nil.uid, nil.size, nil.header, nil.body) == (4, 0, b"", b"")


def test_envelope_drops_nul_characters_postgresql_cannot_store():
    env = envelope(split_headers(b"Subject: =?utf-8?b?AGJhZA==?=\r\nMessage-ID: <a\x00@b>\r\n"))
    assert (env.subject, env.message_id) == ("bad", "<a@b>")


def test_fetch_flags_ignores_unsolicited_fetch_responses_without_a_uid():
    """Without CONDSTORE (Office 365) an unsolicited FETCH for another session's change
    names a sequence number only; it must not be taken for the UID of that number."""
    from webapp.services.imapfetch import fetch_flags

    imap = _ScriptedIMAP(
        [
            b"* 1 FETCH (UID 2 FLAGS (\\Seen))\r\n"
            b"* 2 FETCH (FLAGS (\\Deleted \\Seen))\r\n"  # unsolicited: seq 2, UID unknown
            b"* 2 FETCH (UID 3 FLAGS (\\Recent))\r\nTAG OK done\r\n"
        ]
    )
    assert fetch_flags(_FakeClient(imap), {2, 3}, changedsince=None) == {2: ["\\Seen"], 3: []}
    assert imap.commands == [("FETCH", "2:3", "(UID FLAGS)")]
    # one range for the folder; UIDs in it that are not stored are left out
    imap = _ScriptedIMAP(
        [
            b"* 1 FETCH (UID 2 MODSEQ (8) FLAGS ())\r\n* 2 FETCH (UID 4 MODSEQ (9) FLAGS ())\r\n"
            b"TAG OK done\r\n"
        ]
    )
    assert fetch_flags(_FakeClient(imap), {2, 5}, changedsince=7) == {2: []}
    assert imap.commands == [("FETCH", "2:5", "(UID FLAGS) (CHANGEDSINCE 7)")]


def test_split_headers_picks_the_wanted_fields_among_many_others():
    header = (
        b"Received: from a (a [1.2.3.4])\r\n\tby b; Fri, 27 Nov 2026 07:00:00 +0100\r\n"
        b"DKIM-Signature: v=1; a=rsa-sha256;\r\n d=x.org; s=s;\r\n"
        b"X-From: spoof@evil.example\r\nDate-Received: never\r\nIn-Reply-To: <r@x>\r\n"
        b"to: a@b.com,\r\n  c@d.com\r\nSUBJECT :  Hello\r\n"
        b"From sender@x Fri Nov 27 07:00:00 2026\r\nFrom: real@x.org\r\n"
        b"Cc: e@f.org\r\nCc: g@h.org\r\n"
    )
    fields = split_headers(header)
    assert fields == {
        "to": ["a@b.com, c@d.com"],
        "subject": ["Hello"],
        "from": ["real@x.org"],
        "cc": ["e@f.org", "g@h.org"],
    }
    assert envelope(fields).cc_addresses == ["e@f.org", "g@h.org"]


@pytest.mark.parametrize(
    "value",
    [
        "Fri, 20 Nov 2026 14:00:07 +0000",
        "20 Nov 2026 14:00 -0500",
        "Fri,20 Nov 2026 14:00:07 +0530 (IST)",
        "Mon, 1 Jan 2026 10:00:00 -0000",
        "Fri, 20 NOV 2026 14:00:07 +0000",
        "Wed, 29 Feb 2024 12:00:00 +1400",
        "Mon, 31 Feb 2026 10:00:00 +0000",
        "Tue, 01 Jan 2026 23:59:59 +2400",
        "Sun, 10 Xyz 2026 10:00:00 +0000",
        "Fri, 20 Nov 2026 24:00:00 +0000",
        "Fri, 20 Nov 2026 23:59:60 +0000",
        "Fri, 20 Nov 26 14:00:07 +0000",
        "Fri, 20 Nov 0026 14:00:07 +0000",
        "Fri, 20 Nov 0000 14:00:07 +0000",
        "Fri, 20 Nov 2026 14:00:07 +0099",
        "Fri, 20 Nov 2026 14:00:07 GMT",
    ],
)
def test_date_fast_path_agrees_with_the_email_package(value):
    try:
        expected = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        expected = None
    if expected is not None:
        naive = expected.tzinfo is None
        expected = expected.replace(tzinfo=UTC) if naive else expected.astimezone(UTC)
    assert _date(value) == expected


def test_dates_past_the_calendar_edge_in_utc_are_none_not_an_error():
    assert _date("Fri, 31 Dec 9999 23:00:00 -0100") is None
    assert _date("Fri 31 Dec 9999 23:00:00 -0100") is None  # no comma: the email.utils path
    assert internal_date(b"31-Dec-9999 23:00:00 -0100") is None
    assert _date("Fri, 31 Dec 9999 23:00:00 +0100").isoformat() == "9999-12-31T22:00:00+00:00"


ANSWER_WITH_EVERYTHING = (
    b"* 3 EXISTS\r\n"
    b"* 1 FETCH (UID 4 FLAGS (\\Seen) BODY[]<0> " + _literal(b"Subject: a\r\n\r\nbody") + b")\r\n"
    b"* 2 EXPUNGE\r\n"
    b"* OK [HIGHESTMODSEQ 42] still here\r\n"
    b"* 2 FETCH (UID 6 BODY[HEADER.FIELDS (SUBJECT)] " + _literal(b"Subject: b\r\n\r\n")
    + b" BODY[TEXT]<0> " + _literal(b"") + b" RFC822.SIZE 9)\r\n"
    b"* FLAGS (\\Answered \\Seen)\r\n"
    b'* 3 FETCH (UID 7 BODY[]<0> "quoted {5}" FLAGS ())\r\n'
    b"* NO [ALERT] mailbox nearly full\r\n"
    b"* 4 FETCH (uid 9 body[]<0> NIL)\r\n"  # item names in lower case
    b"TAG OK [HIGHESTMODSEQ 77] done\r\n"
)  # fmt: skip


def test_fetch_reader_returns_and_files_exactly_what_imaplib_does():
    """The same server bytes through imaplib's own reader and through Mailkey's."""
    from webapp.services.imapfetch import _uid_fetch

    ours, theirs = _ScriptedIMAP([ANSWER_WITH_EVERYTHING]), _ScriptedIMAP([ANSWER_WITH_EVERYTHING])
    for imap in (ours, theirs):  # unasked, during an earlier command
        imap.untagged_responses["FETCH"] = [b"9 (UID 12 FLAGS (\\Deleted))"]
    data = _uid_fetch(ours, "4:8", "(UID BODY.PEEK[]<0.8192>)")
    status, expected = theirs.uid("FETCH", "4:8", "(UID BODY.PEEK[]<0.8192>)")
    assert status == "OK" and data == expected
    assert ours.untagged_responses == theirs.untagged_responses
    assert ours.untagged_responses["HIGHESTMODSEQ"] == [b"42", b"77"]
    assert ours.tagged_commands == theirs.tagged_commands == {}
    assert [m.uid for m in _parse(data)] == [12, 4, 6, 7, 9]


@pytest.mark.parametrize(
    ("answer", "error", "message"),
    [
        (b"* 1 FETCH (UID 4 BODY[]<0> {10}\r\nSubj", imaplib.IMAP4.abort, "EOF"),
        (b"* 1 FETCH (UID 4 FLAGS ())\r\n", imaplib.IMAP4.abort, "EOF"),
        (b"* 1 FETCH (UID 4 FLAGS ())", imaplib.IMAP4.abort, "unterminated"),
        (b"* BYE shutting down\r\n", imaplib.IMAP4.abort, "BYE"),
        (b"A999 OK someone else's\r\n", imaplib.IMAP4.abort, "unexpected"),
        (b"TAG NO [UNAVAILABLE] try later\r\n", FetchError, "NO [UNAVAILABLE] try later"),
        (b"TAG BAD unknown item\r\n", imaplib.IMAP4.error, "BAD unknown item"),
    ],
)
def test_fetch_reader_aborts_on_a_broken_answer_and_raises_on_a_refused_one(answer, error, message):
    from webapp.services.imapfetch import _uid_fetch

    imap = _ScriptedIMAP([answer])
    with pytest.raises(error, match=re.escape(message)) as raised:
        _uid_fetch(imap, "4", "(UID FLAGS)")
    if error is not imaplib.IMAP4.abort:  # refused, not broken: the connection goes on
        assert not isinstance(raised.value, imaplib.IMAP4.abort)
        assert imap.tagged_commands == {}
    assert is_transient(raised.value) == (error is not imaplib.IMAP4.error)


def test_snippet_of_a_multipart_message_with_bare_line_feeds():
    """A maildir server may hand out messages as stored, with LF line ends."""
    headers = split_headers(b'Content-Type: multipart/alternative; boundary="b1"\n')
    body = (
        b"This is a multi-part message.\n--b1\nContent-Type: text/plain; charset=utf-8\n\n"
        b"Hello there,\nsee you.\n--b1\nContent-Type: text/html\n\n<p>x</p>\n--b1--\n"
    )
    assert snippet_text(headers, body) == "Hello there, see you."


def test_a_long_header_message_expunged_before_its_header_is_fetched_again_has_no_snippet():
    """The re-fetch of a long header answers nothing for a message expunged meanwhile: its
    prefix is header text, which must not become its snippet."""
    long_header_prefix = b"Subject: long\r\nReceived: " + b"x" * 100
    imap = _ScriptedIMAP(
        [
            b"* 1 FETCH (UID 5 FLAGS () RFC822.SIZE 9000 BODY[]<0> "
            + _literal(long_header_prefix)
            + b")\r\nTAG OK done\r\n",
            b"* 1 EXPUNGE\r\nTAG OK done\r\n",
        ]
    )
    (gone,) = fetch_new(_FakeClient(imap), [5])
    assert (gone.uid, gone.header, gone.body) == (5, b"", b"")
    assert snippet_text(split_headers(gone.header), gone.body) == ""
