-- Views of the 'tenancy' projection (orgs, users, members, apps, envs, tokens) and the
-- API's idempotency records.

-- Redelivery guard of the tenancy projection: the last stream version folded per stream.
CREATE TABLE view_tenancy_streams (
    stream_id  text   PRIMARY KEY,
    version    bigint NOT NULL
);

CREATE TABLE view_orgs (
    org_id      text        PRIMARY KEY,
    name        text        NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL
);

CREATE TABLE view_users (
    user_id     text        PRIMARY KEY,
    email       text        NOT NULL UNIQUE,
    name        text        NOT NULL,
    created_at  timestamptz NOT NULL
);

CREATE TABLE view_members (
    org_id      text        NOT NULL,
    user_id     text        NOT NULL,
    role        text        NOT NULL,
    added_at    timestamptz NOT NULL,
    PRIMARY KEY (org_id, user_id)
);
CREATE INDEX view_members_user_idx ON view_members (user_id);

CREATE TABLE view_apps (
    app_id      text        PRIMARY KEY,
    org_id      text        NOT NULL,
    name        text        NOT NULL,
    created_at  timestamptz NOT NULL,
    UNIQUE (org_id, name)
);

CREATE TABLE view_envs (
    app_id      text        NOT NULL,
    name        text        NOT NULL,
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (app_id, name)
);

CREATE TABLE view_tokens (
    token_id     text        PRIMARY KEY,
    token_hash   text        NOT NULL UNIQUE,
    user_id      text        NOT NULL,
    kind         text        NOT NULL,
    name         text        NOT NULL,
    hint         text        NOT NULL,
    org_id       text,
    app_id       text,
    env          text,
    capabilities text[]      NOT NULL,
    created_at   timestamptz NOT NULL,
    expires_at   timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX view_tokens_user_idx ON view_tokens (user_id);

-- A POST retried with the same Idempotency-Key by the same token answers the first
-- response. Not a view: written by the API in the request's transaction.
CREATE TABLE api_idempotency (
    token_id      text        NOT NULL,
    key           text        NOT NULL CHECK (length(key) BETWEEN 1 AND 200),
    request_hash  text        NOT NULL,
    status        integer     NOT NULL,
    body          jsonb       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (token_id, key)
);
