-- What the controller needs from a promotion: the release live before it (the target of
-- an auto-rollback or an aborted canary) and whether to roll back automatically.
ALTER TABLE view_releases
    ADD COLUMN previous_active integer,
    ADD COLUMN auto_rollback   boolean NOT NULL DEFAULT false;
