//! The test plugins (`crates/testkit/plugins/*.sh`) and the container image that carries
//! them, built locally because the project's machines have no registry to pull from
//! (backends.md): `FROM scratch`, the host's static busybox, the plugins in `/plugins/`.
//!
//! The image's tag carries a hash of everything that goes into it, so a changed plugin (or
//! busybox) gets a new image, and an unchanged one is never rebuilt: not twice in one
//! process (a cache), and not by two test processes at once (a file lock around the
//! check-then-build).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, PoisonError};

use anyhow::{Context, Result, bail};

/// Where the host's static busybox is taken from (Debian's `busybox-static`).
pub const HOST_BUSYBOX: &str = "/bin/busybox";

/// The image's repository; the tag is a content hash.
pub const TEST_IMAGE_REPOSITORY: &str = "localhost/dispatch-test-plugins";

/// Label on the test image, so a clean-up can find every version of it.
pub const TEST_IMAGE_LABEL: &str = "org.chrisproject.dispatch.test-image";

/// Where the plugins are in the image.
pub const PLUGINS_IN_IMAGE: &str = "/plugins";

/// Every test plugin: name and script, embedded so the image and its hash are exactly
/// what this build of the testkit was compiled with.
pub const PLUGINS: &[(&str, &str)] = &[
    ("copy.sh", include_str!("../plugins/copy.sh")),
    ("exit.sh", include_str!("../plugins/exit.sh")),
    ("sleep.sh", include_str!("../plugins/sleep.sh")),
    ("hog.sh", include_str!("../plugins/hog.sh")),
    ("many.sh", include_str!("../plugins/many.sh")),
    ("links.sh", include_str!("../plugins/links.sh")),
    ("chatty.sh", include_str!("../plugins/chatty.sh")),
    ("readonly.sh", include_str!("../plugins/readonly.sh")),
    ("record.sh", include_str!("../plugins/record.sh")),
];

const CONTAINERFILE: &str = "\
FROM scratch
COPY busybox /bin/busybox
RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]
COPY plugins/ /plugins/
ENV PATH=/bin
LABEL org.chrisproject.dispatch.test-image=plugins
CMD [\"/bin/sh\"]
";

/// The container engine that builds and runs the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Engine {
    /// `docker` (dockerd 20.10 on the project's machines: the legacy builder).
    Docker,
    /// `podman` (with the `CONTAINERS_CONF` the set-up script writes).
    Podman,
}

impl Engine {
    /// The engine's command-line program.
    pub fn program(self) -> &'static str {
        match self {
            Engine::Docker => "docker",
            Engine::Podman => "podman",
        }
    }

    /// A command for the engine's CLI. Docker's is told to use the legacy builder, which
    /// is what dockerd 20.10 without buildx offers.
    pub fn command(self) -> Command {
        let mut command = Command::new(self.program());
        if self == Engine::Docker {
            command.env("DOCKER_BUILDKIT", "0");
        }
        command
    }
}

/// The host directory holding the plugin scripts (for backends that run them directly).
pub fn plugins_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/plugins"))
}

/// The host path of one plugin script, checked to be one of [`PLUGINS`].
pub fn plugin_host_path(name: &str) -> Result<PathBuf> {
    if !PLUGINS.iter().any(|(known, _)| *known == name) {
        bail!("no test plugin named {name}");
    }
    Ok(plugins_dir().join(name))
}

/// Images already built (or found) by this process, per engine.
static BUILT: Mutex<Option<HashMap<Engine, String>>> = Mutex::new(None);

/// Makes sure the test-plugin image exists in `engine` and returns its reference,
/// `localhost/dispatch-test-plugins:<hash>`. Builds it the first time, once per process;
/// concurrent callers (threads or processes) wait for one build.
///
/// Blocking: from async code call [`ensure_test_image_async`].
pub fn ensure_test_image(engine: Engine) -> Result<String> {
    // Held through the build, so threads of one process wait for one build.
    let mut built = BUILT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(image) = built.as_ref().and_then(|b| b.get(&engine)) {
        return Ok(image.clone());
    }
    let busybox = std::fs::read(HOST_BUSYBOX).map_err(|e| {
        anyhow::anyhow!(
            "the test image needs a static busybox at {HOST_BUSYBOX} ({e}): \
             run `apt-get install -y busybox-static` (scripts/setup-engines.sh does)"
        )
    })?;
    if has_dynamic_loader(&busybox) {
        bail!(
            "{HOST_BUSYBOX} is dynamically linked and cannot run in an image FROM scratch: \
             run `apt-get install -y busybox-static` (scripts/setup-engines.sh does)"
        );
    }
    let image = format!("{TEST_IMAGE_REPOSITORY}:{}", content_tag(&busybox));
    // Other test processes may be building the same image: one at a time, and whoever
    // comes second finds it built.
    let lock_path =
        std::env::temp_dir().join(format!("dispatch-test-plugins-{}.lock", engine.program()));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("cannot lock {}", lock_path.display()))?;
    if !image_exists(engine, &image)? {
        build_image(engine, &image, &busybox)?;
    }
    drop(lock);
    built
        .get_or_insert_with(HashMap::new)
        .insert(engine, image.clone());
    Ok(image)
}

/// [`ensure_test_image`] off the async runtime's threads.
pub async fn ensure_test_image_async(engine: Engine) -> Result<String> {
    tokio::task::spawn_blocking(move || ensure_test_image(engine))
        .await
        .context("the image build task panicked")?
}

/// A short hash of everything that goes into the image.
fn content_tag(busybox: &[u8]) -> String {
    let mut hasher = blake3::Hasher::new();
    let mut part = |bytes: &[u8]| {
        // Length-prefixed, so moving bytes between parts changes the hash.
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    part(CONTAINERFILE.as_bytes());
    part(busybox);
    for (name, script) in PLUGINS {
        part(name.as_bytes());
        part(script.as_bytes());
    }
    hasher.finalize().to_hex()[..16].to_owned()
}

/// True for a 64-bit little-endian ELF file with a `PT_INTERP` program header (a
/// dynamic loader). Anything else is left for the build to judge.
fn has_dynamic_loader(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        elf.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    if elf.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return false;
    }
    let (Some(offset), Some(size), Some(count)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    (0..usize::from(count)).any(|i| {
        usize::try_from(offset)
            .ok()
            .and_then(|offset| u32_at(offset + i * usize::from(size)))
            == Some(PT_INTERP)
    })
}

fn image_exists(engine: Engine, image: &str) -> Result<bool> {
    let status = engine
        .command()
        .args(["image", "inspect", "--format", "{{.Id}}", image])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("cannot run `{}`: is it installed?", engine.program()))?;
    Ok(status.success())
}

fn build_image(engine: Engine, image: &str, busybox: &[u8]) -> Result<()> {
    let context = tempfile::Builder::new()
        .prefix("dispatch-test-image-")
        .tempdir()?;
    write_context(context.path(), busybox)?;
    let output = engine
        .command()
        .args(["build", "--quiet", "--network", "none", "--tag", image])
        .arg(context.path())
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{} build`", engine.program()))?;
    if !output.status.success() {
        bail!(
            "`{} build` of {image} failed ({}):\n{}{}",
            engine.program(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

fn write_context(dir: &Path, busybox: &[u8]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let write = |path: &Path, bytes: &[u8], mode: u32| -> Result<()> {
        let mut file = std::fs::File::create(path)?;
        file.write_all(bytes)?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    write(&dir.join("Dockerfile"), CONTAINERFILE.as_bytes(), 0o644)?;
    write(&dir.join("busybox"), busybox, 0o755)?;
    let plugins = dir.join("plugins");
    std::fs::create_dir(&plugins)?;
    for (name, script) in PLUGINS {
        write(&plugins.join(name), script.as_bytes(), 0o755)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_plugin_file_is_embedded() -> Result<()> {
        let mut on_disk: Vec<String> = std::fs::read_dir(plugins_dir())?
            .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_>>()?;
        on_disk.sort();
        let mut embedded: Vec<String> = PLUGINS.iter().map(|(n, _)| (*n).to_owned()).collect();
        embedded.sort();
        assert_eq!(on_disk, embedded);
        Ok(())
    }

    /// Runs a plugin with `sh` on the host: (exit code, stdout).
    fn run_on_host(shell: &str, plugin: &str, args: &[&str]) -> Result<(i32, String)> {
        let output = Command::new(shell)
            .arg(plugin_host_path(plugin)?)
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        Ok((
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        ))
    }

    #[test]
    fn host_shells_run_every_plugin() -> Result<()> {
        let shells: Vec<&str> = ["/bin/sh", HOST_BUSYBOX]
            .into_iter()
            .filter(|s| Path::new(s).exists())
            .collect();
        for shell in shells {
            let run = |plugin: &str, args: &[&str]| -> Result<(i32, String)> {
                if shell == HOST_BUSYBOX {
                    let mut all = vec!["sh", "--"];
                    let path = plugin_host_path(plugin)?;
                    let path = path.to_string_lossy().into_owned();
                    all.push(&path);
                    all.extend_from_slice(args);
                    let output = Command::new(HOST_BUSYBOX).args(&all).output()?;
                    return Ok((
                        output.status.code().unwrap_or(-1),
                        String::from_utf8_lossy(&output.stdout).into_owned(),
                    ));
                }
                run_on_host(shell, plugin, args)
            };
            let dir = tempfile::tempdir()?;
            let (input, output) = (dir.path().join("in"), dir.path().join("out"));
            std::fs::create_dir_all(input.join("sub"))?;
            std::fs::create_dir_all(&output)?;
            std::fs::write(input.join("sub/b.txt"), "beta")?;
            std::fs::write(input.join(".hidden"), "h")?;
            let (i, o) = (input.to_string_lossy(), output.to_string_lossy());

            let (code, out) = run("copy.sh", &["--dir", &i, &i, &o])?;
            assert_eq!(code, 0, "{shell} copy.sh: {out}");
            assert_eq!(std::fs::read_to_string(output.join("sub/b.txt"))?, "beta");
            assert_eq!(std::fs::read_to_string(output.join(".hidden"))?, "h");
            let run_json = std::fs::read_to_string(output.join("run.json"))?;
            assert!(run_json.contains("\"files\": 2"), "{run_json}");

            assert_eq!(run("exit.sh", &["--code", "3", &o])?.0, 3, "{shell}");
            assert_eq!(
                run("sleep.sh", &["--seconds", "0", &o])?,
                (0, "started\ndone\n".into())
            );
            let (code, out) = run("chatty.sh", &["--lines", "3", &o])?;
            assert_eq!((code, out.as_str()), (0, "line 1\nline 2\nline 3\n"));
            assert_eq!(run("hog.sh", &["--mib", "1", &o])?.0, 0, "{shell}");
            assert_eq!(run("many.sh", &["--files", "12", &o])?.0, 0, "{shell}");
            assert_eq!(
                std::fs::read_to_string(output.join("file-000012.txt"))?,
                "file 12\n"
            );
            assert_eq!(run("links.sh", &[&o])?.0, 0, "{shell}");
            assert_eq!(
                std::fs::read_link(output.join("data-link"))?,
                Path::new("data.txt")
            );
            let log = dir.path().join("record.log");
            let l = log.to_string_lossy();
            let (code, _) = run(
                "record.sh",
                &["--log", &l, "--name", "r1", "--seconds", "0", &o],
            )?;
            assert_eq!(code, 0, "{shell} record.sh");
            assert_eq!(std::fs::read_to_string(output.join("record.txt"))?, "r1\n");
            let trace = std::fs::read_to_string(&log)?;
            assert!(
                trace.contains("start r1") && trace.contains("end r1"),
                "{trace}"
            );
            // On the host nothing is mounted read-only: it only has to run and report.
            let (code, out) = run("readonly.sh", &[&i, &o])?;
            assert_eq!(code, 0, "{shell}");
            assert!(out.starts_with("incoming: "), "{out}");
            assert_ne!(
                run("copy.sh", &[&o])?.0,
                0,
                "{shell}: a usage error must fail"
            );
        }
        Ok(())
    }

    /// `docker run --rm --network none [extra] IMAGE /bin/sh /plugins/<plugin> args`:
    /// (exit code, stdout).
    fn run_in_docker(
        image: &str,
        extra: &[&str],
        plugin: &str,
        args: &[&str],
    ) -> Result<(i32, String)> {
        let output = Engine::Docker
            .command()
            .args(["run", "--rm", "--network", "none"])
            .args(extra)
            .arg(image)
            .arg("/bin/sh")
            .arg(format!("{PLUGINS_IN_IMAGE}/{plugin}"))
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        Ok((
            output.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        ))
    }

    #[test]
    fn docker_engine_builds_the_image_once_and_runs_every_plugin() -> Result<()> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        // Concurrent callers get one image.
        let images = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| ensure_test_image(Engine::Docker)))
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().map_err(|_| anyhow::anyhow!("panicked"))?)
                .collect::<Result<Vec<_>>>()
        })?;
        assert!(images.iter().all(|i| *i == images[0]), "{images:?}");
        let image = images[0].as_str();
        assert!(
            image.starts_with("localhost/dispatch-test-plugins:"),
            "{image}"
        );

        let dir = tempfile::tempdir()?;
        let (input, output) = (dir.path().join("in"), dir.path().join("out"));
        std::fs::create_dir_all(input.join("sub"))?;
        std::fs::create_dir_all(&output)?;
        std::fs::set_permissions(&output, std::fs::Permissions::from_mode(0o777))?;
        std::fs::write(input.join("sub/b.txt"), "beta")?;
        std::fs::write(input.join("a.txt"), "alpha")?;
        let mounts = [
            "-v".to_owned(),
            format!("{}:/share/incoming:ro", input.display()),
            "-v".to_owned(),
            format!("{}:/share/outgoing", output.display()),
            "--user".to_owned(),
            "4321:4322".to_owned(),
        ];
        let mounts: Vec<&str> = mounts.iter().map(String::as_str).collect();
        let (i, o) = ("/share/incoming", "/share/outgoing");

        let (code, out) = run_in_docker(image, &mounts, "copy.sh", &["--dir", i, i, o])?;
        assert_eq!(code, 0, "copy.sh: {out}");
        assert_eq!(std::fs::read_to_string(output.join("sub/b.txt"))?, "beta");
        let run_json = std::fs::read_to_string(output.join("run.json"))?;
        assert!(
            run_json.contains("\"uid\": 4321, \"gid\": 4322"),
            "{run_json}"
        );
        let meta = std::fs::metadata(output.join("a.txt"))?;
        assert_eq!((meta.uid(), meta.gid()), (4321, 4322));

        let (code, out) = run_in_docker(image, &mounts, "readonly.sh", &[i, o])?;
        assert_eq!((code, out.as_str()), (0, "incoming: read-only\n"));
        assert_eq!(std::fs::read_to_string(input.join("a.txt"))?, "alpha");

        let (code, out) = run_in_docker(image, &[], "exit.sh", &["--code", "3", o])?;
        assert_eq!((code, out.as_str()), (3, "exit: exiting with code 3\n"));
        let (code, out) = run_in_docker(image, &[], "sleep.sh", &["--seconds", "0.2", o])?;
        assert_eq!((code, out.as_str()), (0, "started\ndone\n"));
        let (code, out) = run_in_docker(image, &[], "chatty.sh", &["--lines", "4", o])?;
        assert_eq!(
            (code, out.as_str()),
            (0, "line 1\nline 2\nline 3\nline 4\n")
        );

        std::fs::remove_dir_all(&output)?;
        std::fs::create_dir_all(&output)?;
        std::fs::set_permissions(&output, std::fs::Permissions::from_mode(0o777))?;
        let (code, out) = run_in_docker(image, &mounts, "many.sh", &["--files", "40", o])?;
        assert_eq!(code, 0, "many.sh: {out}");
        assert_eq!(std::fs::read_dir(&output)?.count(), 40);
        let (code, out) = run_in_docker(image, &mounts, "links.sh", &[o])?;
        assert_eq!(code, 0, "links.sh: {out}");
        assert_eq!(
            std::fs::read_link(output.join("etc-link"))?,
            Path::new("/etc")
        );
        assert_eq!(
            std::fs::read_to_string(output.join("feed.chrislink"))?,
            "home/someone/feeds/feed_1"
        );

        // Over a 32 MiB limit the engine kills it: exit 137.
        let (code, out) =
            run_in_docker(image, &["--memory", "32m"], "hog.sh", &["--mib", "256", o])?;
        assert_eq!(code, 137, "hog.sh under 32 MiB: {out}");
        Ok(())
    }

    #[test]
    fn a_dynamic_busybox_is_told_apart() -> Result<()> {
        // The test binary itself is dynamically linked.
        let me = std::fs::read(std::env::current_exe()?)?;
        assert!(has_dynamic_loader(&me));
        if let Ok(busybox) = std::fs::read(HOST_BUSYBOX) {
            assert!(
                !has_dynamic_loader(&busybox),
                "{HOST_BUSYBOX} is not static"
            );
        }
        assert!(!has_dynamic_loader(b"#!/bin/sh"));
        Ok(())
    }

    #[test]
    fn the_tag_follows_the_content() {
        assert_eq!(content_tag(b"one"), content_tag(b"one"));
        assert_ne!(content_tag(b"one"), content_tag(b"two"));
        assert_eq!(content_tag(b"one").len(), 16);
    }
}
