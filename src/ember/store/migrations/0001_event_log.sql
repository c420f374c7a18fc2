-- The event log (docs/specs/events.md). Append-only; never UPDATE or DELETE a row.
CREATE TABLE events (
    position        bigserial   PRIMARY KEY,
    -- Top-level id of the appending transaction: readers consume rows in (xid, position)
    -- order and only below pg_snapshot_xmin, so a late-committing row is never skipped.
    xid             xid8        NOT NULL DEFAULT pg_current_xact_id(),
    -- Formats of stream_id and type are validated by the store before every append; a
    -- regex CHECK here would cost ~5% of append throughput, and only the store writes here.
    stream_id       text        NOT NULL CHECK (length(stream_id) BETWEEN 1 AND 200),
    stream_version  bigint      NOT NULL CHECK (stream_version >= 1),
    type            text        NOT NULL CHECK (length(type) BETWEEN 3 AND 200),
    schema_version  integer     NOT NULL DEFAULT 1 CHECK (schema_version >= 1),
    data            jsonb       NOT NULL CHECK (jsonb_typeof(data) = 'object'),
    metadata        jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    -- The optimistic-concurrency guard: two writers cannot both take a version.
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version)
);

CREATE INDEX events_xid_position_idx ON events (xid, position);

-- A retried append with the same key answers the first result and writes nothing.
CREATE TABLE idempotency_keys (
    key           text        PRIMARY KEY CHECK (length(key) BETWEEN 1 AND 200),
    request_hash  text        NOT NULL,
    result        jsonb       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- One row per projection; updated in the same transaction as the projection's views.
CREATE TABLE projection_checkpoints (
    name        text        PRIMARY KEY,
    xid         xid8        NOT NULL DEFAULT '0',
    position    bigint      NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- View: one row per stream (kind, version, last event). Built by the 'streams' projection.
CREATE TABLE view_streams (
    stream_id         text        PRIMARY KEY,
    kind              text        NOT NULL,
    version           bigint      NOT NULL,
    last_type         text        NOT NULL,
    last_position     bigint      NOT NULL,
    first_recorded_at timestamptz NOT NULL,
    last_recorded_at  timestamptz NOT NULL
);

-- History is never rewritten: refuse UPDATE, DELETE and TRUNCATE on the log itself.
CREATE FUNCTION events_are_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the event log is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER events_no_update_delete BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_are_immutable();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_are_immutable();
