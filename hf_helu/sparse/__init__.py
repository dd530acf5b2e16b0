"""Sparse inference: a ReLU/HeLU model's FFN zeros turned into batch-1 decoding speed on CPU.

- :mod:`hf_helu.sparse.swap`: :func:`sparse_inference` / :func:`dense_inference`, the reversible module swap, and
  its :class:`SparseInference` handle;
- :mod:`hf_helu.sparse.modules`: the sparse FFN modules and the dispatcher that picks the kernel or the dense ops
  per call;
- :mod:`hf_helu.sparse.kernel`: the fused C kernel (``sparse_ffn.c``, package data), built on first use.
"""

from hf_helu.sparse.swap import SparseInference, dense_inference, sparse_inference

__all__ = ["SparseInference", "dense_inference", "sparse_inference"]
