"""Training data: ``train/sources.py`` (reading, tokenizing) and ``train/loader.py`` (packing, batches).

This module re-exports both under their old names, so ``from nestlm.train import data`` keeps working.
"""

from .loader import (  # noqa: F401
    BlockLoader,
    PackedBlocks,
    PackedRows,
    RowDataset,
    TokenDataset,
)
from .sources import (  # noqa: F401
    DIR_SUFFIXES,
    SPECIAL_SOURCES,
    TEXT_SUFFIXES,
    Document,
    is_pretokenized,
    load_documents,
    load_tokens,
    read_texts,
    stdlib_files,
    tokenize,
)
