//! The scheduler: places queued jobs on connected sites.
//!
//! One owned loop. It wakes when nudged (a submission, a site's capacity changed, a job
//! came back to the queue) and at least every `scheduler.interval_millis`, and runs a
//! round: it takes the open site sessions with the free capacity each last advertised
//! (less the leases sent to it and not yet reflected in an advertisement), reads the
//! queue in order (highest priority first, then oldest), and gives each job to the best
//! session that can take it now. A job that fits nowhere now is passed over, not waited
//! for: a large job at the head of the queue does not hold back small ones behind it that
//! fit (backfill, as most batch schedulers do without reservations). The placements of a
//! round are committed in batches (one transaction each) before any lease is sent, so a
//! site never runs a job the store does not know it placed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use dispatch_proto::job::BackendKind;
use dispatch_proto::{JobSpec, v1};

use crate::config::CoordinatorConfig;
use crate::error::Result;
use crate::registry::Registry;
use crate::state::SiteRef;
use crate::store::{PlacementOrder, QueueKey, Store};

/// Queued jobs read in one query.
const QUEUE_PAGE: u32 = 500;

/// Wakes the scheduler. Cheap to clone.
#[derive(Clone, Default)]
pub struct Handle {
    notify: Arc<Notify>,
}

impl Handle {
    /// A handle for a scheduler not started yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks for a round soon (rounds asked for while one runs fold into one more).
    pub fn nudge(&self) {
        self.notify.notify_one();
    }
}

/// The backend kind a site advertises, if it is one this build knows.
pub fn backend_kind(capabilities: &v1::Capabilities) -> Option<BackendKind> {
    match capabilities.backend_kind() {
        v1::BackendKind::Unspecified => None,
        v1::BackendKind::Docker => Some(BackendKind::Docker),
        v1::BackendKind::Swarm => Some(BackendKind::Swarm),
        v1::BackendKind::Kubernetes => Some(BackendKind::Kubernetes),
        v1::BackendKind::Slurm => Some(BackendKind::Slurm),
        v1::BackendKind::Podman => Some(BackendKind::Podman),
        v1::BackendKind::Local => Some(BackendKind::Local),
    }
}

/// True when a site (id, kind, effective labels) is one the job's placement allows.
pub fn placement_admits(
    spec: &JobSpec,
    site_id: &str,
    kind: Option<BackendKind>,
    labels: &BTreeMap<String, String>,
) -> bool {
    let placement = spec.placement();
    placement.site_id().is_none_or(|id| id == site_id)
        && placement.backend_kind().is_none_or(|k| Some(k) == kind)
        && placement
            .site_labels()
            .iter()
            .all(|(key, value)| labels.get(key).map(String::as_str) == Some(value))
}

/// Why a site with these capabilities can never run the job, whatever its load: the
/// spec field at fault and the reason. `None` when it could.
pub fn never_fits(
    spec: &JobSpec,
    capabilities: &v1::Capabilities,
) -> Option<(&'static str, String)> {
    let largest = capabilities.max_per_job.unwrap_or_default();
    let max_workers = capabilities.max_workers.max(1);
    if spec.workers().get() > max_workers {
        return Some(("workers", format!("at most {max_workers} per job")));
    }
    if spec.cpu().0 > largest.cpu_millicores {
        return Some((
            "cpu_millicores",
            format!("at most {} millicores per job", largest.cpu_millicores),
        ));
    }
    if spec.memory().0 > largest.memory_mib {
        return Some((
            "memory_mib",
            format!("at most {} MiB per job", largest.memory_mib),
        ));
    }
    if spec.gpus() > largest.gpus {
        return Some(("gpus", format!("at most {} GPUs per job", largest.gpus)));
    }
    let mode = v1::StorageMode::from(spec.storage_mode()) as i32;
    if !capabilities.storage_modes.contains(&mode) {
        return Some((
            "storage_mode",
            format!("does not serve {}", spec.storage_mode().as_pfcon_str()),
        ));
    }
    let max_time = capabilities.max_time_limit_seconds;
    if max_time > 0
        && let Some(limit) = spec.time_limit()
        && limit > Duration::from_secs(u64::from(max_time))
    {
        return Some(("time_limit_seconds", format!("allows at most {max_time} s")));
    }
    None
}

/// An open site session the scheduler may give work to, with what it can take now.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The site.
    pub site_id: String,
    /// The session (registry key).
    pub session: u64,
    /// The manager replica behind the session.
    pub manager_id: String,
    /// The site's backend kind.
    pub kind: Option<BackendKind>,
    /// The site's effective labels.
    pub labels: BTreeMap<String, String>,
    /// What the manager advertised it can run.
    pub capabilities: v1::Capabilities,
    /// Free resources now: advertised, less the leases not yet reflected.
    pub free: v1::Resources,
    /// Free job slots, when the manager limits its jobs.
    pub slots: Option<u32>,
}

impl Candidate {
    fn has_room_for(&self, spec: &JobSpec) -> bool {
        self.slots.is_none_or(|n| n > 0)
            && spec.cpu().0 <= self.free.cpu_millicores
            && spec.memory().0 <= self.free.memory_mib
            && spec.gpus() <= self.free.gpus
    }

    fn take(&mut self, spec: &JobSpec) {
        self.free.cpu_millicores -= spec.cpu().0;
        self.free.memory_mib -= spec.memory().0;
        self.free.gpus -= spec.gpus();
        if let Some(slots) = self.slots.as_mut() {
            *slots -= 1;
        }
    }

    fn is_full(&self) -> bool {
        self.slots == Some(0) || self.free.cpu_millicores == 0 || self.free.memory_mib == 0
    }
}

/// The best candidate for a job among those that can run it now: the one left with the
/// most free CPU (then memory), spreading work over sites; ties go to the lowest site id,
/// so a round is reproducible. `excluded` sites declined the job as unsupported.
pub fn choose(spec: &JobSpec, candidates: &[Candidate], excluded: &[String]) -> Option<usize> {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| !excluded.contains(&c.site_id))
        .filter(|(_, c)| placement_admits(spec, &c.site_id, c.kind, &c.labels))
        .filter(|(_, c)| never_fits(spec, &c.capabilities).is_none())
        .filter(|(_, c)| c.has_room_for(spec))
        .max_by(|(_, a), (_, b)| {
            let left = |c: &Candidate| {
                (
                    c.free.cpu_millicores - spec.cpu().0,
                    c.free.memory_mib - spec.memory().0,
                )
            };
            left(a)
                .cmp(&left(b))
                .then_with(|| b.site_id.cmp(&a.site_id))
                .then_with(|| b.session.cmp(&a.session))
        })
        .map(|(index, _)| index)
}

/// The scheduler's loop.
pub struct Scheduler {
    store: Store,
    registry: Registry,
    config: Arc<CoordinatorConfig>,
    handle: Handle,
    stop: CancellationToken,
}

impl Scheduler {
    /// A scheduler over `store` and `registry`, woken through `handle`, until `stop`.
    pub fn new(
        store: Store,
        registry: Registry,
        config: Arc<CoordinatorConfig>,
        handle: Handle,
        stop: CancellationToken,
    ) -> Self {
        Self {
            store,
            registry,
            config,
            handle,
            stop,
        }
    }

    /// Runs rounds until stopped.
    pub async fn run(self) {
        let interval = Duration::from_millis(self.config.scheduler.interval_millis.max(10));
        loop {
            let more = match self.round().await {
                Ok(more) => more,
                Err(error) => {
                    tracing::warn!(%error, "scheduling round failed; trying again");
                    false
                }
            };
            if more {
                // A full batch was placed: there may be more that fits; go on at once,
                // yielding so other tasks run.
                tokio::task::yield_now().await;
                if self.stop.is_cancelled() {
                    break;
                }
                continue;
            }
            tokio::select! {
                () = self.handle.notify.notified() => {}
                () = tokio::time::sleep(interval) => {}
                () = self.stop.cancelled() => break,
            }
        }
        tracing::debug!("scheduler stopped");
    }

    /// One round; true when a whole batch was placed (more may fit).
    async fn round(&self) -> Result<bool> {
        let mut candidates = self.registry.candidates();
        if candidates.is_empty() {
            return Ok(false);
        }
        let batch = self.config.scheduler.batch as usize;
        let scan_limit = self.config.scheduler.scan_limit as usize;
        let mut chosen = Vec::new();
        let mut scanned = 0;
        let mut after: Option<QueueKey> = None;
        'pages: loop {
            let page = self.store.queued_jobs(after.as_ref(), QUEUE_PAGE).await?;
            let Some(last) = page.last() else {
                break;
            };
            after = Some(last.key().clone());
            let full_page = page.len() == QUEUE_PAGE as usize;
            for job in page {
                scanned += 1;
                let excluded = self.registry.declined_by(job.job_id.as_str());
                if let Some(index) = choose(&job.spec, &candidates, &excluded) {
                    candidates[index].take(&job.spec);
                    chosen.push((job, index));
                    if chosen.len() >= batch {
                        break 'pages;
                    }
                }
                if scanned >= scan_limit || candidates.iter().all(Candidate::is_full) {
                    break 'pages;
                }
            }
            if !full_page {
                break;
            }
        }
        if chosen.is_empty() {
            return Ok(false);
        }
        let orders: Vec<PlacementOrder> = chosen
            .iter()
            .map(|(job, index)| PlacementOrder {
                job_id: job.job_id.clone(),
                attempt: job.attempt,
                site: SiteRef {
                    site_id: candidates[*index].site_id.clone(),
                    manager_id: candidates[*index].manager_id.clone(),
                },
            })
            .collect();
        let placed = self.store.place(&orders).await?;
        let full = chosen.len() >= batch;
        for job in placed {
            let Some((_, index)) = chosen.iter().find(|(q, _)| q.job_id == job.job_id) else {
                continue;
            };
            let candidate = &candidates[*index];
            self.registry
                .lease(candidate.site_id.as_str(), candidate.session, &job)
                .await;
        }
        Ok(full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn spec(cpu: u32, memory: u64, placement: Option<v1::Placement>) -> JobSpec {
        JobSpec::try_from(v1::JobSpec {
            job_id: "j".into(),
            image: "img:1".into(),
            entrypoint: vec!["run".into()],
            plugin_type: v1::PluginType::Fs.into(),
            cpu_millicores: cpu,
            memory_mib: memory,
            workers: 1,
            storage_mode: v1::StorageMode::Zipfile.into(),
            placement,
            ..v1::JobSpec::default()
        })
        .expect("valid")
    }

    fn candidate(site: &str, cpu: u32, memory: u64, labels: &[(&str, &str)]) -> Candidate {
        Candidate {
            site_id: site.into(),
            session: 1,
            manager_id: format!("{site}-m"),
            kind: Some(BackendKind::Local),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            capabilities: v1::Capabilities {
                backend_kind: v1::BackendKind::Local.into(),
                max_per_job: Some(v1::Resources {
                    cpu_millicores: cpu,
                    memory_mib: memory,
                    gpus: 0,
                }),
                storage_modes: vec![v1::StorageMode::Zipfile.into()],
                max_workers: 1,
                ..v1::Capabilities::default()
            },
            free: v1::Resources {
                cpu_millicores: cpu,
                memory_mib: memory,
                gpus: 0,
            },
            slots: None,
        }
    }

    #[test]
    fn jobs_go_where_they_fit_and_are_allowed() {
        let sites = [
            candidate("small", 1000, 1024, &[("region", "eu")]),
            candidate("big", 8000, 16384, &[("region", "us")]),
        ];
        assert_eq!(
            choose(&spec(500, 100, None), &sites, &[]),
            Some(1),
            "spread: most free"
        );
        assert_eq!(
            choose(&spec(4000, 100, None), &sites, &[]),
            Some(1),
            "only big fits"
        );
        assert_eq!(
            choose(&spec(9000, 100, None), &sites, &[]),
            None,
            "nothing fits"
        );
        let eu = v1::Placement {
            site_labels: HashMap::from([("region".into(), "eu".into())]),
            ..v1::Placement::default()
        };
        assert_eq!(
            choose(&spec(500, 100, Some(eu.clone())), &sites, &[]),
            Some(0)
        );
        assert_eq!(choose(&spec(2000, 100, Some(eu)), &sites, &[]), None);
        let pinned = v1::Placement {
            site_id: "small".into(),
            ..v1::Placement::default()
        };
        assert_eq!(choose(&spec(100, 100, Some(pinned)), &sites, &[]), Some(0));
        assert_eq!(
            choose(&spec(100, 100, None), &sites, &["big".to_owned()]),
            Some(0),
            "a site that declined the job as unsupported is skipped"
        );
        let docker = v1::Placement {
            backend_kind: v1::BackendKind::Docker.into(),
            ..v1::Placement::default()
        };
        assert_eq!(choose(&spec(100, 100, Some(docker)), &sites, &[]), None);
    }

    #[test]
    fn free_capacity_and_slots_are_never_exceeded() {
        let mut sites = [candidate("one", 1000, 1000, &[])];
        sites[0].slots = Some(2);
        let job = spec(400, 100, None);
        let mut placed = 0;
        while let Some(index) = choose(&job, &sites, &[]) {
            sites[index].take(&job);
            placed += 1;
        }
        assert_eq!(placed, 2, "two slots");
        sites[0].slots = None;
        sites[0].free.cpu_millicores = 1000;
        let mut placed = 0;
        while let Some(index) = choose(&job, &sites, &[]) {
            sites[index].take(&job);
            placed += 1;
        }
        assert_eq!(placed, 2, "1000 millicores hold two jobs of 400");
        assert_eq!(sites[0].free.cpu_millicores, 200);
    }

    #[test]
    fn never_fits_names_the_field() {
        let site = candidate("one", 1000, 1000, &[]);
        assert_eq!(
            never_fits(&spec(1000, 1000, None), &site.capabilities),
            None
        );
        assert_eq!(
            never_fits(&spec(2000, 10, None), &site.capabilities).map(|(f, _)| f),
            Some("cpu_millicores")
        );
        assert_eq!(
            never_fits(&spec(10, 2000, None), &site.capabilities).map(|(f, _)| f),
            Some("memory_mib")
        );
    }
}
