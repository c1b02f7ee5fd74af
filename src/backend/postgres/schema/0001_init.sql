-- omniq PostgreSQL schema, version 1. Applied by `omniq migrate` (or at connect) inside one
-- transaction, under an advisory lock, in the schema named by the connection options.
-- Times written by the engine (created_at, run_at, started_at, finished_at, log.at) are
-- milliseconds since the Unix epoch from the queue's (injectable) clock; node liveness uses the
-- server's clock (now()).

-- Tasks. Payload and result are the exact bytes the engine was given (JSON text): bytea keeps
-- them byte for byte (jsonb would reorder keys and drop whitespace).
CREATE TABLE omniq_tasks (
    id          uuid     PRIMARY KEY,
    kind        text     NOT NULL,
    queue       text     NOT NULL,
    payload     bytea    NOT NULL,
    state       text     NOT NULL
        CHECK (state IN ('pending', 'running', 'completed', 'failed', 'cancelled')),
    attempts    integer  NOT NULL CHECK (attempts >= 0),
    max_retries integer  NOT NULL CHECK (max_retries >= 0),
    priority    smallint NOT NULL,
    created_at  bigint   NOT NULL,
    run_at      bigint   NOT NULL,
    started_at  bigint,
    finished_at bigint,
    timeout_ms  bigint,
    backoff     jsonb,
    result      bytea,
    last_error  jsonb,
    errors      jsonb    NOT NULL DEFAULT '[]'::jsonb,
    -- Fencing token of the current/latest execution (0: never claimed).
    lease       bigint   NOT NULL DEFAULT 0,
    -- The node (process) running the current execution; set while state = 'running'.
    node        bigint
) WITH (
    -- Every transition updates a row: leave room for new versions on the same page, and vacuum
    -- the hot table early instead of after 20 % of it is dead.
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 1
);

-- Claim order among pending rows: priority (higher first), due time, enqueue order (UUIDv7).
CREATE INDEX omniq_tasks_pending ON omniq_tasks (priority DESC, run_at, id)
    WHERE state = 'pending';
-- The next due time (how long a worker pool may sleep).
CREATE INDEX omniq_tasks_pending_run_at ON omniq_tasks (run_at)
    WHERE state = 'pending';
-- Rescue: running executions by node.
CREATE INDEX omniq_tasks_running_node ON omniq_tasks (node)
    WHERE state = 'running';
-- Retention: terminal tasks by finish time.
CREATE INDEX omniq_tasks_finished ON omniq_tasks (finished_at)
    WHERE state IN ('completed', 'failed', 'cancelled');
-- Listing newest first, by queue.
CREATE INDEX omniq_tasks_queue_id ON omniq_tasks (queue, id);

CREATE SEQUENCE omniq_lease_seq;

-- The transition log: one row per transition, written in the transition's transaction.
CREATE TABLE omniq_log (
    seq        bigserial PRIMARY KEY,
    task_id    uuid      NOT NULL,
    from_state text,
    to_state   text      NOT NULL,
    attempt    integer   NOT NULL,
    cause      jsonb     NOT NULL,
    at         bigint    NOT NULL,
    run_id     bigint    NOT NULL
) WITH (autovacuum_vacuum_insert_scale_factor = 0.05);
CREATE INDEX omniq_log_task ON omniq_log (task_id, seq);

-- Task counts per queue and state, so that statistics never count rows. Each connection adds
-- its deltas to its own shard (pg_backend_pid() % 16) so that concurrent transitions on one
-- queue do not all wait on one counter row; readers sum the shards.
CREATE TABLE omniq_counts (
    queue text    NOT NULL,
    state text    NOT NULL,
    shard integer NOT NULL,
    n     bigint  NOT NULL,
    PRIMARY KEY (queue, state, shard)
) WITH (
    fillfactor = 50,
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 200
);

-- Processes working on this schema. Each holds a session-level advisory lock on its id (key
-- pair: hashtext of the schema name, id) and updates its heartbeat. A rescuer deletes the row
-- of a dead node before charging its executions.
CREATE TABLE omniq_nodes (
    id           bigserial   PRIMARY KEY,
    host         text        NOT NULL,
    pid          integer     NOT NULL,
    session_pid  integer     NOT NULL,
    liveness     text        NOT NULL CHECK (liveness IN ('session_lock', 'heartbeat')),
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 50);

-- Paused queues: a row while the queue is paused. Claims skip their tasks (nothing is charged).
-- Pausing takes an exclusive transaction-level advisory lock (hashtext(schema), -1) that every
-- claim transaction takes shared first, so no claim that started before a pause commits after
-- it.
CREATE TABLE omniq_paused (
    queue     text        PRIMARY KEY,
    paused_at timestamptz NOT NULL DEFAULT now()
);
