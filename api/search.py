"""Full-text search over the extracted pages of every document, with metadata filters."""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from api.bodies import QueryDay
from api.deps import AuthFirstRoute, authorize, fresh_views, log_head, require_in_handler
from archive.documents import DocumentType
from archive.domain import Role
from archive.exceptions import ArchiveError
from projections import query_syntax
from projections.query_syntax import MAX_QUERY_CHARS
from projections.runner import Projections
from projections.search import (
    MAX_FILTER_CHARS,
    MAX_OFFSET,
    IndexBehindError,
    SearchView,
    search,
)
from projections.view import Page

router = APIRouter(prefix="/api/v1/search", tags=["search"], route_class=AuthFirstRoute)

SEARCHERS = require_in_handler(Role.COMPLIANCE, Role.AUDITOR, Role.CREDIT_OFFICER)

SYNTAX = (
    'Words, "exact phrases", a OR b, -excluded, prefix*; case and accents are ignored '
    '("tasacion" finds "TASACIÓN"). A query that only excludes is refused (422).'
)


class SearchUnavailableError(ArchiveError):
    status = 503
    title = "Search unavailable"


async def parsed_query(
    q: Annotated[
        str,
        Query(
            min_length=1,
            max_length=MAX_QUERY_CHARS,
            description=SYNTAX,
            examples=['"préstamo hipotecario" tasacion -borrador', "9872023VH5797S0001WX"],
        ),
    ],
) -> query_syntax.Query:
    """Parsed before the views are brought up to date, so a bad query answers 422 at once;
    async because it is quick pure work (a sync dependency costs a thread-pool hop)."""
    return query_syntax.parse(q)


@router.get(
    "",
    summary="Pages matching a full-text query, best first, with snippets",
    dependencies=[Depends(SEARCHERS)],
)
async def search_pages(
    request: Request,
    query: Annotated[query_syntax.Query, Depends(parsed_query)],
    loan_number: Annotated[str | None, Query(max_length=MAX_FILTER_CHARS)] = None,
    doc_type: DocumentType | None = None,
    borrower: Annotated[
        str | None,
        Query(
            max_length=MAX_FILTER_CHARS,
            description="Part of the borrower's name (case and accents ignored) or their "
            "national id.",
        ),
    ] = None,
    uploaded_from: Annotated[QueryDay, Query(description="Inclusive; UTC date.")] = None,
    uploaded_to: Annotated[QueryDay, Query(description="Inclusive; UTC date.")] = None,
    include_superseded: Annotated[
        bool, Query(description="Superseded documents stay searchable; false hides them.")
    ] = True,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> JSONResponse:
    """One hit per page: document id, loan number, document type, page number, a
    snippet with the matches in ``<mark>`` (HTML-escaped around them) and a rank
    (higher is better; comparable within one response). ``total`` counts every hit;
    ``position`` is the log position the index is consistent with; ``query`` is the
    query as understood."""

    # Async, with the blocking part (the caller's authentication, then the queries, and
    # the freshness barrier if needed) in one thread-pool hop: each sync dependency or
    # handler would cost a hop of its own (the docstring above is the OpenAPI
    # description). The caller is checked first; AuthFirstRoute holds back any earlier
    # error (a 422) until they are.
    def run() -> Page:
        authorize(request)
        views: Projections = request.app.state.projections
        if SearchView.name not in views.views:
            raise SearchUnavailableError("the search index is not configured on this server")
        given: dict[str, Any] = {
            "loan_number": loan_number,
            "doc_type": None if doc_type is None else doc_type.value,
            "borrower": borrower,
            "uploaded_from": uploaded_from,
            "uploaded_to": uploaded_to,
            "include_superseded": include_superseded,
            "limit": limit,
            "offset": offset,
        }
        head = log_head(request)  # read with the caller's authentication
        try:
            # The index has usually applied the head already; the search's own read of
            # its position checks that, one read transaction fewer than the barrier.
            return search(views.store, query, at_least=head, **given)
        except IndexBehindError:
            fresh_views(request, (SearchView.name,))  # the barrier: a bounded wait, or 503
            return search(views.store, query, **given)

    page = await run_in_threadpool(run)
    body = page.as_dict()
    body["query"] = str(query)
    return JSONResponse(body)  # hits hold only str, int, float, bool and None
