//! A [`JobRequest`] as an `sbatch` command line and a batch script: pure, so every setting
//! is checked by unit tests without a cluster.
//!
//! The script runs the plugin through the configured runtime with the same mounts and
//! command as every backend (`/share/incoming` read-only, `/share/outgoing` read-write),
//! then writes the plugin's exit code to the job's `exit` file (and `oom` when the runtime
//! says its container was OOM-killed), so the end is known even once Slurm has forgotten
//! the job. Slurm stops a job (cancel, time limit) with SIGTERM, then SIGKILL after
//! `KillWait`: a Docker or Podman container is not a child of the script, so the script
//! traps SIGTERM and kills its container itself.

use std::path::Path;
use std::time::Duration;

use dispatch_manager::BackendError;
use dispatch_manager::backend::{INCOMING_MOUNT, JobRequest, OUTGOING_MOUNT, labels};

use crate::config::{Runtime, SlurmConfig};

/// The batch script, in the job's directory.
pub(crate) const SCRIPT_FILE: &str = "job.sh";
/// The job's output (stdout and stderr interleaved), written by Slurm on the node.
pub(crate) const OUTPUT_FILE: &str = "output.log";
/// The plugin's exit code, written by the script when the plugin ends.
pub(crate) const EXIT_FILE: &str = "exit";
/// Present when the runtime reported an OOM kill of the container.
pub(crate) const OOM_FILE: &str = "oom";
/// The job's environment for Docker and Podman (`--env-file`), mode 0600: values kept off
/// command lines, which any user of a shared node may read with `ps`.
pub(crate) const ENV_FILE: &str = "env";

/// The job's environment, each name once (a later duplicate wins, in its place).
fn dedup_env(env: &[(String, String)]) -> Vec<(&str, &str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for (key, value) in env {
        out.retain(|(k, _)| *k != key.as_str());
        out.push((key.as_str(), value.as_str()));
    }
    out
}

/// The `--env-file` of a Docker or Podman job: `KEY=VALUE` lines, taken literally. A value
/// with a line break cannot be written there and goes on the command line instead.
pub(crate) fn env_file(job: &JobRequest, config: &SlurmConfig) -> Option<String> {
    if !config.runtime.is_daemon() {
        return None;
    }
    let lines: String = dedup_env(&job.env)
        .into_iter()
        .filter(|(_, value)| !value.contains(['\n', '\r']))
        .map(|(key, value)| format!("{key}={value}\n"))
        .collect();
    (!lines.is_empty()).then_some(lines)
}

/// A name a shell can export.
fn is_shell_name(key: &str) -> bool {
    key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The `PATH` a job run without a container starts with (a job's own `PATH` replaces it).
pub(crate) const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The Slurm comment that marks a job as this manager's: `chris-dispatch:<manager>:<job>`.
pub(crate) fn comment(manager_id: &str, job_id: &str) -> String {
    format!("{}{job_id}", comment_prefix(manager_id))
}

/// What every comment of this manager's jobs starts with.
pub(crate) fn comment_prefix(manager_id: &str) -> String {
    format!("{}:{manager_id}:", labels::MANAGED_BY_VALUE)
}

/// Whole CPUs for `--cpus-per-task`: Slurm allocates no fraction of one.
pub(crate) fn cpus_per_task(millicores: u32) -> u32 {
    millicores.div_ceil(1000).max(1)
}

/// `--time` in whole minutes (Slurm's unit), rounded up. The manager stops the job at the
/// exact limit itself; Slurm's is the backstop that holds while no manager runs.
pub(crate) fn time_minutes(limit: Duration) -> u64 {
    limit.as_secs().div_ceil(60).max(1)
}

/// The `sbatch` arguments (before the script's path).
pub(crate) fn sbatch_args(
    job: &JobRequest,
    config: &SlurmConfig,
    manager_id: &str,
    dir: &Path,
) -> Vec<String> {
    let output = dir.join(OUTPUT_FILE).display().to_string();
    let mut args = vec![
        "--parsable".to_owned(),
        format!("--job-name={}", job.job_id),
        format!("--comment={}", comment(manager_id, job.job_id.as_str())),
        format!("--chdir={}", dir.display()),
        format!("--output={output}"),
        format!("--error={output}"),
        "--nodes=1".to_owned(),
        "--ntasks=1".to_owned(),
        format!("--cpus-per-task={}", cpus_per_task(job.cpu.0)),
        format!(
            "--mem={}M",
            job.memory.0.saturating_add(config.memory_overhead_mib())
        ),
        // A node failure must not silently run the plugin a second time.
        "--no-requeue".to_owned(),
    ];
    if job.gpus > 0 {
        args.push(format!("--gres=gpu:{}", job.gpus));
    }
    if let Some(limit) = job.time_limit {
        args.push(format!("--time={}", time_minutes(limit)));
    }
    for (flag, value) in [
        ("--partition", &config.partition),
        ("--account", &config.account),
        ("--qos", &config.qos),
    ] {
        if let Some(value) = value {
            args.push(format!("{flag}={value}"));
        }
    }
    args.extend(config.extra_sbatch_args.iter().cloned());
    args
}

/// `text` as one word for `/bin/sh`.
pub(crate) fn quote(text: &str) -> String {
    let safe = !text.is_empty()
        && text.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/' | ':' | '=' | '@' | ',')
        });
    if safe {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

fn quote_all<'a>(words: impl IntoIterator<Item = &'a str>) -> String {
    words.into_iter().map(quote).collect::<Vec<_>>().join(" ")
}

/// Checks what only this backend cannot do.
pub(crate) fn check_request(job: &JobRequest, config: &SlurmConfig) -> Result<(), BackendError> {
    if job.workers != 1 {
        return Err(BackendError::Unsupported {
            field: "workers",
            reason: format!(
                "Compute environment only supports number_of_workers=1, got number_of_workers={}",
                job.workers
            ),
        });
    }
    if job.command.is_empty() {
        return Err(BackendError::Unsupported {
            field: "command",
            reason: "cannot be empty".into(),
        });
    }
    if config.runtime.is_daemon() {
        // `--mount` takes comma-separated fields.
        let paths = job.incoming.iter().chain(std::iter::once(&job.outgoing));
        for path in paths {
            if path.to_string_lossy().contains([',', '"']) {
                return Err(BackendError::Unsupported {
                    field: "store_root",
                    reason: format!(
                        "{} cannot be mounted by {}: it holds a comma or a quote",
                        path.display(),
                        config.runtime.name()
                    ),
                });
            }
        }
    }
    Ok(())
}

/// The batch script for `job`, run by Slurm in the job's directory `dir`. `euid`: the
/// user the script will run as (the manager's), for jobs without a container.
pub(crate) fn batch_script(
    job: &JobRequest,
    config: &SlurmConfig,
    manager_id: &str,
    dir: &Path,
    euid: u32,
) -> Result<String, BackendError> {
    let mut s = String::new();
    s.push_str("#!/bin/sh\n");
    s.push_str(&format!(
        "# chris-dispatch: job {} of manager {manager_id}, written by the Slurm backend.\n",
        job.job_id
    ));
    s.push_str(&format!("dir={}\n", quote(&dir.display().to_string())));
    let run = match config.runtime {
        Runtime::Docker | Runtime::Podman => daemon_run(job, config, dir),
        Runtime::Apptainer | Runtime::Singularity => apptainer_run(job, config, euid)?,
        Runtime::None => direct_run(job, euid)?,
    };
    s.push_str(&run);
    s.push_str(concat!(
        "printf '%s\\n' \"$code\" > \"$dir/exit.tmp\" && mv -f \"$dir/exit.tmp\" \"$dir/exit\"\n",
        "exit \"$code\"\n",
    ));
    Ok(s)
}

/// Runs `command` in the background and waits for it; a trapped signal interrupts `wait`,
/// so it waits again until the command has really ended.
fn background_and_wait(command: &str, on_term: &str) -> String {
    format!(
        "trap '{on_term}' TERM INT HUP\n\
         {command} </dev/null &\n\
         child=$!\n\
         wait \"$child\"; code=$?\n\
         while kill -0 \"$child\" 2>/dev/null; do wait \"$child\"; code=$?; done\n"
    )
}

fn daemon_run(job: &JobRequest, config: &SlurmConfig, dir: &Path) -> String {
    let program = config.runtime_program().unwrap_or_default();
    let mut args: Vec<String> = Vec::new();
    for (key, value) in &job.labels {
        args.push("--label".into());
        args.push(format!("{key}={value}"));
    }
    args.extend(["--network".into(), config.network.clone()]);
    args.extend([
        "--cpus".into(),
        format!("{}.{:03}", job.cpu.0 / 1000, job.cpu.0 % 1000),
    ]);
    args.extend(["--memory".into(), format!("{}m", job.memory.0)]);
    args.extend(["--memory-swap".into(), format!("{}m", job.memory.0)]);
    args.extend(["--cap-drop".into(), "ALL".into()]);
    args.extend(["--security-opt".into(), "no-new-privileges".into()]);
    if let Some(user) = job.user {
        args.extend(["--user".into(), format!("{}:{}", user.uid, user.gid)]);
    }
    if let Some(incoming) = &job.incoming {
        args.push("--mount".into());
        args.push(format!(
            "type=bind,source={},target={INCOMING_MOUNT},readonly",
            incoming.display()
        ));
    }
    args.push("--mount".into());
    args.push(format!(
        "type=bind,source={},target={OUTGOING_MOUNT}",
        job.outgoing.display()
    ));
    if env_file(job, config).is_some() {
        args.extend([
            "--env-file".into(),
            dir.join(ENV_FILE).display().to_string(),
        ]);
    }
    for (key, value) in dedup_env(&job.env) {
        if value.contains(['\n', '\r']) {
            args.extend(["--env".into(), format!("{key}={value}")]);
        }
    }
    args.extend(config.runtime_args.iter().cloned());
    let (entrypoint, rest) = job
        .command
        .split_first()
        .map_or(("", &[][..]), |(f, r)| (f.as_str(), r));
    args.extend(["--entrypoint".into(), entrypoint.to_owned()]);
    args.push(job.image.clone());
    args.extend(rest.iter().cloned());

    let program = quote(&program);
    // Named after the Slurm job: unique on the cluster, and a container left by an earlier
    // attempt of the same job id is never in the way.
    let mut command = format!(
        "{program} run --name \"$name\" {}",
        quote_all(args.iter().map(String::as_str))
    );
    if job.gpus > 0 {
        // The GPUs Slurm allocated to the job.
        command = command.replacen(
            " run --name",
            " run --gpus \"device=${CUDA_VISIBLE_DEVICES:-none}\" --name",
            1,
        );
    }
    let mut s = format!(
        "name=chris-dispatch-slurm-\"$SLURM_JOB_ID\"\n{program} rm -f \"$name\" >/dev/null 2>&1\n"
    );
    s.push_str(&background_and_wait(
        &command,
        &format!(
            "{} kill \"$name\" >/dev/null 2>&1",
            program.replace('\'', r"'\''")
        ),
    ));
    s.push_str(&format!(
        "if [ \"$({program} inspect --format '{{{{.State.OOMKilled}}}}' \"$name\" 2>/dev/null)\" = true ]; then : > \"$dir/oom\"; fi\n\
         {program} rm -f \"$name\" >/dev/null 2>&1\n"
    ));
    s
}

fn apptainer_run(
    job: &JobRequest,
    config: &SlurmConfig,
    euid: u32,
) -> Result<String, BackendError> {
    check_own_user(job, euid, config.runtime)?;
    let program = config.runtime_program().unwrap_or_default();
    let mut args: Vec<String> = vec![
        "exec".into(),
        "--containall".into(),
        "--cleanenv".into(),
        "--no-home".into(),
        "--pwd".into(),
        OUTGOING_MOUNT.into(),
    ];
    if let Some(incoming) = &job.incoming {
        args.extend([
            "--bind".into(),
            format!("{}:{INCOMING_MOUNT}:ro", incoming.display()),
        ]);
    }
    args.extend([
        "--bind".into(),
        format!("{}:{OUTGOING_MOUNT}", job.outgoing.display()),
    ]);
    // Through the environment of the runtime's own process (APPTAINERENV_*), not its
    // command line; a name no shell can export goes on the command line.
    let prefix = match config.runtime {
        Runtime::Singularity => "SINGULARITYENV_",
        _ => "APPTAINERENV_",
    };
    let mut exports = String::new();
    for (key, value) in dedup_env(&job.env) {
        if is_shell_name(key) {
            exports.push_str(&format!("export {prefix}{key}={}\n", quote(value)));
        } else {
            args.extend(["--env".into(), format!("{key}={value}")]);
        }
    }
    if job.gpus > 0 {
        args.push("--nv".into());
    }
    args.extend(config.runtime_args.iter().cloned());
    args.push(apptainer_image(&job.image, config));
    args.extend(job.command.iter().cloned());
    let command = format!(
        "{} {}",
        quote(&program),
        quote_all(args.iter().map(String::as_str))
    );
    // Apptainer runs inside the job: Slurm's own signals reach it.
    Ok(format!(
        "{exports}{}",
        background_and_wait(&command, "kill -TERM \"$child\" 2>/dev/null")
    ))
}

/// The image as Apptainer takes it: a path as is, anything else behind the prefix.
pub(crate) fn apptainer_image(image: &str, config: &SlurmConfig) -> String {
    if image.starts_with('/') || image.starts_with("./") || image.contains("://") {
        image.to_owned()
    } else {
        format!("{}{image}", config.apptainer_image_prefix)
    }
}

/// Without a daemon the job runs as the user Slurm runs it as: the manager's.
fn check_own_user(job: &JobRequest, euid: u32, runtime: Runtime) -> Result<(), BackendError> {
    match job.user {
        Some(user) if user.uid != euid && euid != 0 => Err(BackendError::Unsupported {
            field: "container_user",
            reason: format!(
                "runtime `{}` runs jobs as the manager's own user (uid {euid}) and cannot \
                 switch to {}:{}; unset container_user",
                runtime.name(),
                user.uid,
                user.gid
            ),
        }),
        _ => Ok(()),
    }
}

/// `arg` with a leading `/share/incoming` or `/share/outgoing` replaced by the job's own
/// directory (no containers: there is nothing mounted there).
fn map_path(arg: &str, job: &JobRequest) -> String {
    let mappings = [
        (INCOMING_MOUNT, job.incoming.as_deref()),
        (OUTGOING_MOUNT, Some(job.outgoing.as_path())),
    ];
    for (mount, host) in mappings {
        let Some(host) = host else { continue };
        if arg == mount {
            return host.display().to_string();
        }
        if let Some(rest) = arg.strip_prefix(mount)
            && rest.starts_with('/')
        {
            return format!("{}{rest}", host.display());
        }
    }
    arg.to_owned()
}

fn direct_run(job: &JobRequest, euid: u32) -> Result<String, BackendError> {
    check_own_user(job, euid, Runtime::None)?;
    let mut words: Vec<String> = Vec::new();
    if let Some(user) = job.user.filter(|user| user.uid != euid) {
        // Only root gets here (check_own_user).
        words.extend([
            "setpriv".into(),
            format!("--reuid={}", user.uid),
            format!("--regid={}", user.gid),
            "--clear-groups".into(),
            "--".into(),
        ]);
    }
    // A clean environment: nothing of the node's or the manager's leaks in.
    words.extend(["env".into(), "-i".into(), format!("PATH={DEFAULT_PATH}")]);
    words.extend(job.env.iter().map(|(key, value)| format!("{key}={value}")));
    words.extend(job.command.iter().map(|arg| map_path(arg, job)));
    let command = format!(
        "cd {} && {}",
        quote(&job.outgoing.display().to_string()),
        quote_all(words.iter().map(String::as_str))
    );
    // `cd` runs in the background subshell with the command: one child to wait for.
    Ok(background_and_wait(
        &format!("( {command} )"),
        "kill -TERM \"$child\" 2>/dev/null",
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use dispatch_manager::backend::UserId;
    use dispatch_proto::job::{CpuMillis, JobId, MemoryMib};

    use super::*;

    fn request() -> JobRequest {
        JobRequest {
            job_id: JobId::parse("chris-jid-42").unwrap(),
            image: "fnndsc/pl-simpledsapp:2.1.0".into(),
            command: vec![
                "simpledsapp".into(),
                "--prefix".into(),
                "it's".into(),
                INCOMING_MOUNT.into(),
                format!("{OUTGOING_MOUNT}/sub"),
            ],
            env: vec![("A".into(), "1 2".into())],
            cpu: CpuMillis(1500),
            memory: MemoryMib(300),
            gpus: 0,
            workers: 1,
            time_limit: Some(Duration::from_secs(61)),
            incoming: Some(PathBuf::from("/store/key-chris-jid-42/incoming")),
            outgoing: PathBuf::from("/store/key-chris-jid-42/outgoing"),
            user: Some(UserId {
                uid: 1001,
                gid: 1002,
            }),
            labels: BTreeMap::from([(labels::JOB_ID.into(), "chris-jid-42".into())]),
        }
    }

    #[test]
    fn resources_map_to_sbatch_flags() {
        let config = SlurmConfig {
            partition: Some("short".into()),
            account: Some("chris".into()),
            qos: Some("high".into()),
            extra_sbatch_args: vec!["--constraint=avx2".into()],
            ..SlurmConfig::default()
        };
        let mut job = request();
        job.gpus = 2;
        let args = sbatch_args(&job, &config, "m1", Path::new("/jobs/chris-jid-42"));
        for expected in [
            "--parsable",
            "--job-name=chris-jid-42",
            "--comment=chris-dispatch:m1:chris-jid-42",
            "--chdir=/jobs/chris-jid-42",
            "--output=/jobs/chris-jid-42/output.log",
            "--error=/jobs/chris-jid-42/output.log",
            "--cpus-per-task=2",
            "--mem=364M",
            "--gres=gpu:2",
            "--time=2",
            "--partition=short",
            "--account=chris",
            "--qos=high",
            "--constraint=avx2",
            "--no-requeue",
        ] {
            assert!(
                args.iter().any(|a| a == expected),
                "{expected} not in {args:?}"
            );
        }
        job.gpus = 0;
        job.time_limit = None;
        let args = sbatch_args(
            &job,
            &SlurmConfig {
                runtime: Runtime::None,
                ..SlurmConfig::default()
            },
            "m1",
            Path::new("/j"),
        );
        assert!(args.iter().any(|a| a == "--mem=300M"), "{args:?}");
        assert!(!args.iter().any(|a| a.starts_with("--gres")
            || a.starts_with("--time")
            || a.starts_with("--partition")));
    }

    #[test]
    fn cpus_round_up_and_time_is_in_minutes() {
        assert_eq!(cpus_per_task(1), 1);
        assert_eq!(cpus_per_task(1000), 1);
        assert_eq!(cpus_per_task(1001), 2);
        assert_eq!(cpus_per_task(0), 1);
        assert_eq!(time_minutes(Duration::from_secs(1)), 1);
        assert_eq!(time_minutes(Duration::from_secs(60)), 1);
        assert_eq!(time_minutes(Duration::from_secs(61)), 2);
    }

    #[test]
    fn quoting_keeps_every_word_whole() {
        assert_eq!(quote("plain/path-1.2:x"), "plain/path-1.2:x");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("$(rm -rf /)"), "'$(rm -rf /)'");
    }

    #[test]
    fn docker_script_has_the_mounts_limits_and_command() {
        let script = batch_script(
            &request(),
            &SlurmConfig::default(),
            "m1",
            Path::new("/jobs/j"),
            0,
        )
        .unwrap();
        for expected in [
            "docker run --name \"$name\"",
            "--network none",
            "--cpus 1.500",
            "--memory 300m --memory-swap 300m",
            "--cap-drop ALL",
            "--user 1001:1002",
            "type=bind,source=/store/key-chris-jid-42/incoming,target=/share/incoming,readonly",
            "type=bind,source=/store/key-chris-jid-42/outgoing,target=/share/outgoing",
            "--env-file /jobs/j/env",
            "--entrypoint simpledsapp fnndsc/pl-simpledsapp:2.1.0 --prefix 'it'\\''s' /share/incoming /share/outgoing/sub",
            "trap 'docker kill \"$name\" >/dev/null 2>&1' TERM INT HUP",
            "--label org.chrisproject.dispatch.job-id=chris-jid-42",
            "> \"$dir/exit.tmp\"",
        ] {
            assert!(script.contains(expected), "{expected:?} not in:\n{script}");
        }
    }

    #[test]
    fn env_values_stay_off_command_lines() {
        let mut job = request();
        job.env = vec![
            ("A".into(), "1".into()),
            ("B".into(), "two\nlines".into()),
            ("A".into(), "3".into()),
        ];
        let config = SlurmConfig::default();
        assert_eq!(env_file(&job, &config).as_deref(), Some("A=3\n"));
        let script = batch_script(&job, &config, "m1", Path::new("/jobs/j"), 0).unwrap();
        assert!(script.contains("--env-file /jobs/j/env"), "{script}");
        assert!(script.contains("--env 'B=two\nlines'"), "{script}");
        assert!(!script.contains("A=3"), "{script}");
        let apptainer = SlurmConfig {
            runtime: Runtime::Apptainer,
            ..SlurmConfig::default()
        };
        job.user = None;
        assert_eq!(env_file(&job, &apptainer), None);
        let script = batch_script(&job, &apptainer, "m1", Path::new("/j"), 0).unwrap();
        assert!(script.contains("export APPTAINERENV_A=3\n"), "{script}");
        assert!(!script.contains("--env A="), "{script}");
    }

    #[test]
    fn apptainer_and_none_scripts() {
        let config = SlurmConfig {
            runtime: Runtime::Apptainer,
            ..SlurmConfig::default()
        };
        let mut job = request();
        job.user = None;
        let script = batch_script(&job, &config, "m1", Path::new("/j"), 1000).unwrap();
        assert!(
            script.contains("apptainer exec --containall --cleanenv"),
            "{script}"
        );
        assert!(
            script.contains("--bind /store/key-chris-jid-42/incoming:/share/incoming:ro"),
            "{script}"
        );
        assert!(
            script.contains("docker://fnndsc/pl-simpledsapp:2.1.0 simpledsapp"),
            "{script}"
        );
        assert_eq!(apptainer_image("/images/x.sif", &config), "/images/x.sif");

        let none = SlurmConfig {
            runtime: Runtime::None,
            ..SlurmConfig::default()
        };
        let script = batch_script(&job, &none, "m1", Path::new("/j"), 1000).unwrap();
        assert!(
            script.contains("env -i PATH=/usr/local/bin:/usr/bin:/bin 'A=1 2' simpledsapp --prefix 'it'\\''s' /store/key-chris-jid-42/incoming /store/key-chris-jid-42/outgoing/sub"),
            "{script}"
        );
        // Another user than the manager's cannot be had without root.
        let error = batch_script(&request(), &none, "m1", Path::new("/j"), 1000).unwrap_err();
        assert!(error.to_string().contains("container_user"), "{error}");
        let as_root = batch_script(&request(), &none, "m1", Path::new("/j"), 0).unwrap();
        assert!(
            as_root.contains("setpriv --reuid=1001 --regid=1002 --clear-groups --"),
            "{as_root}"
        );
    }

    #[test]
    fn requests_slurm_cannot_take_are_refused() {
        let mut job = request();
        job.workers = 2;
        assert!(check_request(&job, &SlurmConfig::default()).is_err());
        let mut job = request();
        job.outgoing = PathBuf::from("/a,b");
        assert!(check_request(&job, &SlurmConfig::default()).is_err());
        check_request(&request(), &SlurmConfig::default()).unwrap();
    }
}
