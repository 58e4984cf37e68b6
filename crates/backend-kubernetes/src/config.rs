//! The `[kubernetes]` table of the manager's configuration.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Settings of the kubernetes backend, read from the manager's `[kubernetes]` table.
///
/// ```toml
/// [kubernetes]
/// namespace = "chris-jobs"
/// pvc_name = "storebase"
/// pvc_store_path = ""
/// ttl_seconds_after_finished = 86400
/// active_deadline_seconds = 604800
/// node_selector = { "kubernetes.io/arch" = "amd64" }
/// tolerations = [{ key = "gpu", operator = "Exists", effect = "NoSchedule" }]
/// image_pull_secrets = ["regcred"]
/// shm_size_mib = 1024
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// Version of this table's layout.
    pub version: u32,
    /// The namespace jobs run in. `None`: the kubeconfig context's namespace, or the
    /// service account's own namespace in a pod.
    pub namespace: Option<String>,
    /// The API server's URL, for a cluster reached without a kubeconfig (e.g. through
    /// `kubectl proxy`, or a fake in tests). `None`: [`Self::kubeconfig`] if set, else
    /// `KUBECONFIG` / `~/.kube/config`, else the in-cluster service account (`kube`'s
    /// `Config::infer`).
    pub api_url: Option<String>,
    /// With `api_url`: a file holding a bearer token, re-read as it rotates.
    pub token_file: Option<PathBuf>,
    /// With `api_url`: the PEM file of the CA that signed the API server's certificate.
    pub ca_file: Option<PathBuf>,
    /// An explicit kubeconfig file (instead of `KUBECONFIG` / `~/.kube/config`).
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use; `None`: its current context.
    pub context: Option<String>,
    /// The PersistentVolumeClaim that holds storeBase; every job mounts it twice, with
    /// sub-paths (pman#227: one PVC for the whole site).
    pub pvc_name: String,
    /// Where the manager's `store_root` is inside that PVC, as a relative path (`""`: the
    /// PVC's root). A job's `key-<id>/incoming` sub-path is this path joined with the
    /// incoming directory's path relative to `store_root`.
    pub pvc_store_path: String,
    /// `ttlSecondsAfterFinished`: how long Kubernetes keeps a finished Job (and its pods,
    /// so its logs) before deleting it. `None`: kept until the manager removes it.
    pub ttl_seconds_after_finished: Option<i32>,
    /// `activeDeadlineSeconds`: the cluster's own backstop on a Job's run time (the
    /// manager enforces each job's `time_limit` itself). pfcon's is one week.
    pub active_deadline_seconds: Option<i64>,
    /// `terminationGracePeriodSeconds` of job pods: how long a killed job gets between
    /// SIGTERM and SIGKILL.
    pub termination_grace_seconds: i64,
    /// Node labels a job's node must have (pfcon's `NODE_SELECTOR`).
    pub node_selector: BTreeMap<String, String>,
    /// Taints a job's pods tolerate.
    pub tolerations: Vec<Toleration>,
    /// Secrets to pull images with (pfcon's `IMAGE_PULL_SECRETS`).
    pub image_pull_secrets: Vec<String>,
    /// `imagePullPolicy` of job containers: `Always`, `IfNotPresent` or `Never`; `None`:
    /// Kubernetes' default (`Always` for `:latest`, else `IfNotPresent`).
    pub image_pull_policy: Option<String>,
    /// Size of a memory-backed `/dev/shm`, in MiB (pfcon's `SHM_SIZE`); `None`: the
    /// runtime's default (64 MiB).
    pub shm_size_mib: Option<u64>,
    /// The service account job pods run as; `None`: the namespace's `default`. Its token
    /// is never mounted into job pods.
    pub service_account: Option<String>,
    /// OpenShift: jobs never set `runAsUser`/`runAsGroup`, even with a `container_user`,
    /// so the namespace's SCC assigns its arbitrary uid (restricted-v2 refuses others).
    pub openshift: bool,
    /// The extended resource GPUs are requested as.
    pub gpu_resource: String,
    /// How long `submit` watches a new Job's pod for an image that cannot be pulled
    /// (reported as "image not found") before returning it as queued.
    pub image_check_seconds: u64,
    /// What this site offers jobs at once (the namespace's quota, say), reported in the
    /// manager's capabilities: CPU in millicores.
    pub cpu_millicores: u32,
    /// ... memory in MiB.
    pub memory_mib: u64,
    /// ... GPUs.
    pub gpus: u32,
    /// Largest `workers` (parallel pods) one job may have.
    pub max_workers: u32,
}

/// One toleration of job pods, as in a pod spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Toleration {
    /// Taint key; empty with `Exists`: every taint.
    #[serde(default)]
    pub key: Option<String>,
    /// `Equal` (default) or `Exists`.
    #[serde(default)]
    pub operator: Option<String>,
    /// Taint value, with `Equal`.
    #[serde(default)]
    pub value: Option<String>,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`; empty: all.
    #[serde(default)]
    pub effect: Option<String>,
    /// With `NoExecute`: how long the pod stays after the taint appears.
    #[serde(default)]
    pub toleration_seconds: Option<i64>,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            version: 1,
            namespace: None,
            api_url: None,
            token_file: None,
            ca_file: None,
            kubeconfig: None,
            context: None,
            pvc_name: "storebase".into(),
            pvc_store_path: String::new(),
            ttl_seconds_after_finished: Some(86_400),
            active_deadline_seconds: Some(604_800),
            termination_grace_seconds: 10,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            image_pull_secrets: Vec::new(),
            image_pull_policy: None,
            shm_size_mib: None,
            service_account: None,
            openshift: false,
            gpu_resource: "nvidia.com/gpu".into(),
            image_check_seconds: 10,
            cpu_millicores: 16_000,
            memory_mib: 65_536,
            gpus: 0,
            max_workers: 16,
        }
    }
}

/// A setting that cannot work, named by its key.
#[derive(Debug, thiserror::Error)]
#[error("[kubernetes] {key}: {reason}")]
pub struct ConfigError {
    /// The key at fault.
    pub key: &'static str,
    /// Why.
    pub reason: String,
}

impl KubernetesConfig {
    /// Reads the manager's `[kubernetes]` table; unknown keys are refused.
    pub fn from_table(table: toml::Table) -> Result<Self, toml::de::Error> {
        table.try_into()
    }

    /// Checks what serde cannot: values Kubernetes would refuse later, per job.
    pub fn check(&self) -> Result<(), ConfigError> {
        let refuse = |key, reason: &str| {
            Err(ConfigError {
                key,
                reason: reason.to_owned(),
            })
        };
        if self.version != 1 {
            return refuse("version", "this build reads version 1");
        }
        if !crate::names::is_dns_label(&self.pvc_name) && !is_dns_subdomain(&self.pvc_name) {
            return refuse("pvc_name", "must be the name of a PersistentVolumeClaim");
        }
        if let Some(namespace) = &self.namespace
            && !crate::names::is_dns_label(namespace)
        {
            return refuse("namespace", "must be a DNS-1123 label");
        }
        if crate::spec::clean_relative(&self.pvc_store_path).is_none() {
            return refuse(
                "pvc_store_path",
                "must be a relative path inside the PVC, without `..`",
            );
        }
        if let Some(policy) = &self.image_pull_policy
            && !matches!(policy.as_str(), "Always" | "IfNotPresent" | "Never")
        {
            return refuse("image_pull_policy", "must be Always, IfNotPresent or Never");
        }
        if self.ttl_seconds_after_finished.is_some_and(|ttl| ttl < 0) {
            return refuse("ttl_seconds_after_finished", "cannot be negative");
        }
        if self.active_deadline_seconds.is_some_and(|s| s <= 0) {
            return refuse("active_deadline_seconds", "must be positive");
        }
        if self.termination_grace_seconds < 0 {
            return refuse("termination_grace_seconds", "cannot be negative");
        }
        if self.max_workers == 0 {
            return refuse("max_workers", "must be at least 1");
        }
        if self.api_url.is_some() && self.kubeconfig.is_some() {
            return refuse("api_url", "set api_url or kubeconfig, not both");
        }
        if self.api_url.is_none() && (self.token_file.is_some() || self.ca_file.is_some()) {
            return refuse("token_file", "token_file and ca_file go with api_url");
        }
        Ok(())
    }
}

fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(crate::names::is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_an_empty_table_and_are_pfcons() {
        let config = KubernetesConfig::from_table(toml::Table::new()).unwrap();
        assert_eq!(config, KubernetesConfig::default());
        assert_eq!(config.ttl_seconds_after_finished, Some(86_400));
        assert_eq!(config.active_deadline_seconds, Some(604_800));
        config.check().unwrap();
    }

    #[test]
    fn reads_every_field() {
        let table: toml::Table = toml::from_str(
            r#"
            version = 1
            namespace = "chris-jobs"
            api_url = "https://10.0.0.1:6443"
            token_file = "/var/run/token"
            ca_file = "/var/run/ca.crt"
            pvc_name = "store"
            pvc_store_path = "sites/a"
            ttl_seconds_after_finished = 60
            active_deadline_seconds = 3600
            termination_grace_seconds = 3
            node_selector = { "kubernetes.io/arch" = "amd64" }
            tolerations = [{ key = "gpu", operator = "Exists", effect = "NoSchedule" }]
            image_pull_secrets = ["regcred"]
            image_pull_policy = "Never"
            shm_size_mib = 512
            service_account = "chris-job"
            openshift = true
            gpu_resource = "amd.com/gpu"
            image_check_seconds = 3
            cpu_millicores = 4000
            memory_mib = 8192
            gpus = 2
            max_workers = 4
            "#,
        )
        .unwrap();
        let config = KubernetesConfig::from_table(table).unwrap();
        config.check().unwrap();
        assert_eq!(config.namespace.as_deref(), Some("chris-jobs"));
        assert_eq!(config.pvc_store_path, "sites/a");
        assert_eq!(config.tolerations[0].key.as_deref(), Some("gpu"));
        assert_eq!(config.tolerations[0].operator.as_deref(), Some("Exists"));
        assert_eq!(config.image_pull_secrets, ["regcred"]);
        assert!(config.openshift);
        assert_eq!(config.max_workers, 4);
    }

    #[test]
    fn refuses_unknown_keys_and_bad_values() {
        let unknown: toml::Table = toml::from_str("pvc = 'x'").unwrap();
        let error = KubernetesConfig::from_table(unknown)
            .unwrap_err()
            .to_string();
        assert!(error.contains("pvc"), "{error}");
        let bad_toleration: toml::Table = toml::from_str("tolerations = [{ kye = 'x' }]").unwrap();
        assert!(KubernetesConfig::from_table(bad_toleration).is_err());
        for (table, key) in [
            ("pvc_store_path = '../other'", "pvc_store_path"),
            ("pvc_store_path = '/abs'", "pvc_store_path"),
            ("namespace = 'Not_A_Label'", "namespace"),
            ("pvc_name = ''", "pvc_name"),
            ("image_pull_policy = 'sometimes'", "image_pull_policy"),
            ("max_workers = 0", "max_workers"),
            ("active_deadline_seconds = 0", "active_deadline_seconds"),
            ("token_file = '/t'", "token_file"),
            ("api_url = 'http://x'\nkubeconfig = '/k'", "api_url"),
            ("version = 2", "version"),
        ] {
            let table: toml::Table = toml::from_str(table).unwrap();
            let error = KubernetesConfig::from_table(table)
                .unwrap()
                .check()
                .unwrap_err();
            assert_eq!(error.key, key, "{error}");
        }
    }
}
