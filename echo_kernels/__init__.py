"""Triton kernels for ECHO's ops, one file per op. They import no model code; `echo/ops/` holds the
references and the dispatch."""
