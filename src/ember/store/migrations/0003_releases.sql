-- View of the 'releases' projection: every release of every (app, env).
CREATE TABLE view_releases_streams (
    stream_id  text   PRIMARY KEY,
    version    bigint NOT NULL
);

CREATE TABLE view_releases (
    app_id           text        NOT NULL,
    env              text        NOT NULL,
    version          integer     NOT NULL,
    repository       text        NOT NULL,
    image_digest     text        NOT NULL,
    manifest_hash    text        NOT NULL,
    manifest         jsonb       NOT NULL,
    secrets_version  integer     NOT NULL,
    author           text        NOT NULL,
    reason           text        NOT NULL,
    rollback_of      integer,
    status           text        NOT NULL,  -- 'active' | 'superseded' | 'created'
    created_at       timestamptz NOT NULL,
    PRIMARY KEY (app_id, env, version)
);
-- Blobs of every retained release stay in the registry: garbage collection reads this.
CREATE INDEX view_releases_digest_idx ON view_releases (image_digest);
