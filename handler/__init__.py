"""TorchServe handler package: request parsing, batching and the caption handler."""
