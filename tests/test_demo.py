"""What `make run` shows a newcomer: demo loan files whose scans are OCRed and searchable."""

from __future__ import annotations

import stat
from pathlib import Path

from archive.application import ArchiveApp
from archive.demo import DEMO_USERS, seed
from archive.settings import Settings
from archive.worker import ExtractionWorker
from projections.runner import Projections
from projections.search import search


def test_demo_seed_is_searchable_after_the_worker_ran(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, demo_data=True)
    archive = ArchiveApp(settings)
    try:
        tokens_file = tmp_path / "demo-tokens.txt"
        tokens = seed(archive, tokens_file)
        assert set(tokens) == set(DEMO_USERS)
        assert stat.S_IMODE(tokens_file.stat().st_mode) == 0o600
        for name, token in tokens.items():
            assert archive.authenticate(token).name == name

        with Projections.open(settings, archive) as views:
            worker = ExtractionWorker(archive, views.store, name="ocr@demo")
            while worker.run_once():
                pass
            documents = [archive.get_document(d) for d in archive.document_ids()]
            assert [d.extraction["status"] for d in documents] == ["done"] * 3
            views.catch_up()
            accentless = search(views.store, "tasacion")
            assert accentless.total >= 1
            assert {h["doc_type"] for h in accentless.items} >= {"valuation_report"}
            cadastral = search(views.store, "9872023VH5797S0001WX")
            assert {h["loan_number"] for h in cadastral.items} == {"CR-2023-0001"}
            notice = search(views.store, '"requerimiento de pago"', loan_number="CR-2022-0417")
            assert notice.total == 1
        assert archive.verify_chain().ok
    finally:
        archive.close()
