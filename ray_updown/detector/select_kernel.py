"""The greedy scan of region selection as one fused Triton kernel (CUDA), off by default.

`select.greedy_scan_torch` launches a few kernels per rank, 299 ranks in a row: on a GPU its
time is launch latency, not arithmetic (7.9 ms per image measured on an H200). Here one program
per (image, class) walks the ranks itself, holding that class's suppression state in registers,
so the whole scan is a single launch. It reads the same boolean overlap matrix the torch loop
reads (computed by torch), so both decide from identical IoUs.

The extraction pipeline uses it by default on CUDA (ExtractConfig.greedy_scan="auto"; measured
equal to the torch loop and faster on an H200, 2026-12-04); `BottomUpDetector.prepare_inference`
keeps "torch" unless asked. tests/test_select_kernel.py checks it against the torch oracle on
CUDA, and its logic through Triton's CPU interpreter (TRITON_INTERPRET=1) elsewhere. The rank
count r is a compile-time constant (the interpreter needs a constant loop bound): one compile
per distinct padded proposal count, which is post-NMS 300 for nearly every batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs of torch ship without Triton
    triton = None


if triton is not None:

    @triton.jit
    def _greedy_scan_kernel(over_ptr, order_ptr, counts_ptr, kept_ptr, num_classes,
                            r: tl.constexpr, BLOCK: tl.constexpr):
        program = tl.program_id(0)  # image * num_classes + class
        image = program // num_classes
        count = tl.load(counts_ptr + image)
        ranks = tl.arange(0, BLOCK)
        real = ranks < count
        boxes = tl.load(order_ptr + program * r + ranks, mask=real, other=0)  # rank -> box
        suppressed = ranks < 0  # all False
        # The loop bound is the constant r, not the loaded count: Triton's interpreter (3.6
        # with NumPy 2) takes no loaded value as a bound. Ranks past the count change nothing.
        for rank in range(0, r):
            # Is the head (this class's rank-th box) still kept? A masked sum reads one lane.
            head_suppressed = tl.sum(tl.where(ranks == rank, suppressed, False).to(tl.int32))
            if (head_suppressed == 0) & (rank < count):
                head = tl.load(order_ptr + program * r + rank)
                row = tl.load(over_ptr + (image * r + head) * r + boxes, mask=real, other=0)
                suppressed = suppressed | ((row != 0) & (ranks > rank))
        kept = real & ~suppressed
        tl.store(kept_ptr + program * r + ranks, kept.to(tl.int8), mask=ranks < r)


def greedy_scan_triton(over: Tensor, order: Tensor, counts: Tensor) -> Tensor:
    """Same contract as `select.greedy_scan_torch`: kept (N, K, R) in box order."""
    if triton is None:
        raise RuntimeError("greedy_scan='triton' needs Triton (it ships with CUDA builds of torch)")
    n, k, r = order.shape
    kept_by_rank = torch.zeros((n, k, r), dtype=torch.int8, device=order.device)
    if n * k * r:
        block = max(16, triton.next_power_of_2(r))
        _greedy_scan_kernel[(n * k,)](over.to(torch.uint8).contiguous(), order.contiguous(),
                                      counts.to(torch.int32).contiguous(), kept_by_rank, k, r,
                                      BLOCK=block)
    kept = torch.zeros((n, k, r), dtype=torch.bool, device=order.device)
    kept.scatter_(2, order, kept_by_rank.bool())
    # Padding is "kept" by the torch scan (nothing suppresses it); match that exactly.
    pad = torch.arange(r, device=order.device)[None, None, :] >= counts[:, None, None]
    return kept | pad
