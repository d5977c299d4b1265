"""Griffe extension for the API reference: doctest examples as code blocks.

keras_pvera's docstrings write their examples for `--doctest-modules`: a
line `Example:`, a blank line, then the `>>>` lines unindented. Google-style
parsing reads a section only from indented lines right below its title, so
the examples would reach Markdown as plain text, where `>>>` starts nested
quotes. This extension indents such a block under an `Examples:` title, the
form the parser reads, so the `>>>` lines render as Python console blocks.
The text is not changed otherwise; a docstring already written that way is
left alone.
"""

import re

import griffe

EXAMPLE_TITLE = re.compile(r"^Examples?:\s*$")
# A section title after the examples ends them (none of today's do).
SECTION_TITLE = re.compile(
    r"^(Args|Arguments|Parameters|Returns|Yields|Raises|Attributes|Note|Notes|"
    r"Warning|Warnings|See Also|References)\s*:\s*$"
)


def indent_examples(text):
    """Returns `text` with unindented `Example:` blocks indented under it."""
    lines = text.split("\n")
    out = []
    i = 0
    while i < len(lines):
        line = lines[i]
        blank_below = i + 1 < len(lines) and not lines[i + 1].strip()
        if EXAMPLE_TITLE.match(line) and blank_below:
            out.append("Examples:")
            i += 2  # The blank line below the title would end the section.
            while i < len(lines) and not SECTION_TITLE.match(lines[i]):
                out.append("    " + lines[i] if lines[i].strip() else "")
                i += 1
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


class DoctestExamples(griffe.Extension):
    def on_instance(self, *, obj, **kwargs):
        if obj.docstring is not None:
            obj.docstring.value = indent_examples(obj.docstring.value)
