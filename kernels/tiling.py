"""Program-to-tile order shared by the matmul kernels.

A row-major launch order streams every tile of one row before the next row: for the
expert FFN that re-reads a whole expert's weight panel (or a whole block row of the
intermediate) from device memory once per row. Grouping ``GROUP`` rows and walking
down them before moving right keeps each weight panel and each row panel hot in L2
while ``GROUP`` (or ``n_cols``) programs reuse it: the classic grouped ordering of
Triton's matmul tutorial, applied to block rows.
"""

import triton
import triton.language as tl

GROUP = 8  # rows per group: about the square root of the programs an H100 runs at once


@triton.jit
def grouped_tile(pid, n_rows, n_cols, GROUP: tl.constexpr):
    """Map a 1-D program id over an ``n_rows x n_cols`` grid to ``(row, col)``, a bijection."""
    width = GROUP * n_cols
    first = (pid // width) * GROUP
    rows_here = tl.minimum(n_rows - first, GROUP)
    row = first + (pid % width) % rows_here
    col = (pid % width) // rows_here
    return row, col
