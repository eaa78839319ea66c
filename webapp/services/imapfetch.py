"""The bulk fetch of new messages, on the IMAP connection IMAPClient opened.

IMAPClient's response parser tokenizes ENVELOPE structures byte by byte (~240 µs a
message), several times the cost of the fetch itself. The initial sync of a large
mailbox asks instead for a few header fields and the start of the first body part,
which the server sends as literals that imaplib reads in blocks.
"""

from __future__ import annotations

import binascii
import functools
import imaplib
import quopri
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from email.header import decode_header, make_header
from email.utils import getaddresses, parsedate_to_datetime
from html import unescape
from typing import Any, cast

from imapclient import IMAPClient

HEADER_FIELDS = "MESSAGE-ID SUBJECT FROM TO CC DATE CONTENT-TYPE CONTENT-TRANSFER-ENCODING"
PREFIX_BYTES = 8192
START = re.compile(rb"^\d+ \(")
MAX_LINE = 1_000_000  # imaplib's limit on a response line
UNTAGGED = imaplib.Untagged_response  # type: ignore[attr-defined]  # "* OK ...", "* BYE ..."
RESPONSE_CODE = imaplib.Response_code  # type: ignore[attr-defined]  # "[HIGHESTMODSEQ 42]"
ITEM = re.compile(  # item names are case-insensitive atoms (RFC 3501)
    rb"\b(?:UID (\d+)|RFC822\.SIZE (\d+)|FLAGS \(([^)]*)\)|MODSEQ \((\d+)\)"
    rb'|INTERNALDATE "([^"]+)")',
    re.IGNORECASE,
)
QUOTED_SECTION = re.compile(rb'\bBODY\[([^\]]*)\](?:<\d+>)? "((?:[^"\\]|\\.)*)"', re.IGNORECASE)
SECTION = re.compile(rb"\bBODY\[([^\]]*)\]", re.IGNORECASE)
QUOTED = re.compile(rb'(INTERNALDATE )?"(?:[^"\\]|\\.)*"', re.IGNORECASE)
UNFOLD = re.compile(r"\r?\n[ \t]+")
# a wanted field at the start of a line, with its continuation lines
WANTED_FIELD = re.compile(
    r"^(message-id|subject|from|to|cc|date|content-type|content-transfer-encoding)[ \t]*:"
    r"(.*(?:\r?\n[ \t].*)*)",
    re.IGNORECASE | re.MULTILINE,
)
BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
CHARSET = re.compile(r'charset="?([^";\s]+)"?', re.IGNORECASE)
TAGS = re.compile(r"<[^>]*(?:>|$)")
# What a browser does not show: the head (title, styles), scripts and comments, up to
# their end (a head whose end tag is left out: up to <body>) or to the end of the
# prefix when it cuts them off.
HIDDEN = re.compile(
    r"<(head|style|script|title)\b.*?(?:</\1\s*>|(?=<body\b)|$)|<!--.*?(?:-->|$)",
    re.DOTALL | re.IGNORECASE,
)
RFC5322_DATE = re.compile(
    r"(?:[A-Za-z]{3}, ?)?(\d{1,2}) ([A-Za-z]{3}) (\d{4}) (\d{2}):(\d{2})(?::(\d{2}))?"
    r" ([+-])(\d{2})(\d{2})(?: \([^()]*\))?"
)
MONTHS = {
    name: number
    for number, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1
    )
}
ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+")


class FetchError(Exception):
    """The server answered the FETCH with NO or BAD."""


@dataclass
class Fetched:
    uid: int = 0
    flags: list[str] | None = None  # None: the response had no FLAGS item
    size: int | None = None
    modseq: int | None = None
    internaldate: bytes | None = None  # raw; parsed only when the Date header fails
    header: bytes = b""
    body: bytes = b""


NEW_ITEMS = f"(UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[]<0.{PREFIX_BYTES}>)"
LONG_HEADER_ITEMS = (
    f"(UID BODY.PEEK[HEADER.FIELDS ({HEADER_FIELDS})] BODY.PEEK[TEXT]<0.{PREFIX_BYTES}>)"
)


def request_new(client: IMAPClient, uids: list[int]) -> bytes:
    """Send the UID FETCH of flags, size and the first PREFIX_BYTES of each raw message
    (the server reads those without parsing MIME) and return its tag; `receive_new`
    reads the answer, which the server prepares meanwhile. One command at a time is in
    flight: untagged answers cannot be told apart, so nothing else may be sent before
    it is read."""
    return _send_fetch(client._imap, uids, NEW_ITEMS)  # noqa: SLF001 - see the module doc


def receive_new(client: IMAPClient, uids: list[int], tag: bytes) -> list[Fetched]:
    """The messages of `request_new`'s answer; headers longer than the prefix are
    fetched again as header fields first."""
    imap = client._imap  # noqa: SLF001
    messages = _by_uid(_parse(_read_answer(imap, tag)), set(uids))
    long_headers = {uid: m for uid, m in messages.items() if not m.header}
    if long_headers:  # or no body at all: the prefix is header text, not a body
        answers = _parse(_uid_fetch(imap, list(long_headers), LONG_HEADER_ITEMS))
        answered = _by_uid(answers, set(long_headers))
        for uid, message in long_headers.items():
            extra = answered.get(uid)  # none: expunged in between, gone at the next sync
            message.header, message.body = (extra.header, extra.body) if extra else (b"", b"")
    return list(messages.values())


def fetch_flags(
    client: IMAPClient, known: set[int], changedsince: int | None
) -> dict[int, list[str]]:
    """UID -> flags of the `known` messages (CHANGEDSINCE: only those changed), asked
    for as one UID range and filtered here. Read here rather than through IMAPClient,
    which files an unsolicited FETCH that names only a sequence number (servers
    without CONDSTORE) under the UID of that number."""
    if not known:
        return {}
    items = "(UID FLAGS)" + (f" (CHANGEDSINCE {changedsince})" if changedsince is not None else "")
    data = _uid_fetch(client._imap, f"{min(known)}:{max(known)}", items)  # noqa: SLF001
    return {uid: m.flags for uid, m in _by_uid(_parse(data), known).items() if m.flags is not None}


def _by_uid(parsed: list[Fetched], requested: set[int]) -> dict[int, Fetched]:
    """One entry per requested UID. A server may slip unsolicited FETCH responses
    (another session changed flags; with CONDSTORE they carry a UID) in between the
    answers: those for other messages are dropped, those for a requested one are
    merged into it, the later flags winning."""
    merged: dict[int, Fetched] = {}
    for message in parsed:
        if message.uid not in requested:
            continue
        seen = merged.setdefault(message.uid, message)
        if seen is message:
            continue
        if message.header or message.body:
            seen.header, seen.body = message.header, message.body
        if message.flags is not None:
            seen.flags = message.flags
        seen.size = message.size if message.size is not None else seen.size
        seen.modseq = message.modseq if message.modseq is not None else seen.modseq
        seen.internaldate = message.internaldate or seen.internaldate
    return merged


def _uid_fetch(imap: Any, uids: list[int] | str, items: str) -> list[Any]:
    """What imaplib's `uid("FETCH", ...)` returns: the FETCH responses, a (text, literal)
    tuple for each literal and the bytes after the last one, each without "* " and the
    word FETCH. imaplib sends the command; the answer is read here, with imaplib's own
    buffered file, at about a third of imaplib's cost per message (its reader matches
    several patterns, logs and files every line). Other untagged responses are filed
    where imaplib files them; BYE, an unexpected line or the end of the stream abort."""
    return _read_answer(imap, _send_fetch(imap, uids, items))


def _send_fetch(imap: Any, uids: list[int] | str, items: str) -> bytes:
    uid_set = uids if isinstance(uids, str) else ",".join(map(str, uids))
    imap._check_bye()
    return cast(bytes, imap._command("UID", "FETCH", uid_set, items))


def _read_answer(imap: Any, tag: bytes) -> list[Any]:
    """_uid_fetch's answer to the command sent with `tag`."""
    # FETCH responses that arrived unasked during an earlier command come first, as
    # imaplib hands them over with this answer
    data: list[Any] = imap.untagged_responses.pop("FETCH", [])
    readline, read, done = imap.file.readline, imap.file.read, tag + b" "
    while True:
        line = _line(imap, readline)
        if line.startswith(done):
            del imap.tagged_commands[tag]
            status, _, text = line[len(done) : -2].partition(b" ")
            _file_response_code(imap, text)
            if status == b"OK":
                return data
            message = f"{status.decode('ascii', 'replace')} {text.decode('utf-8', 'replace')}"
            if status == b"NO":  # Gmail's "Some messages could not be FETCHed": later
                raise FetchError(f"FETCH failed: {message}")
            raise imap.error(f"FETCH command error: {message}")
        if line.startswith(b"+"):
            continue  # a continuation request no command here asked for: imaplib ignores it
        if not line.startswith(b"* "):
            raise imap.abort(f"unexpected response: {line[:200]!r}")
        parts: list[Any] = []
        while line.endswith(b"}\r\n") and (size := _literal_size(line)) is not None:
            value = read(size)
            if len(value) < size:
                raise imap.abort("socket error: EOF")
            parts.append((line[:-2], value))
            line = _line(imap, readline)
        parts.append(line[:-2])
        text = parts[0][0] if isinstance(parts[0], tuple) else parts[0]
        number, _, rest = text[2:].partition(b" ")
        kind, _, rest = rest.partition(b" ")
        if kind == b"FETCH" and number.isdigit():
            head = number + b" " + rest if rest else number
            parts[0] = (head, parts[0][1]) if isinstance(parts[0], tuple) else head
            data.extend(parts)
        else:
            _file_untagged(imap, text, parts)


def _line(imap: Any, readline: Any) -> bytes:
    line = readline(MAX_LINE + 1)
    if not line:
        raise imap.abort("socket error: EOF")
    if len(line) > MAX_LINE or not line.endswith(b"\r\n"):
        raise imap.abort(f"socket error: unterminated line: {line[:200]!r}")
    if imap.debug >= 4:  # on only when the imapclient.imaplib logger listens (mailconn)
        imap._mesg(f"< {line!r}")
    return line


def _literal_size(line: bytes) -> int | None:
    """N of a line that ends in {N} and CRLF: a literal of N bytes follows it."""
    opening = line.rfind(b"{")
    size = line[opening + 1 : -3]
    return int(size) if opening >= 0 and size.isdigit() else None


def _file_untagged(imap: Any, first: bytes, parts: list[Any]) -> None:
    """File an untagged response other than FETCH (EXISTS, EXPUNGE, OK [...], BYE) where
    and as imaplib's own reader files it; a BYE aborts, as imaplib's check for it does.
    `first` is the text of its first part."""
    if imap._match(UNTAGGED, first):
        head = imap.mo.group("data") or b""
    elif imap._match(imap.Untagged_status, first):
        data2 = imap.mo.group("data2")
        head = imap.mo.group("data") + (b" " + data2 if data2 else b"")
    else:
        raise imap.abort(f"unexpected response: {first[:200]!r}")
    typ = imap.mo.group("type").decode("ascii")
    for index, part in enumerate(parts):
        text, literal = part if isinstance(part, tuple) else (part, None)
        text = head if index == 0 else text
        imap._append_untagged(typ, text if literal is None else (text, literal))
    last = head if len(parts) == 1 else parts[-1]
    if typ in ("OK", "NO", "BAD"):
        _file_response_code(imap, last)
    if typ == "BYE":
        raise imap.abort(f"server said BYE: {last[:200]!r}")


def _file_response_code(imap: Any, text: bytes) -> None:
    """A status's response code ("OK [HIGHESTMODSEQ 9] ..."), filed as imaplib files it."""
    if imap._match(RESPONSE_CODE, text):
        imap._append_untagged(imap.mo.group("type").decode("ascii"), imap.mo.group("data"))


def _parse(data: list[tuple[bytes, bytes] | bytes | None]) -> list[Fetched]:
    messages: list[Fetched] = []
    current: Fetched | None = None
    for part in data:
        if part is None or part == b")":
            continue  # the ")" that closes a response
        text, literal = part if isinstance(part, tuple) else (part, None)
        if current is None or START.match(text):
            current = Fetched()
            messages.append(current)
        quotes = text.count(b'"')
        if not quotes or (quotes == 2 and b'INTERNALDATE "' in text):
            _meta(current, text)  # INTERNALDATE's quotes alone (every message)
        else:
            # a quoted body section may itself read "UID 9 FLAGS (...)": blanked first
            _meta(current, QUOTED.sub(lambda match: match[0] if match[1] else b'""', text))
            for quoted in QUOTED_SECTION.finditer(text):
                # a server may send a short body section as a quoted string, not a literal
                _store(current, quoted[1], re.sub(rb"\\(.)", rb"\1", quoted[2]))
        if literal is not None:  # it belongs to the section that ends the text
            sections = SECTION.findall(text)
            _store(current, sections[-1] if sections else b"", literal)
    return messages


def _store(message: Fetched, section: bytes, data: bytes) -> None:
    name = section.upper()
    if name == b"TEXT":
        message.body = data
    elif name.startswith(b"HEADER"):
        message.header = data
    else:  # BODY[]<0.N>: the start of the raw message, header and body
        head, separator, body = _split_head(data)
        if separator:
            message.header, message.body = head + b"\r\n", body
        else:  # a header longer than the prefix, or one with no body after it
            message.header, message.body = b"", data


def _split_head(data: bytes) -> tuple[bytes, bytes, bytes]:
    """(header, blank line, body) of a message or MIME part; bare LF line ends too, as a
    maildir server may hand messages out as it stores them. No blank line: (data, "", "")."""
    head, separator, body = data.partition(b"\r\n\r\n")
    if not separator:
        head, separator, body = data.partition(b"\n\n")
    return head, separator, body


def _meta(message: Fetched, text: bytes) -> None:
    """The items of a response's text, in one pass (ITEM's groups: 1 UID, 2 RFC822.SIZE,
    3 FLAGS, 4 MODSEQ, 5 INTERNALDATE)."""
    seen = 0  # the first of an item in a text counts, as before a look-alike later on
    for match in ITEM.finditer(text):
        item = match.lastindex or 0  # one group always takes part
        if seen & (bit := 1 << item):
            continue
        seen |= bit
        value = match[item]
        if item == 1:
            message.uid = int(value)
        elif item == 2:
            message.size = int(value)
        elif item == 3:
            message.flags = [
                flag.decode("utf-8", "replace")
                for flag in value.split()
                if flag.lower() != b"\\recent"  # session state, not the message's
            ]
        elif item == 4:
            message.modseq = int(value)
        else:
            message.internaldate = value


@dataclass
class Envelope:
    message_id: str | None
    subject: str | None
    from_address: str | None
    to_addresses: list[str]
    cc_addresses: list[str]
    sent_at: datetime | None


def envelope(headers: dict[str, list[str]]) -> Envelope:
    message_id = _first(headers, "message-id")
    return Envelope(
        message_id=message_id or None,
        subject=_decoded(_first(headers, "subject")),
        from_address=next(iter(_addresses(headers.get("from", []))), None),
        to_addresses=_addresses(headers.get("to", [])),
        cc_addresses=_addresses(headers.get("cc", [])),
        sent_at=_date(_first(headers, "date")),
    )


def split_headers(header: bytes) -> dict[str, list[str]]:
    """Header name (lower-case) -> unfolded values, for the fields this module reads
    (WANTED_FIELD); the rest (Received, DKIM and the like, most of a real header) are
    skipped by the regular expression. The email package's parser is exact but costs
    ~300 µs a message; these few fields need no more than this."""
    fields: dict[str, list[str]] = {}
    text = header.decode("utf-8", "replace").replace("\x00", "")  # PostgreSQL refuses NUL
    for name, value in WANTED_FIELD.findall(text):
        if "\n" in value:
            value = UNFOLD.sub(" ", value)
        fields.setdefault(name.lower(), []).append(value.strip())
    return fields


def _first(headers: dict[str, list[str]], name: str) -> str | None:
    values = headers.get(name)
    return values[0] if values else None


def _decoded(value: str | None) -> str | None:
    if value is None or "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value))).replace("\x00", "")
    except Exception:
        return value


def _addresses(values: list[str]) -> list[str]:
    result: list[str] = []
    for value in values:
        if '"' in value or "(" in value or "=?" in value:
            # display names that may hold commas or @: the full RFC 5322 parser
            result.extend(a for _n, a in getaddresses([value]) if "@" in a)
        else:
            result.extend(ADDRESS.findall(value))
    return result


def _date(value: str | None) -> datetime | None:
    if not value:
        return None
    match = RFC5322_DATE.fullmatch(value)  # the usual form, ~4x cheaper than email.utils
    if match and int(match[3]) >= 100:  # email.utils reads years below 100 as 19xx/20xx
        day, month, year, hour, minute, second, sign, zone_h, zone_m = match.groups()
        try:
            parsed = datetime(
                int(year), MONTHS[month.lower()], int(day), int(hour), int(minute),
                int(second or 0), tzinfo=_zone(sign, zone_h, zone_m),
            )  # fmt: skip
        except (KeyError, ValueError):
            pass  # 31 Feb, no such month, a zone of a day or more: email.utils decides
        else:
            return _utc(parsed)
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return _utc(parsed)


@functools.lru_cache(maxsize=256)
def _zone(sign: str, hours: str, minutes: str) -> timezone:
    """The zone of a +hhmm offset; a mailbox's messages share a few."""
    offset = timedelta(hours=int(hours), minutes=int(minutes))
    return timezone(-offset if sign == "-" else offset)


def _utc(moment: datetime) -> datetime | None:
    """None for a moment past the calendar's edge in UTC (31 Dec 9999 23:00 -0100)."""
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        return None


def internal_date(value: bytes | None) -> datetime | None:
    """The server's arrival time (`17-Jul-1996 02:44:25 -0700`), in UTC."""
    if not value:
        return None
    try:
        parsed = datetime.strptime(value.decode("ascii").strip(), "%d-%b-%Y %H:%M:%S %z")
    except (UnicodeDecodeError, ValueError):
        return None
    return _utc(parsed)


def snippet_text(headers: dict[str, list[str]], body: bytes, limit: int = 200) -> str:
    """Readable start of the message: the first text part, transfer-decoded, tags
    stripped, white space folded. Works on the prefix only."""
    content_type = _first(headers, "content-type") or ""
    for _depth in range(3):
        if not content_type.lower().startswith("multipart/"):
            break
        boundary = BOUNDARY.search(content_type)
        if not boundary:
            return ""
        marker = b"--" + boundary.group(1).strip('"').encode()
        parts = body.split(marker)
        if len(parts) < 2:
            return ""
        head, _separator, body = _split_head(parts[1].lstrip(b"\r\n"))
        headers = split_headers(head + b"\r\n")
        content_type = _first(headers, "content-type") or ""
    encoding = (_first(headers, "content-transfer-encoding") or "").strip().lower()
    if encoding == "base64":
        compact = re.sub(rb"[^A-Za-z0-9+/=]", b"", body)
        body = binascii.a2b_base64(compact[: len(compact) // 4 * 4] or b"")
    elif encoding == "quoted-printable":
        body = quopri.decodestring(body)
    charset = CHARSET.search(content_type) if "=" in content_type else None
    try:
        text = body.decode(charset.group(1).strip('"') if charset else "utf-8", "replace")
    except LookupError:
        text = body.decode("utf-8", "replace")
    html = "html" in content_type.lower()
    # Fold a window a few times the snippet's length first (the whole 8 KB prefix
    # costs ~4x more); take everything only when that window is mostly tags or spaces.
    window = limit * (16 if html else 2)
    for chunk in (text[:window], text) if len(text) > window else (text,):
        if html:
            chunk = unescape(TAGS.sub(" ", HIDDEN.sub(" ", chunk)))
        snippet = " ".join(chunk.split())  # not re: 4x slower
        if len(snippet) > limit:
            break
    return snippet[:limit].rstrip()
