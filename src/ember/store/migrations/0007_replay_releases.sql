-- 0005 added columns that the 'releases' projection fills at each promotion; rows folded
-- before it lack them. Empty the view and its checkpoint: the projection replays the log
-- from the start on its next run (the same as `ember admin projections rebuild releases`).
-- The pattern for every change of a view's shape.
DELETE FROM view_releases;
DELETE FROM view_releases_streams;
DELETE FROM projection_checkpoints WHERE name = 'releases';
