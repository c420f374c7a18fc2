-- Hosts, instances and workloads (the 'scheduling' projection), host liveness and the
-- controller's leader lease. docs/specs/events.md, "Hosts" and "Instances".
CREATE TABLE view_scheduling_streams (
    stream_id  text   PRIMARY KEY,
    version    bigint NOT NULL
);

CREATE TABLE view_hosts (
    host_id        text        PRIMARY KEY,
    vcpus          integer     NOT NULL,
    memory_mb      integer     NOT NULL,
    disk_mb        bigint      NOT NULL,
    labels         jsonb       NOT NULL,
    region         text        NOT NULL,
    address        text        NOT NULL,
    admin_state    text        NOT NULL,  -- 'ready' | 'cordoned' | 'draining'
    down           boolean     NOT NULL,
    version        bigint      NOT NULL,  -- the host stream's version (a plan's expected version)
    registered_at  timestamptz NOT NULL,
    state_since    timestamptz NOT NULL
);

CREATE TABLE view_instances (
    instance_id      text        PRIMARY KEY,
    app_id           text        NOT NULL,
    env              text        NOT NULL,
    process          text        NOT NULL,
    release_version  integer     NOT NULL,
    spec_hash        text        NOT NULL,
    spec             jsonb       NOT NULL,
    rollout_id       text,
    state            text        NOT NULL,
    host_id          text,
    memory_mb        integer     NOT NULL,
    cpus             real        NOT NULL,
    reason           text        NOT NULL,
    exit_code        integer,
    created_at       timestamptz NOT NULL,
    state_since      timestamptz NOT NULL
);
CREATE INDEX view_instances_env_idx ON view_instances (app_id, env);
CREATE INDEX view_instances_host_idx ON view_instances (host_id)
    WHERE state NOT IN ('stopped', 'failed', 'lost');
CREATE INDEX view_instances_pending_idx ON view_instances (app_id, env) WHERE state = 'pending';

CREATE TABLE view_workloads (
    app_id      text        NOT NULL,
    env         text        NOT NULL,
    version     bigint      NOT NULL,
    state       jsonb       NOT NULL,  -- ember.core.workloads.WorkloadState
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (app_id, env)
);

-- Liveness, not history: a heartbeat only moves last_seen (ADR-0014). The controller
-- turns silence into host.marked_down and a heartbeat after it into host.recovered.
CREATE TABLE host_heartbeats (
    host_id    text        PRIMARY KEY,
    last_seen  timestamptz NOT NULL,
    report     jsonb       NOT NULL DEFAULT '{}'
);

-- The controller's leader lease. The epoch grows on every change of holder; controller
-- writes check (holder, epoch, unexpired) in their own transaction (the fence).
CREATE TABLE leases (
    name         text        PRIMARY KEY,
    holder       text        NOT NULL,
    epoch        bigint      NOT NULL,
    acquired_at  timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL
);
