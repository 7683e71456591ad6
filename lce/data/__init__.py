"""Text sources, tokenizers, training streams and evaluation documents."""

from lce.data.corpus import eval_documents, token_stream, tokenized_documents
from lce.data.hub import GovReportData, PG19Data, ProofPileData
from lce.data.sources import DATASETS, HFData, LocalData, StdlibData, build_data, hash_split
from lce.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

__all__ = [
    "DATASETS", "ByteTokenizer", "GovReportData", "HFData", "HFTokenizer", "LocalData", "PG19Data", "ProofPileData",
    "StdlibData", "Tokenizer", "build_data",
    "eval_documents", "hash_split", "token_stream", "tokenized_documents",
]
