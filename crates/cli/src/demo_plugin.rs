//! The sample plugin `dispatch demo` runs: a ChRIS "ds" plugin that reads every file of
//! its input directory and writes, for each, its line, word and byte counts, then a
//! summary. It is part of this very program so the demo needs no image from a registry
//! and no network: in Docker it runs from an image built out of this binary.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

/// Pause between files, so that someone watching sees the log arrive as it is written.
const PAUSE_PER_FILE: Duration = Duration::from_millis(400);

/// Runs the plugin as ChRIS calls a ds plugin: `[options...] <inputdir> <outputdir>`.
pub fn run(args: &[String]) -> Result<()> {
    let [.., input, output] = args else {
        bail!("usage: dispatch demo-plugin [options] <inputdir> <outputdir>");
    };
    let (input, output) = (PathBuf::from(input), PathBuf::from(output));
    let mut files = Vec::new();
    walk(&input, &input, &mut files)?;
    files.sort();
    println!(
        "demo plugin: {} input files in {}",
        files.len(),
        input.display()
    );
    let (mut lines, mut words, mut bytes) = (0usize, 0usize, 0usize);
    for relative in &files {
        let data = std::fs::read(input.join(relative))
            .with_context(|| format!("cannot read {}", relative.display()))?;
        let text = String::from_utf8_lossy(&data);
        let counts = (
            text.lines().count(),
            text.split_whitespace().count(),
            data.len(),
        );
        println!(
            "  {}: {} lines, {} words, {} bytes",
            relative.display(),
            counts.0,
            counts.1,
            counts.2
        );
        let target = output.join(format!("{}.counts.txt", relative.display()));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(
            &target,
            format!(
                "lines {}\nwords {}\nbytes {}\n",
                counts.0, counts.1, counts.2
            ),
        )
        .with_context(|| format!("cannot write {}", target.display()))?;
        lines += counts.0;
        words += counts.1;
        bytes += counts.2;
        std::thread::sleep(PAUSE_PER_FILE);
    }
    std::fs::write(
        output.join("summary.txt"),
        format!(
            "files {}\nlines {lines}\nwords {words}\nbytes {bytes}\n",
            files.len()
        ),
    )
    .context("cannot write summary.txt")?;
    println!("demo plugin: done, {lines} lines and {words} words in all");
    Ok(())
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            walk(root, &entry.path(), out)?;
        } else if kind.is_file() {
            out.push(entry.path().strip_prefix(root)?.to_path_buf());
        }
    }
    Ok(())
}
