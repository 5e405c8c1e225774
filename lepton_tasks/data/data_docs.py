"""GX data docs views whose Jinja templates are compiled once per machine, not once per build.

GX makes a new Jinja environment for every page view of every data docs build, so each validate task compiled
the same ~50 templates again, a large part of a build (bench `validate`). These views are GX's
own, with Jinja's standard file-system bytecode cache (a private folder under the temp dir, keyed by each
template's source checksum, so a GX upgrade recompiles), shared by every task process on the machine.
`SITE_VIEWS` is the site config that selects them.

Importing this module imports GX: only GX's site builder imports it, by name, while it builds the docs.
"""

from __future__ import annotations

import logging
from functools import cache

from great_expectations.render.view import DefaultJinjaIndexPageView, DefaultJinjaPageView

log = logging.getLogger(__name__)
MODULE = __name__

SITE_VIEWS = {
    "site_index_builder": {"view": {"module_name": MODULE, "class_name": "CachedIndexPageView"}},
    "site_section_builders": {section: {"view": {"module_name": MODULE, "class_name": "CachedPageView"}}
                              for section in ("expectations", "validations", "profiling")},
}


@cache
def _bytecode_cache():
    """Jinja's cache folder for this user, or None (GX's compile-every-time) where the temp folder is not safe
    to keep one in (not this user's, or open to others) or cannot be written."""
    from jinja2 import FileSystemBytecodeCache

    class BestEffortCache(FileSystemBytecodeCache):
        def dump_bytecode(self, bucket) -> None:
            try:
                super().dump_bytecode(bucket)
            except OSError:  # a full disk costs the next build a compile, never this build
                pass

    try:
        return BestEffortCache()
    except (OSError, RuntimeError) as err:
        log.warning("data docs: no template cache (%s); GX compiles its templates on every build", err)
        return None


class _TemplatesCompiledOnce:
    """Mixed into a GX view: its Jinja environment keeps compiled templates in the machine's cache."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.env.bytecode_cache = _bytecode_cache()


class CachedPageView(_TemplatesCompiledOnce, DefaultJinjaPageView):
    pass


class CachedIndexPageView(_TemplatesCompiledOnce, DefaultJinjaIndexPageView):
    pass
