"""Graph passes run by qlora_compile's torch.compile backend (one pass per file).

Planned with `qlora_compile.compile()`: fuse the LoRA branch into the base op, fuse linears that
share an input, choose the kernel per shape and device.
"""
