-- The job store: jobs, their labels, and the event log that WatchJobs replays.
--
-- One file for SQLite and PostgreSQL alike, so both run the same schema: only BIGINT,
-- TEXT and BYTEA columns (SQLite gives BYTEA no affinity and keeps blobs as written),
-- times as BIGINT microseconds since the Unix epoch, no dialect-only syntax. Sites and
-- join tokens come in later migrations (0002_sites, ...); `jobs.site_id` will name
-- `sites.site_id` then, checked by the code (SQLite cannot add a constraint later).

CREATE TABLE jobs (
    job_id TEXT PRIMARY KEY,
    -- dispatch.v1.JobSpec as accepted (normalised at the door), protobuf-encoded, with
    -- every env value blanked (`KEY=`): what clients are shown.
    spec BYTEA NOT NULL,
    -- The env entries with their values, sealed under the coordinator's key (seal.rs).
    env_sealed BYTEA NOT NULL,
    -- Copied out of the spec for filtering and queue order.
    auid TEXT NOT NULL,
    priority BIGINT NOT NULL,
    -- The state machine (state.rs): state names without the JOB_STATE_ prefix, reason
    -- codes as their wire names.
    state TEXT NOT NULL,
    reason_code TEXT NOT NULL,
    reason_message TEXT NOT NULL,
    exit_code BIGINT,
    -- Latest word from the backend (pfcon's `message`).
    message TEXT NOT NULL,
    site_id TEXT,
    manager_id TEXT,
    attempt BIGINT NOT NULL,
    -- Sequence of the job's latest event.
    sequence BIGINT NOT NULL,
    -- Bumped by every write: writers update only the revision they read, so concurrent
    -- changes to one job (PostgreSQL) cannot overwrite each other.
    revision BIGINT NOT NULL,
    -- A client asked to cancel the job while a site held it; the site has not confirmed.
    cancel_requested_at BIGINT,
    cancel_message TEXT,
    -- dispatch.v1.TreeSummary of what stage-out delivered.
    outputs BYTEA,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    queued_at BIGINT NOT NULL,
    staging_in_at BIGINT,
    running_at BIGINT,
    staging_out_at BIGINT,
    finished_at BIGINT,
    deleted_at BIGINT
);
-- ListJobs: newest first, keyset paging on (created_at, job_id).
CREATE INDEX jobs_by_creation ON jobs (created_at, job_id);
-- The scheduler: queued jobs by priority, then FIFO.
CREATE INDEX jobs_queue ON jobs (state, priority, queued_at);
-- Jobs of a site (listing, site loss, reconciliation).
CREATE INDEX jobs_by_site ON jobs (site_id, state);
CREATE INDEX jobs_by_auid ON jobs (auid, created_at);

CREATE TABLE job_labels (
    job_id TEXT NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    label_key TEXT NOT NULL,
    label_value TEXT NOT NULL,
    PRIMARY KEY (job_id, label_key)
);
CREATE INDEX job_labels_by_label ON job_labels (label_key, label_value, job_id);

-- Every state change, in commit order. `sequence` is global and strictly increasing:
-- it is taken from `event_log` inside the writing transaction, whose row lock makes
-- concurrent writers commit in sequence order, so a reader that has seen N has seen
-- everything below N.
CREATE TABLE job_events (
    sequence BIGINT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
    attempt BIGINT NOT NULL,
    state TEXT NOT NULL,
    reason_code TEXT NOT NULL,
    reason_message TEXT NOT NULL,
    exit_code BIGINT,
    site_id TEXT,
    -- When the state was entered (the site's observation time when a site reported it).
    occurred_at BIGINT NOT NULL,
    -- When the hub committed it.
    recorded_at BIGINT NOT NULL
);
CREATE INDEX job_events_by_job ON job_events (job_id, sequence);

-- One row: the newest sequence handed out, and how far the log has been pruned
-- (events up to `pruned_through` are gone; a watcher asking for them is told so).
CREATE TABLE event_log (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    last_sequence BIGINT NOT NULL,
    pruned_through BIGINT NOT NULL
);
INSERT INTO event_log (id, last_sequence, pruned_through) VALUES (1, 0, 0);
