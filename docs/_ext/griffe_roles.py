"""Griffe extension for the API reference: Sphinx-style roles become links.

wsession's docstrings cross-reference with roles (``:class:`~wsession.Session```,
``:func:`metrics_app```), which Markdown would print literally. This turns each into an optional
autorefs link: it points at the object's reference entry when the site renders that object, and
stays plain code otherwise (an optional reference never fails the strict build). Relative names
are looked up from the docstring's own class, then its module, then the package.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from html import escape
from typing import Any

import griffe

# A target may be wrapped onto the next docstring line; the whitespace is dropped.
_ROLE = re.compile(r":(?:class|func|meth|data|attr|exc|mod|obj):`(~?)(\w[\w.\s]*)`")


def _walk(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if not member.is_alias and isinstance(member, griffe.Object):
            yield from _walk(member)


def _qualify(name: str, obj: griffe.Object, pkg: griffe.Module) -> str:
    if name.split(".")[0] == pkg.name:
        return name
    head = name.split(".")[0]
    scope: griffe.Object | None = obj
    while scope is not None:
        if head in scope.members:
            return f"{scope.path}.{name}"
        scope = scope.parent
    return f"{pkg.name}.{name}"


class SphinxRoles(griffe.Extension):
    """Rewrite ``:role:`target``` in every docstring of the package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _walk(pkg):
            if obj.docstring is None:
                continue

            def link(match: re.Match[str], obj: griffe.Object = obj) -> str:
                short, name = match[1], re.sub(r"\s+", "", match[2])
                title = name.rsplit(".", 1)[-1] if short else name
                identifier = escape(_qualify(name, obj, pkg), quote=True)
                return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'

            obj.docstring.value = _ROLE.sub(link, obj.docstring.value)
