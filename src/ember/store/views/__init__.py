"""Built-in projections and the view tables they maintain."""

from __future__ import annotations

from ember.store.projections import Projection
from ember.store.views.releases import ReleasesProjection
from ember.store.views.routes import RoutesProjection
from ember.store.views.scheduling import SchedulingProjection
from ember.store.views.streams import StreamsProjection
from ember.store.views.tenancy import TenancyProjection


def all_projections() -> list[Projection]:
    """Every projection the controller runs, in no particular order."""
    return [
        StreamsProjection(),
        TenancyProjection(),
        ReleasesProjection(),
        SchedulingProjection(),
        RoutesProjection(),
    ]
