"""FocalSearch: instruction-conditioned image search with FocalLens-CLIP."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["FocalSearch", "FocalSearchError", "__version__"]

if TYPE_CHECKING:
    from focalsearch.api import FocalSearch
    from focalsearch.errors import FocalSearchError


def __getattr__(name: str):
    # Lazy so that `import focalsearch` (and the CLI's start-up) does not pay for torch.
    if name == "FocalSearch":
        from focalsearch.api import FocalSearch

        return FocalSearch
    if name == "FocalSearchError":
        from focalsearch.errors import FocalSearchError

        return FocalSearchError
    raise AttributeError(name)
