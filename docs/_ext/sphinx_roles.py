"""Griffe extension: render the Sphinx roles of laplace_tf docstrings as cross-references.

The docstrings use reST roles (:func:`diagonal`, :class:`~laplace_tf.DiagonalLaplace`,
:meth:`save`, ...). Markdown does not know them, so this extension rewrites each one,
when the API pages are built, into an optional autorefs link around the name in code
font: the link is made when the target is documented and silently omitted otherwise.
A leading ``~`` shows only the last component of the name, as in Sphinx.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|obj|exc):`(~?)([\w.]+)`")


class SphinxRoles(griffe.Extension):
    """Rewrite ``:role:`name``` in every docstring of the package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = ROLE.sub(
                    lambda m, obj=obj: _reference(obj, m), obj.docstring.value
                )


def _walk(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


def _reference(obj: griffe.Object, match: re.Match) -> str:
    short, name = match.groups()
    shown = name.rsplit(".", 1)[-1] if short else name
    target = _resolve(obj, name)
    if target is None:
        return f"`{shown}`"
    return f'<autoref identifier="{target}" optional><code>{shown}</code></autoref>'


def _resolve(obj: griffe.Object, name: str) -> str | None:
    try:
        return obj.resolve(name)
    except griffe.NameResolutionError:
        pass
    head = name.split(".", 1)[0]
    return name if head == obj.package.name else None
