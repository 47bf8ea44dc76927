"""Recorded starts: which spans (and files) a container reads from its first read until its
reads go quiet, kept per image manifest and layer so that the next start fetches them at once.

    record    LayerRecording / ImageRecording: the kept form (JSON), validated when read
    recorder  Recorder: one lazy layer's recording in progress (fed by the FUSE reads)
    store     RecordingStore: ROOT/prefetch, one file per image manifest, bounded
"""
