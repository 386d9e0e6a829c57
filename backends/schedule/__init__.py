"""The native backends' shared layer (installed as graphc.backends.schedule): what llvm and cuda both
need and must not write twice.

- cache: the one content-addressed on-disk cache of compiled code (object code, PTX, shared
  libraries, precompiled headers), with one policy for damaged entries.
- arena: the one arena memory planner (buffer lifetimes + sizes -> offsets and a total).
- (names: the one generator of unique identifiers lives in the core, graphc/names.py, used by passes too.)
- plan (with steps, views): the one native schedule (of one specialisation, or symbolic over the dims):
  buffers, strided views,
  lifetimes, kernel/host/loop steps, output slots, run-time status codes, the arena assignment, and
  the walk over the graph by a backend's op-keyed table (NotLowerable -> a host step). A backend
  subclasses Schedule with its kernel rows and renders the steps (see plan's docstring).
"""
