"""What a person types into the search box, parsed into a small AST, and rendered safely.

The syntax is forgiving: whatever cannot be read as an operator is read as text, so
raw input never becomes a syntax error in the database. The only refusals (422) are a
query with nothing to look for, one that only excludes, and limits on size.

    word          pages with this word; case and accents do not matter ("tasacion"
                  finds "TASACIÓN", and the other way round)
    "two words"   the words next to each other, in this order; an unclosed quote runs
                  to the end of the input
    word*         words starting with this (at least 2 letters); "a phr"* too: the
                  last word of the phrase is the prefix
    -word         pages without the word (also -"a phrase", NOT word)
    a OR b        either; OR binds tighter than the space: "x a OR b" is x AND (a OR b)
    AND, ( )      accepted and ignored: every term must match anyway

Words are runs of letters and digits; everything else separates them ("Pérez-Núñez"
is the two words Pérez Núñez next to each other). A cadastral reference such as
9872023VH5797S0001WX is one word. The AST is rendered in two ways, never by
splicing user text into SQL: an FTS5 MATCH expression (every word double-quoted,
passed as one bound parameter) and a PostgreSQL tsquery expression built from
``phraseto_tsquery``/``to_tsquery`` calls whose arguments are bound parameters.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from archive.exceptions import DomainError

MAX_QUERY_CHARS = 1000
MAX_TERMS = 50
MAX_WORDS = 100
MAX_WORD_CHARS = 100
MIN_PREFIX_CHARS = 2


class QueryError(DomainError):
    """A search that cannot be run as typed (422, with what to change)."""

    title = "Invalid search query"


# -- text hygiene shared with the view ---------------------------------------------------

# C0/C1 controls (NUL included) become spaces; tab, newline and carriage return stay.
_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# Invisible format characters (soft hyphen, zero-width spaces and joiners, direction
# marks, BOM) and lone surrogates vanish: "hipo\u00adteca" is one word.
_INVISIBLE = re.compile(
    "[\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ud800-\udfff]"
)
# A word is a run of letters and digits (Python's \w without the underscore), as in
# SQLite's unicode61 tokenizer, where punctuation, symbols and marks separate words.
_WORD = re.compile(r"[^\W_]+")
_NOT_WORD = re.compile(r"[\W_]+")


# The Latin typographic ligatures (U+FB00-FB06) as their letters: PDF text layers carry
# them ("certiﬁcado", "ﬁnca"), and the tokenizer reads "ﬁ" as a letter of its own, so
# "finca" did not find "ﬁnca". NFC keeps them; NFKC would also turn "nº" into "no".
_LIGATURES = str.maketrans(
    {chr(code): unicodedata.normalize("NFKC", chr(code)) for code in range(0xFB00, 0xFB07)}
)


def clean_text(text: str) -> str:
    """NFC, without control or invisible characters, ligatures spelt out: what is
    stored and indexed, and what a query is read as."""
    text = _INVISIBLE.sub("", text)
    text = unicodedata.normalize("NFC", text).translate(_LIGATURES)
    return _CONTROLS.sub(" ", text)


def has_control(text: str) -> bool:
    """Control (NUL, tab, newline ...) or invisible characters, or lone surrogates."""
    return bool(_CONTROLS.search(text) or _INVISIBLE.search(text) or re.search(r"[\t\n\r]", text))


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def word_text(text: str) -> str:
    """Only the words, separated by spaces: what PostgreSQL's parser is given, so that
    it splits text exactly where SQLite does, whatever the database's locale."""
    return _NOT_WORD.sub(" ", text)


# -- the AST ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    """One word or phrase. ``words`` has at least one word; several are a phrase."""

    words: tuple[str, ...]
    phrase: bool = False
    prefix: bool = False
    negated: bool = False

    def __str__(self) -> str:
        body = " ".join(self.words)
        if self.phrase or len(self.words) > 1:
            body = f'"{body}"'
        return ("-" if self.negated else "") + body + ("*" if self.prefix else "")


@dataclass(frozen=True)
class AnyOf:
    """An OR group of positive terms."""

    terms: tuple[Term, ...]

    def __str__(self) -> str:
        return " OR ".join(str(t) for t in self.terms)


Clause = Term | AnyOf


@dataclass(frozen=True)
class Query:
    """Every positive clause must match; no negated term may."""

    clauses: tuple[Clause, ...]

    @property
    def positive(self) -> tuple[Clause, ...]:
        return tuple(c for c in self.clauses if not (isinstance(c, Term) and c.negated))

    @property
    def negative(self) -> tuple[Term, ...]:
        return tuple(c for c in self.clauses if isinstance(c, Term) and c.negated)

    def terms(self) -> list[Term]:
        found: list[Term] = []
        for clause in self.clauses:
            found.extend(clause.terms if isinstance(clause, AnyOf) else (clause,))
        return found

    def __str__(self) -> str:
        return " ".join(str(c) for c in self.clauses)


# -- parsing ---------------------------------------------------------------------------------

QUOTES = frozenset('"“”«»„')
_OR = object()


_STOP = QUOTES | {"(", ")"}


def _lex(text: str) -> list[Term | object]:
    items: list[Term | object] = []
    negate = False  # a "-" right before the term
    negate_next = False  # a NOT before it, spaces between
    i, n = 0, len(text)

    def emit(body: str, phrase: bool, prefix: bool) -> None:
        found = tuple(words(body))
        if found:
            negated = negate or negate_next
            items.append(Term(found, phrase=phrase, prefix=prefix, negated=negated))

    while i < n:
        c = text[i]
        if c.isspace():
            negate = False  # a lone "-" is dropped
            i += 1
            continue
        if c in "()":
            i += 1
            continue
        if c == "-":
            negate = True  # "--x" is -x
            i += 1
            continue
        if c in QUOTES:
            end = i + 1
            while end < n and text[end] not in QUOTES:
                end += 1
            body = text[i + 1 : end]
            i = end + 1
            prefix = False
            while i < n and text[i] == "*":
                prefix = True
                i += 1
            emit(body, phrase=True, prefix=prefix)
        else:
            end = i
            while end < n and not text[end].isspace() and text[end] not in _STOP:
                end += 1
            raw = text[i:end]
            i = end
            operator = not (negate or negate_next)
            if operator and raw in ("OR", "|", "||"):
                items.append(_OR)
            elif operator and raw in ("AND", "&", "&&", "+"):
                pass
            elif operator and raw == "NOT":
                negate_next = True
                continue
            else:
                core = raw.rstrip("*")
                emit(core, phrase=False, prefix=len(core) < len(raw))
        negate = negate_next = False
    return items


def _combine(items: list[Term | object]) -> list[Clause]:
    clauses: list[Clause] = []
    joining = False
    for item in items:
        if item is _OR:
            last = clauses[-1] if clauses else None
            joining = last is not None and not (isinstance(last, Term) and last.negated)
            continue
        assert isinstance(item, Term)
        if joining and not item.negated:
            last = clauses.pop()
            before = last.terms if isinstance(last, AnyOf) else (last,)
            clauses.append(AnyOf((*before, item)))
        else:
            clauses.append(item)
        joining = False
    return clauses


def parse(text: str | None) -> Query:
    """The AST of a search; QueryError (422) for an empty, excluding-only or oversized one."""
    if text is None or not clean_text(text).strip():
        raise QueryError("type a word or phrase to search for")
    cleaned = clean_text(text)
    if len(cleaned) > MAX_QUERY_CHARS:
        raise QueryError(f"a search is at most {MAX_QUERY_CHARS} characters long")
    query = Query(tuple(_combine(_lex(cleaned))))
    terms = query.terms()
    if not terms:
        raise QueryError("the search has no words in it: letters or digits are needed")
    if not query.positive:
        raise QueryError(
            "the search only excludes (-word); add at least one word or phrase to look for"
        )
    if len(terms) > MAX_TERMS:
        raise QueryError(f"a search has at most {MAX_TERMS} words or phrases")
    if sum(len(t.words) for t in terms) > MAX_WORDS:
        raise QueryError(f"a search has at most {MAX_WORDS} words")
    for term in terms:
        long = [w for w in term.words if len(w) > MAX_WORD_CHARS]
        if long:
            raise QueryError(f"a word is at most {MAX_WORD_CHARS} characters long")
        if term.prefix and len(term.words[-1]) < MIN_PREFIX_CHARS:
            raise QueryError(
                f"a prefix search needs at least {MIN_PREFIX_CHARS} letters before the *"
            )
    return query


# -- rendering: SQLite FTS5 ------------------------------------------------------------------


def _fts5_term(term: Term) -> str:
    # Words are letters and digits only, so they can hold no double quote.
    return '"' + " ".join(term.words) + '"' + ("*" if term.prefix else "")


def _fts5_clause(clause: Clause) -> str:
    if isinstance(clause, AnyOf):
        return "(" + " OR ".join(_fts5_term(t) for t in clause.terms) + ")"
    return _fts5_term(clause)


def to_fts5(query: Query) -> str:
    """An FTS5 MATCH expression, to be bound as a parameter. FTS5's NOT is binary, so
    exclusions hang off the positive part: ``(a AND b) NOT ("c" OR "d")``."""
    positive = " AND ".join(_fts5_clause(c) for c in query.positive)
    negative = query.negative
    if not negative:
        return positive
    return f"({positive}) NOT (" + " OR ".join(_fts5_term(t) for t in negative) + ")"


# -- rendering: PostgreSQL tsquery ---------------------------------------------------------


@dataclass(frozen=True)
class SqlExpr:
    """A SQL expression with ``?`` placeholders and the values to bind to them."""

    sql: str
    params: tuple[str, ...]


def _pg_term(term: Term, config: str) -> SqlExpr:
    if not term.prefix:
        return SqlExpr(f"phraseto_tsquery('{config}', ?)", (" ".join(term.words),))
    # A quoted lexeme with :* (words are letters and digits: no quote, backslash or
    # operator can reach to_tsquery's own syntax).
    last = f"'{term.words[-1]}':*"
    if len(term.words) == 1:
        return SqlExpr(f"to_tsquery('{config}', ?)", (last,))
    return SqlExpr(
        f"tsquery_phrase(phraseto_tsquery('{config}', ?), to_tsquery('{config}', ?))",
        (" ".join(term.words[:-1]), last),
    )


def _join(parts: list[SqlExpr], operator: str) -> SqlExpr:
    if len(parts) == 1:
        return parts[0]
    return SqlExpr(
        "(" + f" {operator} ".join(p.sql for p in parts) + ")",
        tuple(value for p in parts for value in p.params),
    )


def _pg_clause(clause: Clause, config: str) -> SqlExpr:
    if isinstance(clause, AnyOf):
        return _join([_pg_term(t, config) for t in clause.terms], "||")
    return _pg_term(clause, config)


_CONFIG = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?$")


def to_tsquery_sql(query: Query, config: str) -> tuple[SqlExpr, SqlExpr | None]:
    """Two tsquery expressions: what must match (AND of the positive clauses) and what
    must not (OR of the exclusions, or None). ``config`` is a text search configuration
    name chosen by the code, never by the user."""
    if not _CONFIG.match(config):
        raise ValueError(f"not a text search configuration name: {config!r}")
    positive = _join([_pg_clause(c, config) for c in query.positive], "&&")
    negative = [_pg_term(t, config) for t in query.negative]
    return positive, (_join(negative, "||") if negative else None)
