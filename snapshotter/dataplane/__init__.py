"""The data plane: what running containers read through, and what outlives `pysoci serve`.

api      the DataPlane interface and the plain values crossing it
lazy     LazyLayers: the FUSE session, span caches and managers, background fetching
plane    LocalDataPlane: the interface served by this process's LazyLayers
"""
