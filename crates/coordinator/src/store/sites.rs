//! The durable side of the site registry: sites, the join tokens they registered with, and
//! the uploads reserved at the hub broker. The registry (registry.rs) keeps the live view
//! (sessions, heartbeats) in memory and writes here what must survive a restart.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

use prost::Message as _;
use sqlx::Row as _;
use sqlx::any::AnyRow;

use dispatch_proto::v1;

use super::{Store, Tx, TxError, UnixMicros, WRITE_ATTEMPTS, to_i64, to_u64};
use crate::error::{Error, Result};

/// How reachable a site is (`dispatch.v1.SiteHealth` without UNSPECIFIED).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SiteHealth {
    /// At least one manager session is open and heartbeating.
    Connected,
    /// Heartbeats stopped without a goodbye; its jobs followed the site-loss policy.
    Unreachable,
    /// No session open, on purpose (every manager said goodbye, or none connected yet):
    /// its jobs keep running and are reconciled when it is back.
    Disconnected,
    /// Its credential was revoked: it gets no work and cannot open a session.
    Revoked,
}

impl SiteHealth {
    /// The name stored in the database: the wire name without `SITE_HEALTH_`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Connected => "CONNECTED",
            Self::Unreachable => "UNREACHABLE",
            Self::Disconnected => "DISCONNECTED",
            Self::Revoked => "REVOKED",
        }
    }
}

impl fmt::Display for SiteHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SiteHealth {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        [
            Self::Connected,
            Self::Unreachable,
            Self::Disconnected,
            Self::Revoked,
        ]
        .into_iter()
        .find(|h| h.as_str() == raw)
        .ok_or_else(|| format!("unknown site health `{raw}`"))
    }
}

impl From<SiteHealth> for v1::SiteHealth {
    fn from(health: SiteHealth) -> Self {
        match health {
            SiteHealth::Connected => Self::Connected,
            SiteHealth::Unreachable => Self::Unreachable,
            SiteHealth::Disconnected => Self::Disconnected,
            SiteHealth::Revoked => Self::Revoked,
        }
    }
}

impl TryFrom<v1::SiteHealth> for SiteHealth {
    type Error = String;

    fn try_from(health: v1::SiteHealth) -> Result<Self, Self::Error> {
        Ok(match health {
            v1::SiteHealth::Connected => Self::Connected,
            v1::SiteHealth::Unreachable => Self::Unreachable,
            v1::SiteHealth::Disconnected => Self::Disconnected,
            v1::SiteHealth::Revoked => Self::Revoked,
            v1::SiteHealth::Unspecified => return Err("UNSPECIFIED is not a site health".into()),
        })
    }
}

/// A registered site as stored.
#[derive(Clone, PartialEq)]
pub struct SiteRecord {
    /// Assigned at registration.
    pub site_id: String,
    /// Unique among sites.
    pub name: String,
    /// Labels the admin set; they override the manager's.
    pub admin_labels: BTreeMap<String, String>,
    /// The latest capabilities advertised.
    pub capabilities: v1::Capabilities,
    /// How reachable it is.
    pub health: SiteHealth,
    /// The latest free capacity advertised.
    pub capacity: Option<v1::CapacityUpdate>,
    /// When it registered.
    pub registered_at: UnixMicros,
    /// Last word from any of its managers.
    pub last_seen_at: Option<UnixMicros>,
    /// When it first opened a session.
    pub first_session_at: Option<UnixMicros>,
    /// When it was revoked.
    pub revoked_at: Option<UnixMicros>,
    credential_hash: Vec<u8>,
}

impl fmt::Debug for SiteRecord {
    /// Everything but the credential hash.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SiteRecord")
            .field("site_id", &self.site_id)
            .field("name", &self.name)
            .field("health", &self.health)
            .field("admin_labels", &self.admin_labels)
            .finish_non_exhaustive()
    }
}

impl SiteRecord {
    /// The labels jobs are matched against: the manager's, overridden by the admin's.
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut labels: BTreeMap<String, String> = self
            .capabilities
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.extend(self.admin_labels.clone());
        labels
    }

    /// True when `credential` is this site's.
    pub fn credential_matches(&self, credential: &str) -> bool {
        crate::secret::matches(
            crate::secret::Purpose::SiteCredential,
            &self.credential_hash,
            credential,
        )
    }
}

/// A join token to store (the secret itself is never stored).
#[derive(Debug, Clone)]
pub struct NewJoinToken {
    /// Non-secret id.
    pub token_id: String,
    /// BLAKE3 of the token.
    pub hash: [u8; 32],
    /// Name the site will get; empty: the manager's suggestion.
    pub site_name: String,
    /// Labels set on the site.
    pub admin_labels: BTreeMap<String, String>,
    /// When it was made.
    pub created_at: UnixMicros,
    /// When it stops working if unused.
    pub expires_at: UnixMicros,
}

/// A manager's registration, checked at the door.
#[derive(Debug, Clone)]
pub struct Registration {
    /// BLAKE3 of the join token presented.
    pub token_hash: [u8; 32],
    /// The manager's id for this registration; empty: none (no replay possible).
    pub request_id: String,
    /// Name the manager suggests.
    pub suggested_name: String,
    /// What the site's backend can do.
    pub capabilities: v1::Capabilities,
    /// Id the new site gets.
    pub site_id: String,
    /// BLAKE3 of the credential the new site gets.
    pub credential_hash: [u8; 32],
}

/// What a registration did.
#[derive(Debug, Clone)]
pub struct Registered {
    /// The site, new or (for a replay) the one the first try made.
    pub site: SiteRecord,
    /// True for a replay: the same site, with the new credential replacing the one whose
    /// answer was lost.
    pub replayed: bool,
}

/// A place reserved at the hub broker for a job's inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRecord {
    /// Its id, handed to the client.
    pub upload_id: String,
    /// `uploads/<upload_id>` at the hub broker.
    pub hub_path: String,
    /// The job it is reserved for, if the client said.
    pub job_id: Option<String>,
    /// What the client expects to send, in bytes (0: unknown).
    pub expected_bytes: u64,
    /// When it was made.
    pub created_at: UnixMicros,
    /// Unused after this, it is forgotten.
    pub expires_at: UnixMicros,
    /// The job that took it.
    pub used_by_job: Option<String>,
}

const SITE_COLUMNS: &str = "site_id, name, credential_hash, admin_labels, capabilities, health, \
     capacity, registered_at, last_seen_at, first_session_at, revoked_at";

fn labels_to_json(labels: &BTreeMap<String, String>) -> String {
    serde_json::to_string(labels).unwrap_or_else(|_| "{}".into())
}

fn labels_from_json(raw: &str, what: &str) -> Result<BTreeMap<String, String>> {
    serde_json::from_str(raw).map_err(|e| Error::Corrupt(format!("{what}: labels: {e}")))
}

fn site_from_row(row: &AnyRow) -> Result<SiteRecord> {
    let site_id: String = row.try_get("site_id")?;
    let corrupt = |what: String| Error::Corrupt(format!("site `{site_id}`: {what}"));
    let capabilities =
        v1::Capabilities::decode(row.try_get::<Vec<u8>, _>("capabilities")?.as_slice())
            .map_err(|e| corrupt(format!("capabilities: {e}")))?;
    let capacity = row
        .try_get::<Option<Vec<u8>>, _>("capacity")?
        .map(|bytes| v1::CapacityUpdate::decode(bytes.as_slice()))
        .transpose()
        .map_err(|e| corrupt(format!("capacity: {e}")))?;
    let health = SiteHealth::from_str(&row.try_get::<String, _>("health")?).map_err(corrupt)?;
    let time = |name: &str| -> Result<Option<UnixMicros>> {
        Ok(row.try_get::<Option<i64>, _>(name)?.map(UnixMicros))
    };
    Ok(SiteRecord {
        name: row.try_get("name")?,
        admin_labels: labels_from_json(
            &row.try_get::<String, _>("admin_labels")?,
            &format!("site `{site_id}`"),
        )?,
        capabilities,
        health,
        capacity,
        registered_at: UnixMicros(row.try_get("registered_at")?),
        last_seen_at: time("last_seen_at")?,
        first_session_at: time("first_session_at")?,
        revoked_at: time("revoked_at")?,
        credential_hash: row.try_get("credential_hash")?,
        site_id,
    })
}

fn upload_from_row(row: &AnyRow) -> Result<UploadRecord> {
    Ok(UploadRecord {
        upload_id: row.try_get("upload_id")?,
        hub_path: row.try_get("hub_path")?,
        job_id: row.try_get("job_id")?,
        expected_bytes: to_u64(row.try_get("expected_bytes")?, "uploads.expected_bytes")?,
        created_at: UnixMicros(row.try_get("created_at")?),
        expires_at: UnixMicros(row.try_get("expires_at")?),
        used_by_job: row.try_get("used_by_job")?,
    })
}

async fn select_site(tx: &mut Tx, site_id: &str) -> Result<Option<SiteRecord>> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {SITE_COLUMNS} FROM sites WHERE site_id = $1"
    )))
    .bind(site_id.to_owned())
    .fetch_optional(&mut **tx)
    .await?;
    row.as_ref().map(site_from_row).transpose()
}

async fn name_taken(tx: &mut Tx, name: &str) -> Result<bool> {
    Ok(sqlx::query("SELECT 1 FROM sites WHERE name = $1")
        .bind(name.to_owned())
        .fetch_optional(&mut **tx)
        .await?
        .is_some())
}

/// `wanted`, or `wanted-2`, `wanted-3`, ... whichever no site has yet.
async fn free_name(tx: &mut Tx, wanted: &str, site_id: &str) -> Result<String> {
    if !name_taken(tx, wanted).await? {
        return Ok(wanted.to_owned());
    }
    for n in 2..50 {
        let candidate = format!("{wanted}-{n}");
        if !name_taken(tx, &candidate).await? {
            return Ok(candidate);
        }
    }
    Ok(format!("{wanted}-{site_id}"))
}

async fn try_register(
    tx: &mut Tx,
    registration: &Registration,
    now: UnixMicros,
) -> Result<Registered, TxError> {
    let token = sqlx::query(
        "SELECT token_id, site_name, admin_labels, expires_at, used_at, used_by_site, request_id \
         FROM join_tokens WHERE token_hash = $1",
    )
    .bind(registration.token_hash.to_vec())
    .fetch_optional(&mut **tx)
    .await?
    .ok_or_else(|| {
        Error::Unauthenticated(
            "unknown join token; ask an admin for a new one (`dispatch site token create`)".into(),
        )
    })?;
    let token_id: String = token.try_get("token_id")?;
    if token.try_get::<Option<i64>, _>("used_at")?.is_some() {
        let stored_request: Option<String> = token.try_get("request_id")?;
        let used_by: Option<String> = token.try_get("used_by_site")?;
        let same_request = !registration.request_id.is_empty()
            && stored_request.as_deref() == Some(registration.request_id.as_str());
        if let (true, Some(site_id)) = (same_request, used_by)
            && let Some(mut site) = select_site(tx, &site_id).await?
            && site.first_session_at.is_none()
            && site.revoked_at.is_none()
        {
            // The answer to the first try was lost (the site never used its credential):
            // the same site, with a fresh credential, since the first one is known only
            // as a hash.
            sqlx::query("UPDATE sites SET credential_hash = $1 WHERE site_id = $2")
                .bind(registration.credential_hash.to_vec())
                .bind(site_id.clone())
                .execute(&mut **tx)
                .await?;
            site.credential_hash = registration.credential_hash.to_vec();
            return Ok(Registered {
                site,
                replayed: true,
            });
        }
        return Err(Error::Unauthenticated(format!(
            "join token {token_id} was already used; ask an admin for a new one"
        ))
        .into());
    }
    if token.try_get::<i64, _>("expires_at")? <= now.0 {
        return Err(Error::Unauthenticated(format!(
            "join token {token_id} has expired; ask an admin for a new one"
        ))
        .into());
    }
    let claimed = sqlx::query(
        "UPDATE join_tokens SET used_at = $1, used_by_site = $2, request_id = $3 \
         WHERE token_id = $4 AND used_at IS NULL",
    )
    .bind(now.0)
    .bind(registration.site_id.clone())
    .bind(registration.request_id.clone())
    .bind(token_id.clone())
    .execute(&mut **tx)
    .await?;
    if claimed.rows_affected() != 1 {
        return Err(TxError::Conflict);
    }
    let token_name: String = token.try_get("site_name")?;
    let admin_labels = labels_from_json(
        &token.try_get::<String, _>("admin_labels")?,
        &format!("join token {token_id}"),
    )?;
    let wanted = [
        token_name.as_str(),
        registration.suggested_name.as_str(),
        registration.site_id.as_str(),
    ]
    .into_iter()
    .find(|name| !name.is_empty())
    .unwrap_or_default()
    .to_owned();
    let name = free_name(tx, &wanted, &registration.site_id).await?;
    let site = SiteRecord {
        site_id: registration.site_id.clone(),
        name,
        admin_labels,
        capabilities: registration.capabilities.clone(),
        health: SiteHealth::Disconnected,
        capacity: None,
        registered_at: now,
        last_seen_at: None,
        first_session_at: None,
        revoked_at: None,
        credential_hash: registration.credential_hash.to_vec(),
    };
    sqlx::query(
        "INSERT INTO sites (site_id, name, credential_hash, admin_labels, capabilities, health, \
         capacity, registered_at, last_seen_at, first_session_at, revoked_at, revoke_message) \
         VALUES ($1, $2, $3, $4, $5, $6, NULL, $7, NULL, NULL, NULL, NULL)",
    )
    .bind(site.site_id.clone())
    .bind(site.name.clone())
    .bind(site.credential_hash.clone())
    .bind(labels_to_json(&site.admin_labels))
    .bind(site.capabilities.encode_to_vec())
    .bind(site.health.as_str())
    .bind(now.0)
    .execute(&mut **tx)
    .await?;
    Ok(Registered {
        site,
        replayed: false,
    })
}

impl Store {
    /// Stores a new join token.
    pub async fn insert_join_token(&self, token: &NewJoinToken) -> Result<()> {
        sqlx::query(
            "INSERT INTO join_tokens (token_id, token_hash, site_name, admin_labels, created_at, \
             expires_at, used_at, used_by_site, request_id) \
             VALUES ($1, $2, $3, $4, $5, $6, NULL, NULL, NULL)",
        )
        .bind(token.token_id.clone())
        .bind(token.hash.to_vec())
        .bind(token.site_name.clone())
        .bind(labels_to_json(&token.admin_labels))
        .bind(token.created_at.0)
        .bind(token.expires_at.0)
        .execute(&self.inner.write)
        .await?;
        Ok(())
    }

    /// True when a site already has this name.
    pub async fn site_name_taken(&self, name: &str) -> Result<bool> {
        Ok(sqlx::query("SELECT 1 FROM sites WHERE name = $1")
            .bind(name.to_owned())
            .fetch_optional(&self.inner.read)
            .await?
            .is_some())
    }

    /// Trades a join token for a new site, in one transaction: the token is marked used
    /// and the site stored together. A used, expired or unknown token is refused
    /// (UNAUTHENTICATED), except a retry carrying the request id of the registration that
    /// used it, while the site has never opened a session: that gets the same site.
    pub async fn register_site(&self, registration: &Registration) -> Result<Registered> {
        for _ in 0..WRITE_ATTEMPTS {
            let mut tx = self.inner.write.begin().await?;
            match try_register(&mut tx, registration, UnixMicros::now()).await {
                Ok(registered) => {
                    tx.commit().await?;
                    return Ok(registered);
                }
                Err(TxError::Conflict) => continue,
                Err(TxError::Fail(error)) => return Err(error),
            }
        }
        Err(Error::Unavailable(
            "concurrent registrations kept conflicting; try again".into(),
        ))
    }

    /// One site.
    pub async fn site(&self, site_id: &str) -> Result<Option<SiteRecord>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {SITE_COLUMNS} FROM sites WHERE site_id = $1"
        )))
        .bind(site_id.to_owned())
        .fetch_optional(&self.inner.read)
        .await?;
        row.as_ref().map(site_from_row).transpose()
    }

    /// Every registered site, by name.
    pub async fn sites(&self) -> Result<Vec<SiteRecord>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {SITE_COLUMNS} FROM sites ORDER BY name"
        )))
        .fetch_all(&self.inner.read)
        .await?;
        rows.iter().map(site_from_row).collect()
    }

    /// A manager said hello: the site's capabilities, capacity and health as it says.
    pub async fn site_connected(
        &self,
        site_id: &str,
        capabilities: &v1::Capabilities,
        capacity: Option<&v1::CapacityUpdate>,
        now: UnixMicros,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE sites SET capabilities = $1, capacity = $2, health = $3, last_seen_at = $4, \
             first_session_at = COALESCE(first_session_at, $4) \
             WHERE site_id = $5 AND revoked_at IS NULL",
        )
        .bind(capabilities.encode_to_vec())
        .bind(capacity.map(prost::Message::encode_to_vec))
        .bind(SiteHealth::Connected.as_str())
        .bind(now.0)
        .bind(site_id.to_owned())
        .execute(&self.inner.write)
        .await?;
        Ok(())
    }

    /// Sets a site's health (never un-revoking one).
    pub async fn set_site_health(&self, site_id: &str, health: SiteHealth) -> Result<()> {
        sqlx::query("UPDATE sites SET health = $1 WHERE site_id = $2 AND revoked_at IS NULL")
            .bind(health.as_str())
            .bind(site_id.to_owned())
            .execute(&self.inner.write)
            .await?;
        Ok(())
    }

    /// Revokes a site's credential. Replayable: a revoked site is returned as it is.
    pub async fn revoke_site(&self, site_id: &str, message: &str) -> Result<SiteRecord> {
        sqlx::query(
            "UPDATE sites SET health = $1, revoked_at = $2, revoke_message = $3 \
             WHERE site_id = $4 AND revoked_at IS NULL",
        )
        .bind(SiteHealth::Revoked.as_str())
        .bind(UnixMicros::now().0)
        .bind(message.to_owned())
        .bind(site_id.to_owned())
        .execute(&self.inner.write)
        .await?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {SITE_COLUMNS} FROM sites WHERE site_id = $1"
        )))
        .bind(site_id.to_owned())
        .fetch_optional(&self.inner.write)
        .await?;
        row.as_ref()
            .map(site_from_row)
            .transpose()?
            .ok_or_else(|| Error::UnknownSite(site_id.to_owned()))
    }

    /// Writes when each site was last heard from and its latest capacity, in one
    /// transaction (the registry batches these rather than write every heartbeat).
    pub async fn record_site_liveness(
        &self,
        seen: &[(String, UnixMicros, Option<v1::CapacityUpdate>)],
    ) -> Result<()> {
        if seen.is_empty() {
            return Ok(());
        }
        let mut tx = self.inner.write.begin().await?;
        for (site_id, at, capacity) in seen {
            sqlx::query(
                "UPDATE sites SET last_seen_at = $1, capacity = COALESCE($2, capacity) \
                 WHERE site_id = $3",
            )
            .bind(at.0)
            .bind(capacity.as_ref().map(prost::Message::encode_to_vec))
            .bind(site_id.clone())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Jobs placed at each site and not yet terminal.
    pub async fn active_jobs_by_site(&self) -> Result<HashMap<String, u32>> {
        let rows = sqlx::query(
            "SELECT site_id, COUNT(*) AS n FROM jobs \
             WHERE state IN ('STAGING_IN', 'RUNNING', 'STAGING_OUT') AND site_id IS NOT NULL \
             GROUP BY site_id",
        )
        .fetch_all(&self.inner.read)
        .await?;
        rows.iter()
            .map(|row| {
                let n = to_u64(row.try_get("n")?, "count")?;
                Ok((
                    row.try_get::<String, _>("site_id")?,
                    u32::try_from(n).unwrap_or(u32::MAX),
                ))
            })
            .collect()
    }

    /// Stores a new upload reservation.
    pub async fn insert_upload(&self, upload: &UploadRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO uploads (upload_id, hub_path, job_id, expected_bytes, created_at, \
             expires_at, used_by_job, used_at) VALUES ($1, $2, $3, $4, $5, $6, NULL, NULL)",
        )
        .bind(upload.upload_id.clone())
        .bind(upload.hub_path.clone())
        .bind(upload.job_id.clone())
        .bind(to_i64(upload.expected_bytes))
        .bind(upload.created_at.0)
        .bind(upload.expires_at.0)
        .execute(&self.inner.write)
        .await?;
        Ok(())
    }

    /// One upload reservation.
    pub async fn upload(&self, upload_id: &str) -> Result<Option<UploadRecord>> {
        let row = sqlx::query(
            "SELECT upload_id, hub_path, job_id, expected_bytes, created_at, expires_at, \
             used_by_job FROM uploads WHERE upload_id = $1",
        )
        .bind(upload_id.to_owned())
        .fetch_optional(&self.inner.write)
        .await?;
        row.as_ref().map(upload_from_row).transpose()
    }

    /// Binds an upload to the job that uses it: it must exist, be unexpired (or already
    /// this job's), be reserved for no other job, and not be used by another. Replayable
    /// for the same job.
    pub async fn claim_upload(&self, upload_id: &str, job_id: &str) -> Result<UploadRecord> {
        let now = UnixMicros::now();
        let claimed = sqlx::query(
            "UPDATE uploads SET used_by_job = $1, used_at = $2 WHERE upload_id = $3 \
             AND (job_id IS NULL OR job_id = $1) \
             AND ((used_by_job IS NULL AND expires_at > $2) OR used_by_job = $1)",
        )
        .bind(job_id.to_owned())
        .bind(now.0)
        .bind(upload_id.to_owned())
        .execute(&self.inner.write)
        .await?;
        let upload = self.upload(upload_id).await?.ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "upload `{upload_id}` is not known (or expired unused and was forgotten); create another with CreateUpload"
            ))
        })?;
        if claimed.rows_affected() == 1 {
            return Ok(upload);
        }
        let why = match (&upload.job_id, &upload.used_by_job) {
            (Some(reserved), _) if reserved != job_id => {
                format!("it was created for job `{reserved}`")
            }
            (_, Some(user)) if user != job_id => format!("job `{user}` already uses it"),
            _ => "it expired before it was used".to_owned(),
        };
        Err(Error::FailedPrecondition(format!(
            "upload `{upload_id}` cannot be used by job `{job_id}`: {why}"
        )))
    }

    /// Uploads never used whose time ran out, at most `limit`.
    pub async fn expired_uploads(&self, now: UnixMicros, limit: i64) -> Result<Vec<UploadRecord>> {
        let rows = sqlx::query(
            "SELECT upload_id, hub_path, job_id, expected_bytes, created_at, expires_at, \
             used_by_job FROM uploads WHERE used_by_job IS NULL AND expires_at <= $1 \
             ORDER BY expires_at LIMIT $2",
        )
        .bind(now.0)
        .bind(limit)
        .fetch_all(&self.inner.read)
        .await?;
        rows.iter().map(upload_from_row).collect()
    }

    /// Forgets an upload that was never used (one taken by a job in between stays).
    pub async fn forget_upload(&self, upload_id: &str) -> Result<bool> {
        let removed =
            sqlx::query("DELETE FROM uploads WHERE upload_id = $1 AND used_by_job IS NULL")
                .bind(upload_id.to_owned())
                .execute(&self.inner.write)
                .await?;
        Ok(removed.rows_affected() == 1)
    }
}
