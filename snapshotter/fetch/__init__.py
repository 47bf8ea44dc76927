"""Span fetching: the span manager, the disk cache, the background fetcher."""
