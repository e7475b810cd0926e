"""The expert-FFN backends, siblings behind one interface (``functional.routed_ffn``).

``select`` says which one ``"auto"`` picks where, and why; ``grouped`` is the
grouped-GEMM FFN over sorted rows; the block-sparse backends (``triton``, ``torch``)
are the ops of :mod:`blocksparse_moe.ops` over a :class:`~blocksparse_moe.Topology`.
"""

from .grouped import GATE_UP_LAYOUTS, grouped_ffn
from .grouped_composed import grouped_ffn_composed, grouped_product
from .grouped_mm import grouped_mm_layout_ok
from .select import BACKENDS, BLOCK_BACKENDS, resolve_backend, resolve_block_backend

__all__ = [
    "BACKENDS",
    "BLOCK_BACKENDS",
    "GATE_UP_LAYOUTS",
    "grouped_ffn",
    "grouped_ffn_composed",
    "grouped_mm_layout_ok",
    "grouped_product",
    "resolve_backend",
    "resolve_block_backend",
]
