"""The native backends' shared layer (installed as graphc.backends.schedule): what llvm and cuda both
need and must not write twice.

- cache: the one content-addressed on-disk cache of compiled code (object code, PTX, shared
  libraries, precompiled headers), with one policy for damaged entries.
- arena: the one arena memory planner (buffer lifetimes + sizes -> offsets and a total).
- names: the one generator of unique identifiers (C, Python, LLVM names) within a scope.
"""
