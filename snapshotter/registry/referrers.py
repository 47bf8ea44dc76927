"""Referrers of a manifest: the OCI referrers API, and the `<alg>-<hex>` fallback tag.

Pages of the API are followed through `Link: <...>; rel="next"` on the same origin only.
"""

from __future__ import annotations

import re

import httpx

from snapshotter.errors import ManifestError, RegistryNotFoundError, RegistryResponseError
from snapshotter.registry.hosts import Endpoint
from snapshotter.registry.manifests import MAX_MANIFEST_SIZE, ManifestPuller
from snapshotter.registry.reference import Reference
from snapshotter.registry.session import RegistrySession
from snapshotter.registry.wire import content_type, read_body, safe_url, same_origin
from snapshotter.soci.oci import (
    MEDIA_TYPE_OCI_INDEX,
    Descriptor,
    ImageIndex,
    parse_image_index,
    parse_manifest,
    validate_digest,
)

MAX_REFERRERS_PAGES = 16
"""Pages of the referrers API read for one subject (each at most 4 MiB); an answer that has
more is an error, not a silently shortened list."""
_LINK_NEXT_RE = re.compile(r'<([^>]*)>\s*;\s*rel="?next"?')


class ReferrersReader:
    """Referrers look-ups of one `RegistryClient`."""

    def __init__(self, session: RegistrySession, manifests: ManifestPuller) -> None:
        self._session = session
        self._manifests = manifests

    async def referrers(
        self, ref: Reference, subject_digest: str, artifact_type: str | None = None
    ) -> list[Descriptor]:
        """Descriptors of manifests whose subject is `subject_digest`.

        Uses the referrers API, following `Link: <...>; rel="next"` pages on the same origin.
        Registries without it (404, or a first answer that is not an OCI index) are read
        through the `<alg>-<hex>` fallback tag. A later page that is not an index, a body that
        is not a valid index, a next link to another origin, or more than MAX_REFERRERS_PAGES
        pages (16) is a typed error (`RegistryResponseError`). Filtered by `artifact_type`
        when given (whether or not the registry filtered).
        """
        validate_digest(subject_digest)
        what = f"referrers of {subject_digest} in {ref.locator}"

        async def api(endpoint: Endpoint) -> list[Descriptor] | None:
            client = self._session.client_for(endpoint)
            url = self._session.url(endpoint, ref, "referrers", subject_digest)
            if artifact_type:
                url = url.copy_merge_params({"artifactType": artifact_type})
            found: list[Descriptor] = []
            for page_number in range(MAX_REFERRERS_PAGES):

                async def once(
                    page_url: httpx.URL = url, first: bool = page_number == 0
                ) -> tuple[list[Descriptor], httpx.URL | None] | None:
                    headers = {**endpoint.headers, "Accept": MEDIA_TYPE_OCI_INDEX}
                    response = await self._session.send(client, "GET", page_url, headers=headers)
                    try:
                        if response.status_code == 404 and first:
                            return None
                        if response.status_code != 200:
                            await self._session.fail(response, what)
                        media_type = content_type(response)
                        if media_type != MEDIA_TYPE_OCI_INDEX:
                            if first:
                                return None  # not the referrers API: use the fallback tag
                            raise RegistryResponseError(
                                f"{what}: a next page answered {media_type[:80]!r},"
                                " not an OCI image index"
                            )
                        body = await read_body(response, MAX_MANIFEST_SIZE, what)
                        try:
                            index = parse_image_index(body, media_type_hint=MEDIA_TYPE_OCI_INDEX)
                        except ManifestError as exc:
                            raise RegistryResponseError(
                                f"{what}: not a valid OCI image index: {exc}"
                            ) from None
                        link = _LINK_NEXT_RE.search(response.headers.get("link", ""))
                        next_url = None
                        if link is not None:
                            try:
                                next_url = response.url.join(link.group(1))
                            except httpx.InvalidURL:
                                raise RegistryResponseError(
                                    f"{what}: invalid next page link"
                                ) from None
                            if not same_origin(next_url, response.url):
                                raise RegistryResponseError(
                                    f"{what}: next page link to another origin {safe_url(next_url)}"
                                )
                        return list(index.manifests), next_url
                    finally:
                        await response.aclose()

                page = await self._session.retrying(what, endpoint, once)
                if page is None:
                    return None
                found.extend(page[0])
                if page[1] is None:
                    return found
                url = page[1]
            raise RegistryResponseError(
                f"{what}: the registry has more than {MAX_REFERRERS_PAGES} pages of referrers"
                f" ({len(found)} in the first {MAX_REFERRERS_PAGES}); pysoci reads at most"
                f" {MAX_REFERRERS_PAGES}"
            )

        result = await self._session.with_endpoints(ref, "pull", what, api)
        if result is None:
            tag = subject_digest.replace(":", "-")
            try:
                desc, data = await self._manifests.get_manifest(ref.with_tag(tag))
            except RegistryNotFoundError:
                return []
            parsed = parse_manifest(data, media_type_hint=desc.media_type)
            result = list(parsed.manifests) if isinstance(parsed, ImageIndex) else []
        if artifact_type:
            result = [d for d in result if d.artifact_type == artifact_type]
        return result
