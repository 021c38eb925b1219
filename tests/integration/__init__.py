"""Integration tests: real Redis, real worker processes and the real gateway, over HTTP."""
