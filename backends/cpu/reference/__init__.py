"""Reference kernels: one readable function per op, the math of ``shared/spec/v4_ops.md`` in
plain PyTorch. Every other backend is judged against these (the conformance suite evaluates them
in float64 where the format allows)."""
