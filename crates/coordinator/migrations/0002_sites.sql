-- Sites and what they need: the sites themselves, the join tokens they registered with,
-- the last status report applied per job attempt, and uploads reserved at the hub broker.
--
-- Same rules as 0001: BIGINT, TEXT and BYTEA only, times as BIGINT microseconds since the
-- Unix epoch, one file for SQLite and PostgreSQL. Secrets are never stored: a join token
-- and a site credential are kept only as their BLAKE3 hash (secret.rs); they are 256-bit
-- random strings, so a fast hash is as good as a slow one and cannot be brute-forced.

CREATE TABLE sites (
    site_id TEXT PRIMARY KEY,
    -- Human-readable, unique among sites.
    name TEXT NOT NULL UNIQUE,
    -- BLAKE3 (derive_key, "site credential" context) of the site credential.
    credential_hash BYTEA NOT NULL,
    -- Labels the admin set on the join token, as a JSON object; they override the
    -- labels the manager advertises.
    admin_labels TEXT NOT NULL,
    -- dispatch.v1.Capabilities (protobuf) as last advertised, at Register or hello.
    capabilities BYTEA NOT NULL,
    -- CONNECTED, UNREACHABLE, DISCONNECTED or REVOKED (SiteHealth without its prefix).
    health TEXT NOT NULL,
    -- dispatch.v1.CapacityUpdate (protobuf) as last advertised.
    capacity BYTEA,
    registered_at BIGINT NOT NULL,
    -- Last message or heartbeat from any of its managers (written in batches).
    last_seen_at BIGINT,
    -- Set once the site opened its first session: a registration can no longer be
    -- replayed for a fresh credential after that.
    first_session_at BIGINT,
    revoked_at BIGINT,
    revoke_message TEXT
);

CREATE TABLE join_tokens (
    -- Non-secret id, for logs and audit.
    token_id TEXT PRIMARY KEY,
    -- BLAKE3 (derive_key, "join token" context) of the token.
    token_hash BYTEA NOT NULL UNIQUE,
    -- Name the site will get; empty: the manager's suggestion.
    site_name TEXT NOT NULL,
    -- Labels set on the site (JSON object).
    admin_labels TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    -- Set when a site registered with it: single use.
    used_at BIGINT,
    used_by_site TEXT,
    -- The manager's `RegisterRequest.request_id`, so a retry after a lost answer gets the
    -- same site instead of a refusal.
    request_id TEXT
);

-- The highest status report sequence applied per job attempt: a report at or below it
-- is a replay, acknowledged and otherwise ignored.
CREATE TABLE report_sequences (
    job_id TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    last_sequence BIGINT NOT NULL,
    PRIMARY KEY (job_id, attempt)
);

-- Places reserved at the hub broker for a job's inputs (`CreateUpload`).
CREATE TABLE uploads (
    upload_id TEXT PRIMARY KEY,
    -- Hub-store-relative directory, `uploads/<upload_id>`.
    hub_path TEXT NOT NULL,
    -- The job it may be used by, when the client named one; NULL: any.
    job_id TEXT,
    expected_bytes BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    -- Unused after this, it is forgotten and its data removed.
    expires_at BIGINT NOT NULL,
    -- The job that took it; it then lives as long as that job.
    used_by_job TEXT,
    used_at BIGINT
);
CREATE INDEX uploads_by_expiry ON uploads (used_by_job, expires_at);

-- The scheduler's order: priority, then FIFO by submission.
CREATE INDEX jobs_queue_fifo ON jobs (state, priority DESC, created_at, job_id);
