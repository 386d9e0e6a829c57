"""Strided views: the shared schedule's (graphc.backends.schedule.views), re-exported for the kernels."""
from graphc.backends.schedule.views import (View, broadcast_strides, collapse, contig_strides,  # noqa: F401
                                            literal_view, view_getitem)
