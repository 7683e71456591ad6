"""The long-context benchmark corpora on the Hugging Face Hub, as ready-made ``HFData`` sources (for users with
access; nothing here downloads until a split is read).

=========== ======================================== ============= ================================================
name        hub dataset                              text field    used by
=========== ======================================== ============= ================================================
pg19        ``emozilla/pg19`` (parquet copy of       ``text``      YaRN (``emozilla/pg19-test``), LongRoPE search
            ``deepmind/pg19``: 28 602 / 50 / 100                   (validation), LongLoRA and DCA (test stream)
            books)
proof_pile  ``hoskinson-center/proof-pile``          ``text``      YaRN Table 2 (its tokenized copy
            (train / validation / test)                            ``emozilla/proofpile-test-tokenized``), LongLoRA
govreport   ``tau/scrolls``, ``gov_report``, from    ``input``     YaRN (``-d tau/scrolls -s gov_report -f input``,
            the Hub's parquet export                               test split, 50 documents)
=========== ======================================== ============= ================================================

``tau/scrolls`` is a loading-script dataset, which ``datasets`` no longer runs; its parquet export (revision
``refs/convert/parquet``, one folder per config and split) holds the same rows and is read with ``data_files``.

``min_chars`` is a coarse prefilter: long-context evaluation selects documents by token count (``eval_documents``
keeps documents with at least the longest evaluation length), which needs the tokenizer; dropping documents shorter
than 8 192 characters (about 2k Llama tokens) first spares tokenizing the many short Proof-pile and GovReport
documents that could never qualify. Set it to 1 to keep every document (e.g. for ``eval.documents=concat`` or
training).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lce.data.sources import DATASETS, HFData

LONG_DOC_CHARS = 8192


@DATASETS.register("pg19")
@dataclass(frozen=True)
class PG19Data(HFData):
    """PG19 (Rae et al. 2019): Project Gutenberg books published before 1919, whole books as documents."""

    name: str = "pg19"
    path: str = "emozilla/pg19"
    min_chars: int = LONG_DOC_CHARS


@DATASETS.register("proof_pile")
@dataclass(frozen=True)
class ProofPileData(HFData):
    """Proof-pile (Azerbayev et al. 2022): arXiv math, formal proofs, math Q&A; one file or article per document."""

    name: str = "proof_pile"
    path: str = "hoskinson-center/proof-pile"
    min_chars: int = LONG_DOC_CHARS


@DATASETS.register("govreport")
@dataclass(frozen=True)
class GovReportData(HFData):
    """GovReport (Huang et al. 2021) as packaged in SCROLLS: long US government reports (``input``)."""

    name: str = "govreport"
    path: str = "tau/scrolls"
    data_files: dict | None = field(default_factory=lambda: {
        "train": "gov_report/train/*.parquet",
        "validation": "gov_report/validation/*.parquet",
        "test": "gov_report/test/*.parquet",
    })
    text_field: str = "input"
    min_chars: int = LONG_DOC_CHARS
    revision: str | None = "refs/convert/parquet"
