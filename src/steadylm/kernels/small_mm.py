"""Matmuls with a handful of rows as Inductor reductions: a post-grad graph pass for compiled
decode steps on CPU.

Why: a decode step multiplies ``batch`` rows (one token each) by every weight matrix. On CPU,
Inductor hands each such ``mm`` to the external BLAS call, whose fixed cost per call dominates at a
few rows, and whose output must be written out before the next kernel reads it. Written as
``sum_k a[m, k] · b[k, n]`` (broadcast multiply, then a reduction over k), the same product is a
kernel Inductor generates itself: vectorised over k, parallel over the output columns, and fused
with the elementwise work that consumes it. Measured on the micro preset (2-core AVX-512 CPU, fp32,
``BENCHMARKS.md``, "Session 9"): batch 1 decoding 2.9× faster with every matmul rewritten (the
LM head included), batch 8 ~1.15×; 4.6× and 1.7× HF's ``generate``.

Inductor has a pass of its own (``post_grad_fusion_options["decompose_mm_pass"]``), but on CPU it
stops at one row and 2,048 columns (below the LM head) and reads its limits once per process, at
import. This one is ours: :class:`SmallRowMatmulPass` with its row limit as an argument, given to
one ``torch.compile`` through ``options`` (:func:`decode_compile_options`), so nothing outside that
compile changes. Low-precision inputs are multiplied and summed in fp32 and rounded once, as a
GEMM does.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor
from torch.fx import Graph, Node

__all__ = ["MAX_ROWS", "SmallRowMatmulPass", "decode_compile_options"]

aten = torch.ops.aten
prims = torch.ops.prims

#: Rows (tokens) up to which a CPU matmul is rewritten. Measured (BENCHMARKS.md, "Session 9"):
#: batch 8 and 16 decode faster rewritten, batch 32 is a tie. The reduction reads each weight once
#: per row where BLAS blocks the rows, so its advantage shrinks as rows grow.
MAX_ROWS = 16

_LOW_PRECISION = (torch.bfloat16, torch.float16)

try:  # torch >= 2.6 has the interface; older builds run the decode step without the pass
    from torch._inductor.custom_graph_pass import CustomGraphPass
except ImportError:  # pragma: no cover - depends on the torch build
    CustomGraphPass = object  # type: ignore[assignment,misc]


class SmallRowMatmulPass(CustomGraphPass):  # type: ignore[misc,valid-type]
    """Rewrite ``mm(a, b)`` / ``addmm(bias, a, b)`` on CPU with at most ``max_rows`` static rows as
    ``sum(a[:, :, None] · b[None], dim=1)`` (``+ bias``). Other matmuls are left alone."""

    def __init__(self, max_rows: int = MAX_ROWS) -> None:
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be an int >= 1, got {max_rows!r}")
        self.max_rows = max_rows
        self.rewritten = 0  # matmuls rewritten by this instance (read by tests)

    def __call__(self, graph: Graph) -> None:
        for node in list(graph.nodes):
            if node.op != "call_function" or node.kwargs:
                continue
            if node.target is aten.mm.default:
                bias, a, b = None, *node.args
            elif node.target is aten.addmm.default:
                bias, a, b = node.args
            else:
                continue
            if not self._wanted(a, b):
                continue
            # The product's dtype is the operands' (mm does not promote).
            out_dtype = node.meta["val"].dtype if isinstance(node.meta.get("val"), Tensor) else a.meta["val"].dtype
            with graph.inserting_before(node):
                out = _reduction_matmul(graph, a, b, bias, out_dtype)
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            # The operands are materialised once rather than recomputed inside the reduction (a
            # norm feeding the matmul would otherwise be re-evaluated for every output column).
            for operand in (a, b):
                operand.meta["inductor_realize_to_strides"] = True
            self.rewritten += 1

    def _wanted(self, a: Any, b: Any) -> bool:
        if not (isinstance(a, Node) and isinstance(b, Node)):
            return False
        a_val, b_val = a.meta.get("val"), b.meta.get("val")
        if not (isinstance(a_val, Tensor) and isinstance(b_val, Tensor)):
            return False
        if a_val.device.type != "cpu" or b_val.device.type != "cpu" or a_val.dim() != 2 or b_val.dim() != 2:
            return False
        rows = a_val.shape[0]
        return isinstance(rows, int) and 1 <= rows <= self.max_rows and a_val.is_floating_point()

    def uuid(self) -> bytes:
        """Inductor's cache key for graphs compiled with this pass: this file's text and the limit."""
        with open(__file__, "rb") as source:
            text = source.read()
        return hashlib.sha256(text + f"|max_rows={self.max_rows}".encode()).digest()


def _call(graph: Graph, target: Any, *args: Any) -> Node:
    """A new node ``target(*args)`` with its fake value (later passes and lowering read ``meta["val"]``)."""
    node = graph.call_function(target, args)
    values = [a.meta["val"] if isinstance(a, Node) else a for a in args]
    fake = next(v for v in values if isinstance(v, Tensor)).fake_mode
    with fake:
        node.meta["val"] = target(*values)
    return node


def _reduction_matmul(graph: Graph, a: Node, b: Node, bias: Node | None, out_dtype: torch.dtype) -> Node:
    if a.meta["val"].dtype in _LOW_PRECISION:
        a = _call(graph, prims.convert_element_type.default, a, torch.float32)
    if b.meta["val"].dtype in _LOW_PRECISION:
        b = _call(graph, prims.convert_element_type.default, b, torch.float32)
    products = _call(graph, aten.mul.Tensor, _call(graph, aten.unsqueeze.default, a, 2), _call(graph, aten.unsqueeze.default, b, 0))
    out = _call(graph, aten.sum.dim_IntList, products, [1])
    if bias is not None:
        out = _call(graph, aten.add.Tensor, out, bias)
    if out.meta["val"].dtype != out_dtype:
        out = _call(graph, prims.convert_element_type.default, out, out_dtype)
    return out


def decode_compile_options(device: torch.device) -> dict[str, Any] | None:
    """``torch.compile`` options for a decode step on ``device``: the small-row pass on CPU (None
    elsewhere: cuBLAS is already fast at a few rows, and CUDA steps run as CUDA graphs)."""
    if device.type != "cpu" or CustomGraphPass is object:
        return None
    return {"post_grad_custom_post_pass": SmallRowMatmulPass()}
