"""graphc backends. Each backend is a module `backends.<name>` exposing BACKEND (a base.Backend).
graphc's core finds them by name through graphc.function.BACKENDS; it never imports one directly."""
