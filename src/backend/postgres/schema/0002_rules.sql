-- omniq PostgreSQL schema, version 2: unique jobs, rate and concurrency limits, recurring
-- schedules (issue 11's rules on PostgreSQL). The rules themselves stay the pure functions of
-- `src/rules/` and `src/limiter.rs`; these tables hold what they read and write.

-- What is stored beside a task that has a unique key or came from a schedule (`TaskExtras` as
-- JSON), written in the insert's transaction and deleted with the task (purge).
CREATE TABLE omniq_extras (
    task_id uuid  PRIMARY KEY,
    extras  jsonb NOT NULL
);

-- Unique keys: one row per held key digest, naming its holder and the holder's hold set (bit
-- `1 << status code`: pending 2, running 4, completed 8, failed 16, cancelled 32). The primary
-- key is the rule: a second transaction inserting a held digest waits for the first to commit
-- and then sees the conflict, so no two tasks ever hold one digest, whichever processes insert.
-- A transition that takes the holder out of its hold set deletes the row in the transition's
-- own statement; a purge deletes it with the task.
CREATE TABLE omniq_unique (
    digest  bytea    PRIMARY KEY,
    task_id uuid     NOT NULL,
    states  smallint NOT NULL
);
CREATE INDEX omniq_unique_task ON omniq_unique (task_id);

-- Rate and concurrency limits per queue or kind. A claim that a limit may concern locks the
-- rows it depends on (`FOR UPDATE`, in (scope, name) order) before it counts starts and running
-- tasks: claimers of limited work take turns, everyone else never touches these rows.
CREATE TABLE omniq_limits (
    scope       text    NOT NULL CHECK (scope IN ('queue', 'kind')),
    name        text    NOT NULL,
    rate_max    integer CHECK (rate_max >= 0),
    rate_per_ms bigint  CHECK (rate_per_ms >= 1),
    concurrency integer CHECK (concurrency >= 0),
    CHECK ((rate_max IS NULL) = (rate_per_ms IS NULL)),
    PRIMARY KEY (scope, name)
);

-- Executions started in a rate-limited scope's window (one row per start), written in the
-- claim's transaction; the next claim of the scope deletes those outside the window.
CREATE TABLE omniq_rate_starts (
    scope   text   NOT NULL,
    name    text   NOT NULL,
    at      bigint NOT NULL,
    task_id uuid   NOT NULL,
    PRIMARY KEY (scope, name, at, task_id)
);

-- Running tasks per kind (a kind-limited claim counts them; running rows are few).
CREATE INDEX omniq_tasks_running_kind ON omniq_tasks (kind) WHERE state = 'running';

-- Schedules. `info` is the whole `ScheduleInfo` as JSON; `last_fired` repeats its last tick so
-- that a tick advances it conditionally (`UPDATE ... WHERE last_fired = $seen`) in the
-- transaction that inserts the tick's task: each tick fires once, whichever node runs it.
CREATE TABLE omniq_schedules (
    name       text   PRIMARY KEY,
    last_fired bigint NOT NULL,
    info       jsonb  NOT NULL
);
