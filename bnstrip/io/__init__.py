"""Bytes in and out: checkpoint loading with its byte-level validators, the one atomic writer, the manifest."""
