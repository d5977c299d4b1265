"""MkDocs hooks for this site (`hooks:` in mkdocs.yml).

- The pages show the README's figures from `examples/images/`, outside
  `docs/`, as `../examples/images/<name>.png`, so that the Markdown files
  show them on GitHub too. MkDocs only publishes files under `docs/`: these
  hooks add the PNGs to the site as `examples/images/<name>.png` and point
  the pages' links there.
- KNOWN_DOCSTRING_WARNINGS: griffe warnings about docstrings in
  `keras_pvera/` that are reported for a fix there. Each is logged as INFO
  instead of WARNING, so that `mkdocs build --strict` still fails on any
  other warning. Remove an entry once its docstring is fixed.
"""

import logging
import os
import re

from mkdocs.structure.files import File

IMAGES = "examples/images"
IMAGE_LINK = re.compile(r"\]\(\.\./" + re.escape(IMAGES) + "/")

# Substrings of griffe's messages (the file paths in them change as modules
# move, so they are left out).
KNOWN_DOCSTRING_WARNINGS = []

log = logging.getLogger("mkdocs.hooks.keras_pvera")


class _KnownDocstringWarnings(logging.Filter):
    def filter(self, record):
        message = record.getMessage()
        if record.levelno == logging.WARNING and any(
            known in message for known in KNOWN_DOCSTRING_WARNINGS
        ):
            log.info("known docstring problem (to fix in keras_pvera): %s", message)
            return False
        return True


def on_startup(command, dirty):
    logging.getLogger("mkdocs.plugins.griffe").addFilter(_KnownDocstringWarnings())


def on_files(files, config):
    root = os.path.dirname(config.config_file_path)
    folder = os.path.join(root, IMAGES)
    for name in sorted(os.listdir(folder)):
        if name.endswith(".png"):
            files.append(
                File.generated(
                    config, f"{IMAGES}/{name}", abs_src_path=os.path.join(folder, name)
                )
            )
    return files


def on_page_markdown(markdown, page, config, files):
    return IMAGE_LINK.sub(f"]({IMAGES}/", markdown)
