-- Routes, hostname claims, edge listeners and dedicated IPv4 addresses (the 'routes'
-- projection), and the instance address the edge reaches an instance at.
-- docs/specs/events.md, "Routes and addresses".

-- Reported with instance.starting / instance.healthy (folded by the 'scheduling'
-- projection). Events before this migration carry none, so NULL is what a replay gives.
ALTER TABLE view_instances ADD COLUMN address text;

-- Redelivery guard of the routes projection: the last stream version folded per stream.
CREATE TABLE view_routes_streams (
    stream_id  text   PRIMARY KEY,
    version    bigint NOT NULL
);

CREATE TABLE view_routes (
    route_id        text        PRIMARY KEY,
    org_id          text        NOT NULL,
    app_id          text        NOT NULL,
    env             text        NOT NULL,
    kind            text        NOT NULL,  -- 'tls' | 'tcp'
    address         text        NOT NULL,  -- the edge address the route binds
    ip_id           text,                  -- the dedicated address's allocation, or NULL
    port            integer     NOT NULL,
    port_auto       boolean     NOT NULL,
    hostname        text,                  -- TLS routes: the SNI name
    process         text        NOT NULL,
    backend_port    integer     NOT NULL,
    proxy_protocol  text,                  -- NULL | 'v2'
    created_at      timestamptz NOT NULL
);
CREATE INDEX view_routes_env_idx ON view_routes (app_id, env);
CREATE INDEX view_routes_ip_idx ON view_routes (ip_id) WHERE ip_id IS NOT NULL;

-- Who owns a hostname (one org). verification: 'none' (claimed by its first route).
CREATE TABLE view_hostname_claims (
    hostname      text        PRIMARY KEY,
    org_id        text        NOT NULL,
    verification  text        NOT NULL,
    claimed_at    timestamptz NOT NULL
);

-- Ports of edge addresses in use: a TLS port (route_id NULL; it stays one), or one TCP
-- route's. scope: the shared address, or a dedicated address's allocation id.
CREATE TABLE view_listeners (
    scope       text        NOT NULL,
    port        integer     NOT NULL,
    address     text        NOT NULL,
    ip_id       text,
    kind        text        NOT NULL,
    route_id    text,
    claimed_at  timestamptz NOT NULL,
    PRIMARY KEY (scope, port)
);

-- Dedicated IPv4 addresses allocated to orgs (a paid add-on).
CREATE TABLE view_ipv4 (
    ip_id         text        PRIMARY KEY,
    address       text        NOT NULL UNIQUE,
    org_id        text        NOT NULL,
    allocated_at  timestamptz NOT NULL
);
CREATE INDEX view_ipv4_org_idx ON view_ipv4 (org_id);
