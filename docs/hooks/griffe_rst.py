"""Griffe extension for the API page: the docstrings are written for reading in the source, with the reST
of Sphinx (``code``, :class:`~pkg.Name`, ``.. math::``); on the site they are Markdown. This turns the
inline forms into Markdown code spans so they do not show as raw roles, and splits the numpy-style
parameter entries that document several names at once (``lamda, tau``), which griffe would otherwise
show with the first name's type and default for all of them."""
from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

#: :role:`~a.b.Name` or :role:`a.b.Name` or :role:`text <target>`
_ROLE = re.compile(r':(?:func|class|meth|mod|attr|data|exc|obj|math):`~?([^`<]*?)(?:\s*<[^>]*>)?`')


def markdown_from_rest(text: str) -> str:
    """Sphinx roles become code spans naming their target (``~`` keeps the last part); ``x`` stays code."""
    def role(match: re.Match) -> str:
        target = match.group(1).strip()
        if match.group(0).startswith(':math:'):
            return target
        if '~' in match.group(0).split('`')[1][:1]:
            target = target.rsplit('.', 1)[-1]
        return f'`{target.lstrip(".")}`'

    return _ROLE.sub(role, text)


_NAMES = re.compile(r'^([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)+)\s*$')


def split_grouped_parameters(text: str) -> str:
    """In a numpy ``Parameters`` section, ``a, b`` with one description becomes ``a`` and ``b`` with it."""
    lines, out, i, section = text.splitlines(), [], 0, ''
    while i < len(lines):
        line = lines[i]
        if i + 1 < len(lines) and set(lines[i + 1].strip()) == {'-'} and line.strip():
            section = line.strip()
        names = _NAMES.match(line) if section == 'Parameters' and not line.startswith(' ') else None
        if names:
            body = []
            while i + 1 < len(lines) and (lines[i + 1].startswith(' ') or not lines[i + 1].strip()) \
                    and not (i + 2 < len(lines) and set(lines[i + 2].strip()) == {'-'}):
                i += 1
                body.append(lines[i])
            for name in (n.strip() for n in names.group(1).split(',')):
                out += [name, *body]
        else:
            out.append(line)
        i += 1
    return '\n'.join(out)


class RestRoles(Extension):
    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = split_grouped_parameters(markdown_from_rest(obj.docstring.value))
