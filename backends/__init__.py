"""graphc backends, installed as `graphc.backends` (the folder sits at the repository's top level).

Each backend is a module `graphc.backends.<name>` exposing BACKEND (a base.Backend). graphc's core finds
them by name through graphc.function.BACKENDS; it never imports one directly."""
if __name__ != "graphc.backends":
    raise ImportError(f"the backends package is graphc.backends; import it under that name, not {__name__!r} "
                      "(pip install -e . maps the folder there)")
