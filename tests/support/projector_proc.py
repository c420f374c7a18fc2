"""A projector process for the crash test: ``python -m tests.support.projector_proc URL``."""

from __future__ import annotations

import argparse

from ember.store.db import Database
from ember.store.projections import ProjectionRunner
from ember.store.views import all_projections
from tests.support.events import REGISTRY
from tests.support.projections import CounterProjection


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("conninfo")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--once", action="store_true", help="catch up, then exit")
    args = parser.parse_args()
    with Database(args.conninfo + " application_name=ember-projector") as db:
        runner = ProjectionRunner(db, REGISTRY, [CounterProjection(args.delay), *all_projections()])
        if args.once:
            runner.catch_up(batch_size=args.batch)
        else:
            runner.run_forever(batch_size=args.batch, idle_s=0.05)


if __name__ == "__main__":
    main()
