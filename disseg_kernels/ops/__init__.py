"""Public ops: one module per op family, each a custom op with autograd."""
