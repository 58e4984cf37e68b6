//! `deploy/kubernetes/` stays in step with the backend: the ConfigMap's `manager.toml` is
//! one the manager's config type and `KubernetesConfig` accept, and the Role grants the
//! verbs the backend uses.
//! (Checked as text: no cluster, and no YAML parser is worth a dependency here.)

use anyhow::{Context, Result, ensure};
use dispatch_backend_kubernetes::KubernetesConfig;

fn deploy_file(name: &str) -> Result<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/kubernetes/").to_owned() + name;
    std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))
}

/// The block under `key: |` in a ConfigMap, dedented.
fn block(yaml: &str, key: &str) -> Option<String> {
    let mut lines = yaml.lines().skip_while(|l| l.trim() != format!("{key}: |"));
    lines.next()?;
    let body: Vec<&str> = lines
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .collect();
    Some(
        body.iter()
            .map(|l| l.get(4..).unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

#[test]
fn the_configmaps_manager_config_is_accepted() -> Result<()> {
    let yaml = deploy_file("configmap.yaml")?;
    let text = block(&yaml, "manager.toml").context("no manager.toml in the ConfigMap")?;
    let manager: dispatch_manager::ManagerConfig = toml::from_str(&text).context("manager.toml")?;
    ensure!(
        manager.backend == "kubernetes",
        "backend {}",
        manager.backend
    );
    let config = KubernetesConfig::from_table(manager.kubernetes.clone())?;
    config.check()?;
    ensure!(config.pvc_name == "storebase");
    Ok(())
}

#[test]
fn the_role_grants_the_backends_verbs_and_no_more() -> Result<()> {
    let rbac = deploy_file("rbac.yaml")?;
    for rule in [
        "resources: [\"jobs\"]\n    verbs: [\"create\", \"get\", \"list\", \"patch\", \"delete\"]",
        "resources: [\"pods\"]\n    verbs: [\"get\", \"list\"]",
        "resources: [\"pods/log\"]\n    verbs: [\"get\"]",
    ] {
        ensure!(rbac.contains(rule), "rbac.yaml lacks {rule:?}");
    }
    ensure!(
        rbac.matches("verbs:").count() == 3,
        "rbac.yaml grants more rules"
    );
    let pvc = deploy_file("pvc.yaml")?;
    ensure!(pvc.contains("name: storebase"));
    Ok(())
}
