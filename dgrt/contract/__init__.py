"""The ground floor: what an export directory promises, read by every other part of dgrt.

* io_spec: every input and output of the two graphs (names, dtypes, symbolic shapes, meaning).
* manifest: manifest.json as a typed, validated `Manifest`, loaded and verified in one place.

The exporter writes this contract; the runtime, TensorRT, validate and bench only read it. Nothing here
imports the exporter or the runtime.
"""
