"""Lookup-table weights: packed B-bit codes read through per-row tables.

packing    the storage format and its standard-op fallback functions
functions  the SymPy pool of invertible PTNQ functions and their lowerings
ptnq       fitting a function (or an affine grid) to a layer's rows
search     choosing a quantizer per layer by output SQNR
executors  where fitting tasks run (serial, local process pool, Ray)
ops        the C++ custom-op library: build and registration
"""
DOMAIN = "qcompile"  # the custom ops' ONNX domain
