"""Lookup-table weights: packed B-bit codes read through per-row tables.

packing    the storage format and its standard-op fallback functions
functions  the SymPy pool of invertible PTNQ functions and their lowerings
ptnq       fitting a function (or an affine grid) to a layer's rows
search     choosing a quantizer per layer by output SQNR
tables     output-aware fits: free k-means tables, GPTQ codes, layer input statistics
mixed      --weights auto: a format per layer for a target output SQNR or a size budget
executors  where fitting tasks run (serial, local process pool, Ray)
ops        the C++ custom-op library: build and registration
"""
DOMAIN = "qcompile"  # the custom ops' ONNX domain
