"""The data plane: what running containers read through, in a process that outlives
`pysoci serve` (`pysoci data-plane run`).

    api         the DataPlane interface and the plain values crossing it
    lazy        LazyLayers: the FUSE session, span caches and managers, background fetching
    plane       LocalDataPlane: a LayerSpec → a served layer (zTOC, range source)
    protocol    its local API on the wire: JSON lines, typed errors
    server      that API on ROOT/data-plane.sock (in the data plane)
    client      that API as the control plane calls it (implements DataPlane)
    process     the data-plane process: run, hand over to a successor, stop
    supervisor  the control plane's watch: find or start a data plane, serve layers again
"""
