"""A bound on request bodies, for every route but uploads (Gradio bounds those by
``max_file_size``). Gradio has no such setting: a 250 MB JSON body was accepted and parsed, so a
pure ASGI middleware counts the bytes as they arrive (chunked bodies too) and answers 413 past the
bound. ``STUDIO_MAX_BODY_SIZE`` (default 4mb)."""

from __future__ import annotations

import os
import re

MAX_BODY = "4mb"
UNITS = {"": 1, "b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?b?)\s*", text.lower())
    if not match:
        raise ValueError(f"a size like 4mb or 512kb, not {text!r}")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def max_body_size() -> int:
    return parse_size(os.environ.get("STUDIO_MAX_BODY_SIZE") or MAX_BODY)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before the app has read it all
    (an upload: over ``upload_limit``, the file limit plus room for the form's other fields, which
    Gradio's ``max_file_size`` does not count). Past the bound the app is told the client left, and
    whatever it answers is dropped."""

    UPLOAD = "/gradio_api/upload"

    def __init__(self, app, limit: int | None = None, upload_limit: int | None = None):
        self.app, self.limit = app, limit or max_body_size()
        self.upload_limit = upload_limit or parse_size(os.environ.get("STUDIO_MAX_FILE_SIZE") or "200mb") + 2**20

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.upload_limit if scope.get("path", "").rstrip("/").endswith(self.UPLOAD) else self.limit
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._refuse(send)
        seen, refused, started = 0, False, False

        async def counted():
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    refused = True
                    if not started:
                        await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def tracked(message):
            nonlocal started
            if refused:
                return  # the 413 is the answer
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except Exception:
            if not refused:
                raise

    @staticmethod
    async def _refuse(send):
        body = b'{"detail": "request body too large"}'
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
