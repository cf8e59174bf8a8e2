"""The `qlora-compile` command line and the helpers it shares (packaged assets)."""
