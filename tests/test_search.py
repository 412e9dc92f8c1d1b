"""The search view and GET /api/v1/search, on both backends.

A small archive is built through ArchiveApp: three loans, documents registered as PDFs
at chosen moments, and extraction results recorded through the domain
(``start_extraction`` + ``record_text``: real events, no OCR), with Spanish page texts
full of accents. The view is caught up and searched: accents and case both ways,
phrases, OR, exclusion, prefixes, cadastral references, every filter, pagination,
snippets, reindexing, supersession, rebuilds, hostile input, then over HTTP.
"""

from __future__ import annotations

import contextlib
import io
import re
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
from factories import loan_terms
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from api import problems
from api import search as search_api
from archive.application import ArchiveApp, operator_context
from archive.documents import Document
from archive.domain import CommandContext, Role
from archive.settings import Settings
from projections import store as store_module
from projections.follower import Follower, rebuild
from projections.loan_files import LoanFilesView
from projections.query_syntax import (
    AnyOf,
    Query,
    QueryError,
    Term,
    parse,
    to_fts5,
    to_tsquery_sql,
    word_text,
)
from projections.runner import Projections
from projections.search import (
    TS_CONFIG,
    IndexBehindError,
    Matcher,
    SearchView,
    _loose,
    _one_of,
    highlighter,
    install_text_search,
    search,
    snippet,
)
from projections.store import PostgresStore, SQLiteStore, Store, open_store
from projections.view import Page

OCR = CommandContext("ocr.worker-1", Role.ADMIN.value, "text extraction")
REF_A = "9872023VH5797S0001WX"
REF_B = "1234567AB1234N0001QQ"
MARCH = datetime(2024, 3, 15, 10, 0, tzinfo=UTC)
JANUARY = datetime(2025, 1, 20, 9, 30, tzinfo=UTC)

LOANS = {
    "CR-1": {},  # Ana Pérez Núñez, 12345678Z
    "CR-2": {
        "borrower_name": "Bernardo Sáez Ibáñez",
        "borrower_national_id": "87654321X",
        "product": "business",
    },
    "CR-3": {"borrower_name": "José Martínez López", "borrower_national_id": "11111111H"},
}

# key: (loan, document type, upload moment or None for now, supersedes, page texts)
DOCUMENTS: dict[str, tuple[str, str, datetime | None, str | None, list[str]]] = {
    "valuation": (
        "CR-1",
        "valuation_report",
        MARCH,
        None,
        [
            "INFORME DE TASACIÓN. Inmueble en Calle Mayor 1, Teruel. Referencia catastral: "
            f"{REF_A}. Valor de tasación: 150.000 €.",
            "Comparables de mercado en la zona céntrica; la vivienda está libre de cargas.",
        ],
    ),
    "contract": (
        "CR-1",
        "contract",
        MARCH.replace(hour=12),
        None,
        [
            "CONTRATO DE PRÉSTAMO HIPOTECARIO entre Banco Rural de Aragón y Doña Ana Pérez "
            "Núñez, con DNI 12345678Z.",
            "Cláusula sexta: intereses de demora. Cláusula séptima: vencimiento anticipado "
            "por impago de tres cuotas.",
        ],
    ),
    "notice": (
        "CR-2",
        "collection_notice",
        JANUARY,
        None,
        [
            "REQUERIMIENTO DE PAGO a Don Bernardo Sáez Ibáñez por la deuda vencida del "
            "préstamo personal."
        ],
    ),
    "deed": (
        "CR-3",
        "mortgage_deed",
        None,
        None,
        [
            "ESCRITURA DE HIPOTECA sobre la finca registral 4521. "
            f"Ref.catastral:{REF_B}. El préstamo queda garantizado con derecho real "
            "hipotecario. La tasacion consta en el anexo."
        ],
    ),
    "court": (
        "CR-2",
        "court_filing",
        None,
        None,
        ["DEMANDA DE EJECUCIÓN HIPOTECARIA presentada ante el Juzgado de Teruel."],
    ),
    "court2": (
        "CR-2",
        "court_filing",
        None,
        "court",
        ["DEMANDA DE EJECUCION HIPOTECARIA (versión corregida) ante el Juzgado de Teruel."],
    ),
}


def pdf() -> io.BytesIO:
    return io.BytesIO(b"%PDF-1.4 test original\n" + b"x" * 200)


def register(
    archive: ArchiveApp,
    ctx: CommandContext,
    monkeypatch: pytest.MonkeyPatch,
    loan: str,
    doc_type: str,
    moment: datetime | None = None,
    supersedes: UUID | None = None,
) -> UUID:
    with monkeypatch.context() as patch:
        if moment is not None:
            patch.setattr(Document.Registered, "create_timestamp", staticmethod(lambda: moment))
        return archive.register_document(
            ctx,
            pdf(),
            loan_number=loan,
            doc_type=doc_type,
            original_filename=f"{doc_type}.pdf",
            supersedes=supersedes,
        ).id


def extract(
    archive: ArchiveApp, document_id: UUID, texts: list[str], *, reindex: bool = False
) -> int:
    """Record an extraction result through the domain; return the log position."""
    if reindex:
        archive.change_document(OCR, document_id, lambda d: d.request_reindex(OCR))
    attempts: list[int] = []
    archive.change_document(
        OCR, document_id, lambda d: attempts.append(d.start_extraction(OCR, "worker-1"))
    )
    pages = [
        {"number": n, "text": text, "method": "ocr", "confidence": Decimal("91.5")}
        for n, text in enumerate(texts, start=1)
    ]
    return archive.change_document(
        OCR,
        document_id,
        lambda d: d.record_text(
            OCR,
            attempts[-1],
            pages=pages,
            engine="tesseract",
            engine_version="5.3.0",
            languages="spa",
            settings={"psm": 3},
        ),
    ).position


@dataclass
class Corpus:
    archive: ArchiveApp
    store: Store
    follower: Follower
    ids: dict[str, UUID]

    def find(self, q: str, **kw: Any) -> Page:
        self.follower.catch_up()
        return search(self.store, q, limit=kw.pop("limit", 100), **kw)

    def hits(self, q: str, **kw: Any) -> set[str]:
        """The hits as "<document key>#<page number>"."""
        names = {str(v): k for k, v in self.ids.items()}
        page = self.find(q, **kw)
        assert page.total == len(page.items), "use hits() for small results only"
        return {f"{names[h['document_id']]}#{h['page_number']}" for h in page.items}


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    views = open_store(settings)
    yield views
    views.close()


@pytest.fixture
def corpus(
    archive: ArchiveApp, officer: CommandContext, store: Store, monkeypatch: pytest.MonkeyPatch
) -> Corpus:
    for number, terms in LOANS.items():
        archive.open_loan(officer, **loan_terms(number, **terms))
    ids: dict[str, UUID] = {}
    for key, (loan, doc_type, moment, supersedes, texts) in DOCUMENTS.items():
        older = ids[supersedes] if supersedes else None
        ids[key] = register(archive, officer, monkeypatch, loan, doc_type, moment, older)
        extract(archive, ids[key], texts)
    follower = Follower(SearchView(), archive, store)
    follower.catch_up()
    return Corpus(archive, store, follower, ids)


# -- the query language, without a database ----------------------------------------------------


def test_parse_builds_terms_phrases_prefixes_exclusions_and_or_groups() -> None:
    query = parse('"préstamo hipotecario" tasac* -"mal pagador" Teruel OR Alcañiz NOT aval')
    assert query.clauses == (
        Term(("préstamo", "hipotecario"), phrase=True),
        Term(("tasac",), prefix=True),
        Term(("mal", "pagador"), phrase=True, negated=True),
        AnyOf((Term(("Teruel",)), Term(("Alcañiz",)))),
        Term(("aval",), negated=True),
    )
    assert str(query) == '"préstamo hipotecario" tasac* -"mal pagador" Teruel OR Alcañiz -aval'
    assert to_fts5(query) == (
        '("préstamo hipotecario" AND "tasac"* AND ("Teruel" OR "Alcañiz"))'
        ' NOT ("mal pagador" OR "aval")'
    )
    positive, negative = to_tsquery_sql(query, TS_CONFIG)
    assert "?" in positive.sql and "préstamo" not in positive.sql  # values are parameters
    assert positive.params == ("préstamo hipotecario", "'tasac':*", "Teruel", "Alcañiz")
    assert negative is not None and negative.params == ("mal pagador", "aval")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Pérez-Núñez", '"Pérez Núñez"'),  # punctuation separates words: a phrase
        ('"unbalanced quote', '"unbalanced quote"'),
        ("a OR OR b", '("a" OR "b")'),
        ("OR a OR", '"a"'),
        ("NEAR(", '"NEAR"'),
        ("'; DROP TABLE x; --", '"DROP" AND "TABLE" AND "x"'),
        ("x OR -y", '("x") NOT ("y")'),
        ("a\x00b", '"a" AND "b"'),
        ("«préstamo»", '"préstamo"'),
        ("- x", '"x"'),
        ('"a phr"*', '"a phr"*'),
        (REF_A.lower(), f'"{REF_A.lower()}"'),
    ],
)
def test_raw_input_is_read_forgivingly(text: str, expected: str) -> None:
    assert to_fts5(parse(text)) == expected


@pytest.mark.parametrize(
    "text",
    ["", "   \t\n", "*", "-", "OR", "OR OR", '""', "-x", "-x -y", "NOT x", "a*", "x" * 1001],
)
def test_queries_without_anything_to_look_for_are_refused(text: str) -> None:
    with pytest.raises(QueryError) as refused:
        parse(text)
    assert refused.value.status == 422


def test_snippets_are_escaped_highlighted_and_centred_on_the_matches() -> None:
    pattern = highlighter(
        [(("tasacion",), False), (("préstamo", "hipotecario"), False), (("hipotec",), True)]
    )
    assert snippet("INFORME DE TASACIÓN: «Préstamo  HIPOTECARIO» <b>&</b>", pattern) == (
        "INFORME DE <mark>TASACIÓN</mark>: «<mark>Préstamo HIPOTECARIO</mark>»"
        " &lt;b&gt;&amp;&lt;/b&gt;"
    )
    assert snippet("hipotecas y tasaciones", pattern) == "<mark>hipotecas</mark> y tasaciones"
    # Matches start at a word's start only, whatever the first letter's case or accent.
    assert snippet("retasación, antihipoteca; x_tasación", pattern) == (
        "retasación, antihipoteca; x_<mark>tasación</mark>"
    )
    assert snippet("ÁVILA y Ávila", highlighter([(("avila",), False)])) == (
        "<mark>ÁVILA</mark> y <mark>Ávila</mark>"
    )
    long = " ".join(["relleno"] * 100) + " la TASACIÓN consta " + " ".join(["fin"] * 100)
    centred = snippet(long, pattern)
    assert centred.startswith("…") and centred.endswith("…")
    assert "<mark>TASACIÓN</mark>" in centred and len(centred) < 260
    assert snippet("sin coincidencias", pattern) == "sin coincidencias"
    assert snippet("İSTANBUL tasación", pattern) == "İSTANBUL <mark>tasación</mark>"
    assert highlighter([]) is None


def _one_alternative_per_matcher(matchers: list[Matcher]) -> re.Pattern[str] | None:
    """The highlighter's plain form: each matcher whole, longest phrases first."""
    parts = []
    for found, prefix in sorted(set(matchers), key=lambda m: (-len(m[0]), m)):
        loose = [[_one_of(chars) for chars in _loose(w)] for w in found if _loose(w)]
        if loose:
            (first, *others), *more = loose
            body = r"[\W_]+".join(["".join(others), *("".join(w) for w in more)])
            parts.append(first + r"(?<![^\W_].)" + body + (r"[^\W_]*" if prefix else r"(?![^\W_])"))
    return re.compile("|".join(parts)) if parts else None


_LETTERS = list("aábcdeéfhiíkmnñoóprŕstuúüvzAÁEÉÑR9ßİ_-. \u0301")
_WORDS = st.text(alphabet=st.sampled_from(_LETTERS[:-5]), min_size=1, max_size=4)


@given(
    matchers=st.lists(
        st.tuples(st.lists(_WORDS, min_size=1, max_size=3).map(tuple), st.booleans()),
        min_size=1,
        max_size=4,
    ),
    text=st.text(alphabet=st.sampled_from(_LETTERS), max_size=80),
)
@hsettings(max_examples=300, deadline=None)
def test_the_highlighter_finds_what_one_alternative_per_matcher_finds(
    matchers: list[Matcher], text: str
) -> None:
    """The highlighter leads with one class of all first letters (so re skips to them
    quickly) and checks each alternative's own first letter behind it: the same
    matches, at the same places, as the plain alternation."""
    fast, plain = highlighter(matchers), _one_alternative_per_matcher(matchers)
    assert (fast is None) == (plain is None)
    if fast is not None and plain is not None:
        lowered = text.lower()
        found = [m.span() for m in fast.finditer(lowered)]
        assert found == [m.span() for m in plain.finditer(lowered)]


def test_every_word_of_a_name_is_highlighted_whatever_its_first_letter() -> None:
    pattern = highlighter([(("ruben",), False), (("hernandez",), False), (("prieto",), False)])
    assert snippet("D. RUBÉN Hernández Prieto, prieto y hernandezz", pattern) == (
        "D. <mark>RUBÉN</mark> <mark>Hernández</mark> <mark>Prieto</mark>,"
        " <mark>prieto</mark> y hernandezz"
    )


def test_word_text_keeps_only_words() -> None:
    assert word_text(f"Ref.catastral:{REF_A}, «x»—y") == f"Ref catastral {REF_A} x y"


# -- matching ----------------------------------------------------------------------------------


def test_accents_and_case_do_not_matter_either_way(corpus: Corpus) -> None:
    tasacion = {"valuation#1", "deed#1"}  # "TASACIÓN", "tasación" and "tasacion"
    for q in ("tasacion", "TASACIÓN", "Tasación", "TASACION"):
        assert corpus.hits(q) == tasacion, q
    for q in ("ejecucion", "EJECUCIÓN", "Ejecución"):
        assert corpus.hits(q) == {"court#1", "court2#1"}, q
    assert corpus.hits("ibanez") == corpus.hits("IBÁÑEZ") == {"notice#1"}
    assert corpus.hits("nunez perez") == {"contract#1"}


def test_phrases_or_exclusion_and_prefixes(corpus: Corpus) -> None:
    # Both words are on the deed too, but not next to each other.
    assert corpus.hits('"préstamo hipotecario"') == {"contract#1"}
    assert corpus.hits("préstamo hipotecario") == {"contract#1", "deed#1"}
    assert corpus.hits('"vencimiento anticipado"') == {"contract#2"}
    assert corpus.hits('"anticipado vencimiento"') == set()
    assert corpus.hits("requerimiento OR escritura") == {"notice#1", "deed#1"}
    assert corpus.hits("teruel") == {"valuation#1", "court#1", "court2#1"}
    assert corpus.hits("teruel -demanda") == {"valuation#1"}
    assert corpus.hits('teruel -"calle mayor"') == {"court#1", "court2#1"}
    assert corpus.hits("xyz OR teruel NOT demanda") == {"valuation#1"}
    assert corpus.hits("hipotec*") == {"contract#1", "deed#1", "court#1", "court2#1"}
    assert corpus.hits("venc*") == {"contract#2", "notice#1"}
    assert corpus.hits('"vencimiento antic"*') == {"contract#2"}
    assert corpus.hits("hipotec* -juzgado") == {"contract#1", "deed#1"}


def test_cadastral_references_are_one_word_and_found_exactly(
    corpus: Corpus, settings: Settings
) -> None:
    assert corpus.hits(REF_A) == corpus.hits(REF_A.lower()) == {"valuation#1"}
    # Glued to "Ref.catastral:" and a full stop in the text: still one word.
    assert corpus.hits(REF_B) == {"deed#1"}
    assert corpus.hits(f'"{REF_B}"') == {"deed#1"}
    # A part of a reference is not a word of its own ...
    assert corpus.hits(REF_A[:13]) == set()
    assert corpus.hits("VH5797S0001WX") == set()
    # ... but a prefix search finds it.
    assert corpus.hits(REF_A[:13] + "*") == {"valuation#1"}
    # The tokenizers themselves keep it whole.
    with corpus.store.read() as tx:
        if settings.backend == "sqlite":
            table = SearchView().tables(1)["search_fts"]
            tx.execute(f"CREATE VIRTUAL TABLE temp.vocab USING fts5vocab(main, {table}, 'row')")
            terms = {r["term"] for r in tx.execute("SELECT term FROM temp.vocab")}
            assert REF_A.lower() in terms and REF_B.lower() in terms
            assert not any(t.startswith("9872023") and t != REF_A.lower() for t in terms)
        else:
            row = tx.one(
                f"SELECT to_tsvector('{TS_CONFIG}', ?)::text AS v",
                (word_text(f"Ref.catastral:{REF_B}."),),
            )
            assert row is not None
            assert set(row["v"].split()) == {f"'{REF_B.lower()}':3", "'ref':1", "'catastral':2"}


# -- filters, pagination, snippets ---------------------------------------------------------------

BROAD = "hipotec* OR tasacion OR deuda"  # one page of every loan


def test_filters_by_loan_type_borrower_and_upload_date(corpus: Corpus) -> None:
    everything = {"valuation#1", "contract#1", "notice#1", "deed#1", "court#1", "court2#1"}
    assert corpus.hits(BROAD) == everything
    assert corpus.hits(BROAD, loan_number="CR-1") == {"valuation#1", "contract#1"}
    assert corpus.hits(BROAD, loan_number="CR-404") == set()
    assert corpus.hits(BROAD, doc_type="court_filing") == {"court#1", "court2#1"}
    cr2 = {"notice#1", "court#1", "court2#1"}
    assert corpus.hits(BROAD, borrower="pérez") == {"valuation#1", "contract#1"}
    assert corpus.hits(BROAD, borrower="ANA PEREZ nunez") == {"valuation#1", "contract#1"}
    assert corpus.hits(BROAD, borrower="sáez ibáñez") == cr2
    assert corpus.hits(BROAD, borrower="87654321x") == cr2
    assert corpus.hits(BROAD, borrower="87.654.321-X") == cr2
    assert corpus.hits(BROAD, borrower="zzz") == set()
    assert corpus.hits(BROAD, borrower="%") == set()  # LIKE wildcards are literal
    assert corpus.hits(BROAD, borrower="_") == set()
    assert corpus.hits(BROAD, borrower="!!!") == set()
    march = {"valuation#1", "contract#1"}
    assert corpus.hits(BROAD, uploaded_from="2024-03-15", uploaded_to="2024-03-15") == march
    assert corpus.hits(BROAD, uploaded_to=date(2024, 12, 31)) == march
    assert corpus.hits(BROAD, uploaded_from="2025-01-01", uploaded_to="2025-01-31") == {"notice#1"}
    today = datetime.now(UTC).date()
    assert corpus.hits(BROAD, uploaded_from=today) == {"deed#1", "court#1", "court2#1"}
    assert corpus.hits(BROAD, uploaded_from="2024-03-16", uploaded_to="2025-01-19") == set()
    assert corpus.hits(BROAD, loan_number="CR-2", doc_type="court_filing", borrower="saez") == {
        "court#1",
        "court2#1",
    }
    for bad in (
        {"doc_type": "poem"},
        {"uploaded_from": "yesterday"},
        {"uploaded_from": "2025-02-01", "uploaded_to": "2025-01-01"},
        {"borrower": "  "},
        {"loan_number": "CR-1\x00"},
        {"limit": 0},
        {"offset": -1},
    ):
        with pytest.raises(QueryError):
            corpus.find(BROAD, **bad)


def test_pagination_total_and_order(corpus: Corpus) -> None:
    everything = corpus.find(BROAD, limit=50)
    assert everything.total == len(everything.items) == 6
    ranks = [h["rank"] for h in everything.items]
    assert ranks == sorted(ranks, reverse=True)
    pages = [corpus.find(BROAD, limit=2, offset=offset) for offset in (0, 2, 4, 6)]
    assert [p.total for p in pages] == [6, 6, 6, 6]
    assert [len(p.items) for p in pages] == [2, 2, 2, 0]
    assert [h for p in pages for h in p.items] == everything.items
    assert pages[0].position == corpus.archive.head_position()
    # The same with a filter (another plan on SQLite: one pass, total by window).
    cr2 = corpus.find(BROAD, loan_number="CR-2", limit=50)
    assert cr2.total == 3
    tail = corpus.find(BROAD, loan_number="CR-2", limit=2, offset=2)
    assert (tail.total, tail.items) == (3, cr2.items[2:])
    beyond = corpus.find(BROAD, loan_number="CR-2", limit=2, offset=5)
    assert (beyond.total, beyond.items) == (3, [])
    assert corpus.find(BROAD, borrower="saez", limit=2, offset=9).total == 3


def test_hits_carry_the_document_and_a_highlighted_escaped_snippet(
    corpus: Corpus, officer: CommandContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    [hit] = corpus.find(REF_A).items
    assert hit["document_id"] == str(corpus.ids["valuation"])
    assert (hit["loan_number"], hit["doc_type"], hit["page_number"]) == (
        "CR-1",
        "valuation_report",
        1,
    )
    assert f"<mark>{REF_A}</mark>" in hit["snippet"]
    assert hit["rank"] > 0 and hit["superseded"] is False
    assert (hit["method"], hit["confidence"], hit["extraction_attempt"]) == ("ocr", 91.5, 1)
    assert hit["uploaded_at"] == "2024-03-15T10:00:00.000000Z"
    for q in ("tasacion", '"préstamo hipotecario"', "hipotec*", "ibanez"):
        for h in corpus.find(q).items:
            assert "<mark>" in h["snippet"] and "</mark>" in h["snippet"], (q, h)

    doc = register(corpus.archive, officer, monkeypatch, "CR-3", "other")
    extract(
        corpus.archive,
        doc,
        ["Nota <script>alert('x')</script> & tasación \"rápida\" <b>urgente</b>"],
    )
    [escaped] = corpus.find("rapida").items
    snippet = escaped["snippet"]
    assert "<mark>rápida</mark>" in snippet
    assert "<" not in snippet.replace("<mark>", "").replace("</mark>", "")
    assert "&amp;" in snippet and "&quot;" in snippet


def test_ordinals_are_highlighted_where_the_index_finds_them(
    corpus: Corpus, officer: CommandContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "nº 2", "3ª", "2º rango": the index finds them as written, and the snippet must mark
    them there (the highlighter folded º to o and ª to a, so it marked nothing and showed
    the page's start, far from the match)."""
    assert snippet("Juzgado nº 2, inscripción 3ª", highlighter([(("nº",), False)])) == (
        "Juzgado <mark>nº</mark> 2, inscripción 3ª"
    )
    assert snippet("hipoteca de 2º RANGO", highlighter([(("2º", "rango"), False)])) == (
        "hipoteca de <mark>2º RANGO</mark>"
    )
    doc = register(corpus.archive, officer, monkeypatch, "CR-3", "court_filing")
    filler = " ".join(["relleno"] * 80)
    extract(corpus.archive, doc, [f"{filler} Juzgado de Primera Instancia nº 2, inscripción 3ª"])
    for q in ("nº", "3ª"):
        [hit] = corpus.find(q).items
        assert hit["document_id"] == str(doc)
        assert f"<mark>{q}</mark>" in hit["snippet"], (q, hit["snippet"])


def test_words_with_typographic_ligatures_are_found_by_their_letters(
    corpus: Corpus, officer: CommandContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PDF text layer spells "certificado" with the ligature "ﬁ" (U+FB01): the page is
    found by "certificado", and by "certiﬁcado" typed as it was copied from the PDF (the
    index kept the ligature as a letter of its own, and "finca" missed "ﬁnca")."""
    doc = register(corpus.archive, officer, monkeypatch, "CR-3", "registry_certificate")
    extract(corpus.archive, doc, ["Certiﬁcado registral de la ﬁnca 4455, ﬂujo de caja"])
    for q in ("certificado", "certiﬁcado", "ﬁnca", '"la finca 4455"', "flujo", "certif*"):
        hits = [h for h in corpus.find(q).items if h["document_id"] == str(doc)]
        assert len(hits) == 1, q
        assert "<mark>" in hits[0]["snippet"], (q, hits[0]["snippet"])


# -- reindex, supersession, rebuild ---------------------------------------------------------------


def test_a_reindex_replaces_the_documents_pages(corpus: Corpus) -> None:
    doc = corpus.ids["valuation"]
    assert corpus.hits("comparables") == {"valuation#2"}
    extract(
        corpus.archive,
        doc,
        ["INFORME DE TASACIÓN revisado, sin referencia."],
        reindex=True,
    )
    assert corpus.hits("comparables") == set()
    assert corpus.hits(REF_A) == set()
    [hit] = corpus.find("revisado").items
    assert (hit["page_number"], hit["extraction_attempt"]) == (1, 2)
    assert corpus.hits("tasacion") == {"valuation#1", "deed#1"}

    # A failed attempt keeps the text of the last good one.
    corpus.archive.change_document(OCR, doc, lambda d: d.request_reindex(OCR))
    attempts: list[int] = []
    corpus.archive.change_document(
        OCR, doc, lambda d: attempts.append(d.start_extraction(OCR, "worker-2"))
    )
    corpus.archive.change_document(
        OCR, doc, lambda d: d.record_extraction_failure(OCR, attempts[-1], "timeout")
    )
    assert corpus.hits("revisado") == {"valuation#1"}
    rebuilt_equals_incremental(corpus)


def test_a_superseded_document_stays_searchable_and_says_so(corpus: Corpus) -> None:
    page = corpus.find("demanda")
    found = {h["document_id"]: h for h in page.items}
    old, new = str(corpus.ids["court"]), str(corpus.ids["court2"])
    assert set(found) == {old, new}
    assert found[old]["superseded"] is True and found[old]["superseded_by"] == new
    assert found[new]["superseded"] is False and found[new]["superseded_by"] is None
    assert corpus.hits("demanda", include_superseded=False) == {"court2#1"}


def rebuilt_equals_incremental(corpus: Corpus) -> None:
    queries = ["tasacion", BROAD, '"préstamo hipotecario"', "teruel -demanda", REF_A]
    view = SearchView()
    corpus.follower.catch_up()
    before = view.dump(corpus.store)
    answers = [corpus.find(q).as_dict() for q in queries]
    rebuild(view, corpus.archive, corpus.store, batch_size=7)
    assert view.dump(corpus.store) == before
    assert [corpus.find(q).as_dict() for q in queries] == answers
    if corpus.store.backend == "sqlite":
        with corpus.store.transaction() as tx:
            table = view.tables(2)["search_fts"]
            # FTS5 compares its index with the pages it was built from.
            tx.execute(f"INSERT INTO {table} ({table}, rank) VALUES ('integrity-check', 1)")


def test_a_rebuild_gives_the_same_index(corpus: Corpus) -> None:
    rebuilt_equals_incremental(corpus)


def other_store(settings: Settings, tmp_path: Path) -> Store:
    """A second, empty views database beside the corpus's."""
    if settings.backend == "postgres":
        assert settings.database_url is not None
        return PostgresStore(settings.database_url, schema="views_other")
    return SQLiteStore(tmp_path / "other-views.sqlite3")


def test_batch_boundaries_never_change_the_index(
    corpus: Corpus,
    officer: CommandContext,
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings,
    tmp_path: Path,
) -> None:
    """A batch applies many events to one document in memory and writes once: the last
    of two extractions, pages flagged by a later supersession in the same batch, stored
    pages replaced or flagged. Whatever the batch size, the rows are the same."""
    a = corpus.archive
    ids = corpus.ids
    extract(a, ids["valuation"], ["primera revisión del informe"], reindex=True)
    extract(a, ids["valuation"], ["segunda revisión del informe, definitiva"], reindex=True)
    contract2 = register(a, officer, monkeypatch, "CR-1", "contract", None, ids["contract"])
    extract(a, ids["contract"], ["contrato releído tras sustituirlo"], reindex=True)
    memo = register(a, officer, monkeypatch, "CR-3", "other")
    extract(a, memo, ["nota interna efímera"])
    memo2 = register(a, officer, monkeypatch, "CR-3", "other", None, memo)
    extract(a, memo2, ["nota interna corregida"])

    ids.update(memo=memo, memo2=memo2, contract2=contract2)
    corpus.follower.catch_up()  # everything above in one batch
    assert corpus.hits("revision") == {"valuation#1"}
    [final] = corpus.find("definitiva").items
    assert final["extraction_attempt"] == 3
    assert corpus.hits("primera") == set()
    assert corpus.hits("releido", include_superseded=False) == set()
    [reread] = corpus.find("releido").items
    assert reread["superseded_by"] == str(contract2)
    assert corpus.hits("nota", include_superseded=False) == {"memo2#1"}
    assert corpus.hits("nota") == {"memo#1", "memo2#1"}

    view = SearchView()
    expected = view.dump(corpus.store)
    with other_store(settings, tmp_path) as store:
        Follower(view, a, store, batch_size=1).catch_up()  # event by event
        assert view.dump(store) == expected
        for batch_size in (3, 1000):
            rebuild(view, a, store, batch_size=batch_size)
            assert view.dump(store) == expected
            assert search(store, "nota", limit=10).total == 2
            assert search(store, "nota", include_superseded=False, limit=10).total == 1
            assert search(store, "definitiva").total == 1


def test_odd_pages_never_stop_the_view(
    corpus: Corpus, officer: CommandContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = register(corpus.archive, officer, monkeypatch, "CR-3", "other")
    attempts: list[int] = []
    corpus.archive.change_document(
        OCR, doc, lambda d: attempts.append(d.start_extraction(OCR, "w"))
    )
    pages: list[Any] = [
        {"number": 1, "text": "Texto\x00con\x02controles\x03 y hipo\u00adteca partida"},
        {"number": 2, "text": "", "error": "timeout"},
        {"text": "sin número de página, ñandú", "confidence": None},
        {"number": "7", "text": "número como texto: caracolillo", "method": None},
        {"number": 3, "text": "e\u0301poca descompuesta (NFD)", "confidence": Decimal("12.25")},
        {"number": 4, "text": "palabra" + "x" * 5000 + " fin larguísima"},
    ]
    corpus.archive.change_document(
        OCR,
        doc,
        lambda d: d.record_text(
            OCR,
            attempts[-1],
            pages=pages,
            engine="x",
            engine_version="1",
            languages="spa",
            settings={},
        ),
    )
    assert {h["page_number"] for h in corpus.find("controles").items} == {1}
    assert {h["page_number"] for h in corpus.find("hipoteca partida").items} == {1}
    assert {h["page_number"] for h in corpus.find("nandu").items} == {3}
    assert {h["page_number"] for h in corpus.find("caracolillo").items} == {7}
    [epoca] = corpus.find("época").items
    assert (epoca["page_number"], epoca["confidence"]) == (3, 12.25)
    assert {h["page_number"] for h in corpus.find("larguisima").items} == {4}
    rebuilt_equals_incremental(corpus)


# -- hostile input ----------------------------------------------------------------------------------

HOSTILE = [
    '"unbalanced',
    'tasacion "',
    '"',
    "-",
    "- -",
    "*",
    "**",
    "tas**",
    "OR",
    "OR OR",
    "AND OR NOT",
    "NEAR(",
    "NEAR(tasacion teruel, 3)",
    "tasacion NEAR teruel",
    "(tasacion",
    "tasacion)",
    "'; DROP TABLE search_pages_g1; --",
    "' OR 1=1 --",
    '" OR ""="',
    "tasacion' OR '1'='1",
    "%' OR 1=1 --",
    "?",
    "$1",
    "%s %(x)s",
    "{search_pages}",
    "tasacion:*",
    "tasacion & teruel | !x",
    "<-> <2> !! &&",
    "col:tasacion",
    "text:tasacion",
    "^tasacion",
    "tasacion\x00teruel",
    "\x00",
    "\ud800tasacion",
    "\u200b\u00ad",
    "🏠 hipoteca 🏠",
    "漢字 ÅÄÖ ﷺ",
    "𞤀𞤁",
    "ǅ ǈ ǋ",
    "x" * 999,
    ("palabra " * 49).strip(),
    ("palabra " * 60).strip(),
    ("tasacion OR " * 30) + "teruel",
    "tasacion " + "-x " * 40,
    "a" * 200,
    "de la el",
    "-tasacion teruel*",
    "\\",
    '\\\\" OR',
]


def test_hostile_queries_never_raise_anything_but_a_query_error(corpus: Corpus) -> None:
    for q in HOSTILE:
        try:
            page = corpus.find(q, limit=5)
        except QueryError:
            continue
        assert page.total >= len(page.items)
    for q in ("tasacion\x00teruel", "(tasacion", "tasacion:*", "tasacion'; --"):
        assert corpus.find(q).total >= 1, q


@given(st.text(alphabet=st.sampled_from(list("ab \"*-()|&!:^\\'%?OR\x00é9ñ")), max_size=40))
@hsettings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_queries_never_raise_anything_but_a_query_error(corpus: Corpus, q: str) -> None:
    with contextlib.suppress(QueryError):
        search(corpus.store, q, limit=3)


# -- PostgreSQL text search configuration ---------------------------------------------------------


def test_postgres_configuration_is_created_once_by_concurrent_starts(
    postgres_url: str,
) -> None:
    from projections.store import PostgresStore

    store = PostgresStore(postgres_url, pool_size=8)
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def install() -> None:
        try:
            start.wait()
            with store.transaction() as tx:
                install_text_search(tx)
        except BaseException as exc:  # pragma: no cover - the failure being tested
            errors.append(exc)

    threads = [threading.Thread(target=install) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.close()
    assert errors == []
    with psycopg.connect(postgres_url) as conn:
        configs = conn.execute(
            "SELECT n.nspname FROM pg_ts_config c JOIN pg_namespace n ON n.oid = c.cfgnamespace"
            " WHERE c.cfgname = %s",
            (TS_CONFIG,),
        ).fetchall()
        assert configs == [("views",)]
        vector = conn.execute(
            "SELECT to_tsvector('views.es_unaccent', 'TASACIÓN Núñez préstamos')::text"
        ).fetchone()
        assert vector is not None and "'tasacion'" in vector[0] and "'nunez'" in vector[0]


# -- over HTTP ------------------------------------------------------------------------------------

ROLES = {
    "archivist": "ines.archivist",
    "credit_officer": "ana.officer",
    "auditor": "raul.auditor",
    "compliance": "eva.compliance",
    "admin": "root.admin",
}


@dataclass
class Http:
    client: TestClient
    tokens: dict[str, str]
    app: FastAPI

    def get(self, role: str | None = "compliance", **params: Any) -> Any:
        headers = {} if role is None else {"Authorization": f"Bearer {self.tokens[role]}"}
        return self.client.get("/api/v1/search", params=params, headers=headers)


@pytest.fixture
def http(corpus: Corpus) -> Http:
    tokens = {
        role: corpus.archive.add_user(operator_context(), name, role)
        for role, name in ROLES.items()
    }
    app = FastAPI()
    app.state.archive = corpus.archive
    app.state.projections = Projections(corpus.archive, corpus.store, views=[SearchView()])
    problems.install(app)
    app.include_router(search_api.router)
    return Http(TestClient(app, raise_server_exceptions=False), tokens, app)


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


def test_search_over_http(http: Http, corpus: Corpus) -> None:
    for role in ("compliance", "auditor", "credit_officer"):
        response = http.get(role, q="TASACION")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["total"] == 2 and body["query"] == "TASACION"
        assert body["position"] == corpus.archive.head_position()
    for role in ("archivist", "admin"):
        assert_problem(http.get(role, q="tasacion"), 403)
    assert_problem(http.get(None, q="tasacion"), 401)
    assert_problem(http.get(None, q=""), 401)  # who you are comes first

    body = http.get(q=BROAD, loan_number="CR-2", limit=2, offset=1).json()
    assert (body["total"], body["limit"], body["offset"], len(body["items"])) == (3, 2, 1, 2)
    body = http.get(q="demanda", include_superseded="false").json()
    assert [h["document_id"] for h in body["items"]] == [str(corpus.ids["court2"])]
    body = http.get(
        q=BROAD, doc_type="contract", borrower="perez", uploaded_from="2024-03-15"
    ).json()
    [hit] = body["items"]
    assert set(hit) >= {"document_id", "loan_number", "doc_type", "page_number", "snippet"}
    assert "<mark>" in hit["snippet"] and isinstance(hit["rank"], float)
    assert http.get(q=BROAD, uploaded_to="2024-01-01").json()["total"] == 0

    # The index follows the log: a new extraction is searchable on the next request.
    extract(corpus.archive, corpus.ids["notice"], ["Segundo aviso de impago."], reindex=True)
    assert http.get(q="aviso").json()["total"] == 1


def test_bad_searches_over_http_are_problems_never_500s(http: Http) -> None:
    for params in (
        {},
        {"q": ""},
        {"q": "   "},
        {"q": "-tasacion"},
        {"q": "*"},
        {"q": "x" * 1001},
        {"q": "a*"},
        {"q": "tasacion", "doc_type": "poem"},
        {"q": "tasacion", "uploaded_from": "ayer"},
        {"q": "tasacion", "uploaded_from": "2025-02-01", "uploaded_to": "2025-01-01"},
        {"q": "tasacion", "limit": 0},
        {"q": "tasacion", "limit": 101},
        {"q": "tasacion", "offset": -1},
        {"q": "tasacion", "offset": 10**30},
        {"q": "tasacion", "borrower": "\x00"},
        {"q": "tasacion", "loan_number": "x" * 201},
    ):
        assert_problem(http.get(**params), 422)
    for q in HOSTILE:
        if "\ud800" in q:
            continue  # not encodable in a URL
        response = http.get(q=q, limit=3)
        assert response.status_code in (200, 422), (q, response.text)
        if response.status_code == 422:
            assert_problem(response, 422)


def test_search_says_so_when_the_index_is_not_configured(http: Http, corpus: Corpus) -> None:
    http.app.state.projections = Projections(corpus.archive, corpus.store, views=[])
    assert_problem(http.get(q="tasacion"), 503)


def test_a_search_never_answers_from_before_a_position_it_must_reflect(corpus: Corpus) -> None:
    head = corpus.archive.head_position()
    assert search(corpus.store, "tasacion", at_least=head).position == head
    with pytest.raises(IndexBehindError):
        search(corpus.store, "tasacion", at_least=head + 1)


def test_a_search_reads_the_index_position_first_in_as_few_statements_as_it_can(
    corpus: Corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: the registry lookup and the tsquery share the first statement, the
    search is the second (each one a round trip). An index behind the position a search
    must reflect stops it after that first statement, on both backends."""
    seen: list[str] = []
    for cls in (store_module._SQLiteTx, store_module._PostgresTx):
        real = cls.execute

        def execute(self: Any, sql: str, params: Any = (), _real: Any = real) -> Any:
            seen.append(sql)
            return _real(self, sql, params)

        monkeypatch.setattr(cls, "execute", execute)
    head = corpus.archive.head_position()
    assert search(corpus.store, "tasacion", at_least=head).total == 2
    if corpus.store.backend == "postgres":
        assert len(seen) == 2
        assert "projection_registry" in seen[0] and "tsquery" in seen[0]
    seen.clear()
    with pytest.raises(IndexBehindError):
        search(corpus.store, "tasacion", at_least=head + 1)
    assert len(seen) == 1 and "projection_registry" in seen[0]


def test_a_view_never_registered_answers_nothing_or_is_behind(
    archive: ArchiveApp, officer: CommandContext, store: Store
) -> None:
    archive.open_loan(officer, **loan_terms("CR-1"))
    Follower(LoanFilesView(), archive, store).catch_up()  # a registry without the search view
    assert search(store, "tasacion") == Page([], 0, 20, 0, 0)
    with pytest.raises(IndexBehindError):
        search(store, "tasacion", at_least=1)


def test_query_objects_can_be_passed_directly(corpus: Corpus) -> None:
    query = Query((Term(("tasacion",)),))
    assert search(corpus.store, query).total == 2
    with pytest.raises(QueryError):
        search(corpus.store, "tasacion", offset=10**9)


def test_the_views_live_in_their_own_database(corpus: Corpus, settings: Settings) -> None:
    if settings.backend == "sqlite":
        with sqlite3.connect(settings.sqlite_path) as events:
            names = {r[0] for r in events.execute("SELECT name FROM sqlite_master")}
        assert not any(n.startswith("search_") for n in names)
