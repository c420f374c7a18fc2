-- Workload console logs shipped by the host agents (ADR-0016, docs/specs/api.md "Logs").
-- Not domain events: nothing folds them, they are pruned (per environment: the newest
-- lines only, and nothing older than a few days), and no projection rebuild touches them.
--
-- Writers of one environment take turns on an advisory lock (ember.store.logs), so within
-- an environment ids are handed out and committed in the same order: a reader's "after id
-- N" never skips a line that commits later with a smaller id.
CREATE TABLE instance_logs (
    id           bigserial   PRIMARY KEY,
    org_id       text        NOT NULL,
    app_id       text        NOT NULL,
    env          text        NOT NULL,
    process      text        NOT NULL,
    instance_id  text        NOT NULL,
    host_id      text        NOT NULL,
    stream       text        NOT NULL,  -- 'app' | 'init' | 'kernel' | 'agent'
    ts           timestamptz NOT NULL,  -- when the agent read the line
    received_at  timestamptz NOT NULL DEFAULT now(),  -- retention by age
    line         text        NOT NULL
);
-- An environment's lines in id order: reads, follows, heads and the per-env prune.
CREATE INDEX instance_logs_env_idx ON instance_logs (app_id, env, id);
