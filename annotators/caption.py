"""Captions: the source's caption / alt-text, passed through (offline default)."""

from __future__ import annotations

from annotators.base import Annotator


class SourceCaption(Annotator):
    name = "source-caption"
    version = "1"
    modality = "caption"
    inputs = ("captions",)

    def __call__(self, images: list, captions: list[str | None] | None = None) -> list[str]:
        """The given captions, whitespace-normalised (missing ones become "")."""
        captions = captions if captions is not None else [None] * len(images)
        if len(captions) != len(images):
            raise ValueError(f"got {len(captions)} captions for {len(images)} images")
        return [" ".join((caption or "").split()) for caption in captions]
