"""The wing that owns registry-served layers end to end: from an image reference and a layer
digest to a directory containerd (or `pysoci mount`) can stack, lazy through the data plane
where the image's SOCI index has a zTOC for the layer, unpacked here where not.

    spec     LayerSpec: what serving one layer lazily needs, serializable (labels, JSON)
    resolve  image → manifest, diff IDs, SOCI index; a layer → its plan (lazy spec or local)
    layers   RemoteLayers: prepare, check, release, restore, orphan sweep, local fallback
    hook     SociRemote: the snapshotter's RemoteHook (gRPC threads → the trio loop)
"""
