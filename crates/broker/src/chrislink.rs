//! ChRIS links (`*.chrislink`, pfcon-api.md §2.13): how a job's inputs look once every link
//! has been replaced by the data it names.
//!
//! This module owns that rule, in two forms:
//!
//! * [`walk_job_inputs`] describes the tree that pfcon's fslink copy followed by
//!   `process_chrislink_files` would leave in `incoming/`, as a lazy, deterministic walk over
//!   the shared store. Nothing is copied: each entry's `source` is the real file, so a tar
//!   encoder can stream it or a stager can hard-link it.
//! * [`expand_in_place`] rewrites an `incoming/` that already holds unpacked inputs (zipfile
//!   mode, where CUBE's zip carries linked data at its full storage path), as pfcon does.
//!
//! It must never follow a symlink, never read or write outside the root it was given, never
//! let a link pull in the job's output dir (or an ancestor, which contains it), and never loop
//! on a cycle of links.
//!
//! # Where this differs from pfcon, on purpose
//!
//! * Cycle protection compares whole path components: pfcon's string-prefix test treats
//!   `data/ab` as already visited once `data/a` is, and silently drops it. A link to an
//!   ancestor of a directory it was reached through is refused too, where pfcon expands one
//!   more nested copy of everything before its own check stops it.
//! * When several input dirs hold the same relative path, the first input dir wins (pfcon
//!   copies each in turn, so the last one overwrites).
//! * A link to a file exposes only the linked file inside the directory named after its
//!   parent; links in one directory to several files of the same parent share that directory.
//!   (pfcon's fslink copy ends up with the same, since only linked files are fetched.)
//! * A link to a file at the top level, a target reached through a symlink, and a link file
//!   that is oversized, not UTF-8, or names a `..` path (or, in zipfile mode, an absolute one)
//!   are skipped or refused with a reason, where pfcon would follow, crash, or escape.
//! * The file count reported is the number of regular files the job really sees (see
//!   [`InputCounts::files`]); pfcon's `nfiles` subtracts every removed link file from every
//!   fetched file, which undercounts when links sit inside linked data.

use std::collections::btree_map::Entry as MapEntry;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::path::{MAX_COMPONENT_BYTES, StorePath};
use crate::tree::{
    CHRISLINK_SUFFIX, EntryKind, TreeEntry, TreeWalk, WalkOptions, Walked, describe,
};

/// A link file holds one path (at most `MAX_PATH_BYTES`) plus whitespace; anything much
/// larger is not a link, and reading it whole would let one file cost unbounded memory.
const MAX_LINK_FILE_BYTES: u64 = 8192;

/// The reason a link aimed at the output (or above it) is refused: pfcon raises on it, since
/// copying it would feed the job its own output, or the whole feed.
const OUTPUT_ANCESTOR: &str = "points at the job's output dir or one of its ancestors";

const SKIP_MISSING: &str = "link target does not exist";
const SKIP_SYMLINK: &str = "link target is or goes through a symlink, which is never followed";
const SKIP_SPECIAL: &str = "link target is not a regular file or directory";
const SKIP_CYCLE: &str =
    "link target contains or lies inside a directory this link was reached through";
const SKIP_NAME_TAKEN: &str = "another entry here already has the name this link expands to";
const SKIP_TOP_FILE: &str = "link target is a file at the store's top level, with no directory";

/// Totals of one input walk, filled in as the walk proceeds and shared with it, because a
/// [`TreeWalk`] is a plain iterator of entries with no room for a summary.
///
/// The values are final once the walk has been drained (or has failed).
#[derive(Debug, Clone, Default)]
pub struct InputCounts(Arc<Tallies>);

#[derive(Debug, Default)]
struct Tallies {
    files: AtomicU64,
    links_expanded: AtomicU64,
    links_skipped: AtomicU64,
}

impl InputCounts {
    /// Regular files the walk produced: what pfcon reports as a copy's `nfiles`, which is
    /// meant to exclude `.chrislink` files (they never appear in the walk).
    pub fn files(&self) -> u64 {
        self.0.files.load(Ordering::Relaxed)
    }

    /// Link files replaced by the data they name (several links may share one directory).
    pub fn links_expanded(&self) -> u64 {
        self.0.links_expanded.load(Ordering::Relaxed)
    }

    /// Link files that contributed nothing; each appeared in the walk as
    /// [`Walked::Skipped`], so a caller can log them.
    pub fn links_skipped(&self) -> u64 {
        self.0.links_skipped.load(Ordering::Relaxed)
    }

    fn bump(cell: &AtomicU64) {
        cell.fetch_add(1, Ordering::Relaxed);
    }
}

/// Walks a job's inputs as they should appear in `incoming/`, with links expanded: the view
/// a fslink-style stage or a sender needs without copying anything first.
///
/// Each of `input_dirs` (store-relative) is merged at the tree's root; an input that is a
/// file appears at the root under its own name, and an input that does not exist contributes
/// nothing (as with pfcon). Every `*.chrislink` file is replaced by a directory next to it,
/// named after its target with `/` turned into `_`, holding the target's entries, with links
/// inside expanded the same way. A link at `output_dir` or above it fails the walk with
/// [`Error::InvalidLink`]; links that cannot be followed are reported as
/// [`Walked::Skipped`] at the link's path. Errors met part-way come out as an `Err` item,
/// after which the walk ends; the caller must then treat the whole stage as failed.
///
/// Use [`walk_job_inputs_with_counts`] to learn how many files and links there were.
pub fn walk_job_inputs(
    store_root: &Path,
    input_dirs: &[StorePath],
    output_dir: &StorePath,
) -> Result<TreeWalk> {
    walk_job_inputs_with_counts(store_root, input_dirs, output_dir).map(|(walk, _)| walk)
}

/// [`walk_job_inputs`], plus the totals a copy job reports (pfcon's `nfiles`), readable once
/// the walk is drained.
pub fn walk_job_inputs_with_counts(
    store_root: &Path,
    input_dirs: &[StorePath],
    output_dir: &StorePath,
) -> Result<(TreeWalk, InputCounts)> {
    // The root itself may legitimately be a symlink (a mount point); nothing below it may.
    let meta = fs::metadata(store_root).map_err(|e| Error::io("read", store_root.display(), e))?;
    if !meta.is_dir() {
        return Err(Error::invalid(
            "store_root",
            format!("`{}` is not a directory", store_root.display()),
        ));
    }
    let mut layers = Vec::new();
    for input in input_dirs {
        // pfcon starts each input's visited set with the input itself, so a link back into
        // the input is not followed a second time.
        let chain = Arc::new(vec![input.clone()]);
        match resolve(store_root, input)? {
            Resolved::Dir => layers.push(Layer {
                dir: input.clone(),
                only: None,
                chain,
            }),
            Resolved::File => layers.push(Layer {
                dir: input.parent().unwrap_or_default(),
                only: Some(BTreeSet::from([input.file_name().to_owned()])),
                chain,
            }),
            Resolved::Missing => {
                tracing::warn!(input_dir = %input, "input dir does not exist, staging it as empty");
            }
            Resolved::ThroughSymlink => {
                return Err(Error::invalid(
                    "input_dirs",
                    format!("`{input}` is or goes through a symlink, which is never followed"),
                ));
            }
            Resolved::Special => {
                return Err(Error::invalid(
                    "input_dirs",
                    format!("`{input}` is not a regular file or directory"),
                ));
            }
        }
    }
    let counts = InputCounts::default();
    let mut walk = InputWalk {
        store_root: store_root.to_path_buf(),
        output_dir: output_dir.clone(),
        stack: Vec::new(),
        counts: counts.clone(),
        failed: false,
    };
    let root = walk.plan_dir(&StorePath::root(), &layers)?;
    walk.stack.push(root.into_iter());
    Ok((Box::new(walk), counts))
}

/// One real directory (store-relative) contributing entries to a directory of the walk.
#[derive(Debug, Clone)]
struct Layer {
    dir: StorePath,
    /// For a link to a file, or an input that is a file: the only names exposed from `dir`,
    /// so that linking one file never exposes its siblings.
    only: Option<BTreeSet<String>>,
    /// The input and link targets this layer was reached through, for cycle protection.
    chain: Arc<Vec<StorePath>>,
}

/// The first entry seen under one name while merging a directory's layers.
enum Slot {
    /// Sent as it is (a file, or something left out).
    Plain(Walked),
    /// A directory, with every layer that has a directory under this name.
    Dir {
        entry: TreeEntry,
        layers: Vec<Layer>,
    },
    /// A link file: replaced by its expansion, never sent.
    Link {
        entry: TreeEntry,
        real: StorePath,
        chain: Arc<Vec<StorePath>>,
    },
}

/// A directory that links expand to, gathered before its entry is described.
struct Expansion {
    dir: StorePath,
    only: Option<BTreeSet<String>>,
    chain: Arc<Vec<StorePath>>,
}

/// What following one link leads to.
enum LinkPlan {
    Skip(&'static str),
    Expand {
        name: String,
        dir: StorePath,
        file: Option<String>,
        target: StorePath,
    },
}

/// One item of a directory's planned listing.
enum Planned {
    Emit(Walked),
    Descend {
        entry: TreeEntry,
        layers: Vec<Layer>,
    },
}

struct InputWalk {
    store_root: PathBuf,
    output_dir: StorePath,
    /// One planned listing per directory being walked; memory grows with directory sizes
    /// and depth, never with file sizes.
    stack: Vec<std::vec::IntoIter<Planned>>,
    counts: InputCounts,
    failed: bool,
}

impl InputWalk {
    /// Lists the directory at `vpath` of the walk, merged from `layers`, links expanded,
    /// sorted by name so the walk is the same every time the store is.
    fn plan_dir(&self, vpath: &StorePath, layers: &[Layer]) -> Result<Vec<Planned>> {
        let mut slots: BTreeMap<String, Slot> = BTreeMap::new();
        for layer in layers {
            for name in self.layer_names(layer)? {
                let real = layer.dir.child(&name).map_err(|e| {
                    Error::refused(
                        layer.dir.under(&self.store_root).join(&name).display(),
                        e.to_string(),
                    )
                })?;
                let source = real.under(&self.store_root);
                if let Some(slot) = slots.get_mut(&name) {
                    // First occurrence wins; only directories under the same name merge.
                    if let Slot::Dir { layers: merged, .. } = slot
                        && is_real_dir(&source)?
                    {
                        merged.push(Layer {
                            dir: real,
                            only: None,
                            chain: layer.chain.clone(),
                        });
                    }
                    continue;
                }
                let path = vpath
                    .child(&name)
                    .map_err(|e| Error::refused(source.display(), e.to_string()))?;
                let walked = match describe(&source, path, WalkOptions::default()) {
                    Ok(walked) => walked,
                    // Removed since the listing: not part of the tree, as in `walk_dir`.
                    Err(Error::Io { source: e, .. }) if e.kind() == ErrorKind::NotFound => continue,
                    Err(error) => return Err(error),
                };
                let slot = match walked {
                    Walked::Entry(entry) if entry.kind == EntryKind::Directory => Slot::Dir {
                        entry,
                        layers: vec![Layer {
                            dir: real,
                            only: None,
                            chain: layer.chain.clone(),
                        }],
                    },
                    Walked::Entry(entry)
                        if matches!(entry.kind, EntryKind::File { .. })
                            && name.ends_with(CHRISLINK_SUFFIX) =>
                    {
                        Slot::Link {
                            entry,
                            real,
                            chain: layer.chain.clone(),
                        }
                    }
                    other => Slot::Plain(other),
                };
                slots.insert(name, slot);
            }
        }

        let mut items: Vec<(String, Planned)> = Vec::with_capacity(slots.len());
        let mut expansions: BTreeMap<String, Expansion> = BTreeMap::new();
        for (link_name, slot) in &slots {
            let Slot::Link { entry, real, chain } = slot else {
                continue;
            };
            let skipped = match self.follow_link(entry, real, chain)? {
                LinkPlan::Skip(reason) => Some(reason),
                // pfcon: "only copy once to a dest path". Real entries are all in place before
                // pfcon expands anything, so they win over every expansion.
                LinkPlan::Expand { name, .. } if slots.contains_key(&name) => Some(SKIP_NAME_TAKEN),
                LinkPlan::Expand {
                    name,
                    dir,
                    file,
                    target,
                } => match expansions.entry(name) {
                    MapEntry::Vacant(vacant) => {
                        let mut chain = chain.as_ref().clone();
                        chain.push(target);
                        vacant.insert(Expansion {
                            dir,
                            only: file.map(|f| BTreeSet::from([f])),
                            chain: Arc::new(chain),
                        });
                        None
                    }
                    MapEntry::Occupied(mut taken) if taken.get().dir == dir => {
                        let expansion = taken.get_mut();
                        match (&mut expansion.only, file) {
                            (Some(names), Some(file)) => {
                                names.insert(file);
                            }
                            (only, None) => *only = None,
                            (None, Some(_)) => {}
                        }
                        let merged = Arc::make_mut(&mut expansion.chain);
                        for seen in chain.iter().chain(std::iter::once(&target)) {
                            if !merged.contains(seen) {
                                merged.push(seen.clone());
                            }
                        }
                        None
                    }
                    MapEntry::Occupied(_) => Some(SKIP_NAME_TAKEN),
                },
            };
            match skipped {
                Some(reason) => {
                    InputCounts::bump(&self.counts.0.links_skipped);
                    let path = entry.path.clone();
                    items.push((
                        link_name.clone(),
                        Planned::Emit(Walked::Skipped { path, reason }),
                    ));
                }
                None => InputCounts::bump(&self.counts.0.links_expanded),
            }
        }

        for (name, slot) in slots {
            match slot {
                Slot::Plain(walked) => items.push((name, Planned::Emit(walked))),
                Slot::Dir { entry, layers } => {
                    items.push((name, Planned::Descend { entry, layers }))
                }
                Slot::Link { .. } => {}
            }
        }
        for (name, expansion) in expansions {
            let source = expansion.dir.under(&self.store_root);
            let path = vpath
                .child(&name)
                .map_err(|e| Error::refused(source.display(), e.to_string()))?;
            match describe(&source, path, WalkOptions::default()) {
                Ok(Walked::Entry(entry)) if entry.kind == EntryKind::Directory => {
                    let layer = Layer {
                        dir: expansion.dir,
                        only: expansion.only,
                        chain: expansion.chain,
                    };
                    items.push((
                        name,
                        Planned::Descend {
                            entry,
                            layers: vec![layer],
                        },
                    ));
                }
                // Changed since the link was resolved: nothing to expand any more.
                Ok(_) => {}
                Err(Error::Io { source: e, .. }) if e.kind() == ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
        }
        // Names are unique across slots, link notes (named after link files, which are slots)
        // and expansions (never named like a slot), so this order is total.
        items.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(items.into_iter().map(|(_, planned)| planned).collect())
    }

    /// The names a layer contributes, sorted.
    fn layer_names(&self, layer: &Layer) -> Result<Vec<String>> {
        if let Some(only) = &layer.only {
            return Ok(only.iter().cloned().collect());
        }
        let dir = layer.dir.under(&self.store_root);
        let read = fs::read_dir(&dir).map_err(|e| Error::io("list", dir.display(), e))?;
        let mut names = Vec::new();
        for item in read {
            let item = item.map_err(|e| Error::io("list", dir.display(), e))?;
            let name = item.file_name().into_string().map_err(|raw| {
                Error::refused(
                    dir.join(raw).display(),
                    "the name is not valid UTF-8, so it cannot be sent",
                )
            })?;
            names.push(name);
        }
        names.sort_unstable();
        Ok(names)
    }

    /// Reads and checks one link file (found at store path `real`).
    fn follow_link(
        &self,
        entry: &TreeEntry,
        real: &StorePath,
        chain: &[StorePath],
    ) -> Result<LinkPlan> {
        let link = real.to_string();
        let text = read_link_target(&entry.source, &link)?;
        let target = StorePath::from_api(&text).map_err(|e| {
            invalid_link(
                &link,
                format!("target `{text}` is not a valid store path: {e}"),
            )
        })?;
        // Checked before anything else, as pfcon does, so a bad link fails the job even when
        // it would not otherwise be followed.
        if self.output_dir.starts_with(&target) {
            return Err(invalid_link(
                &link,
                format!("target `{target}` {OUTPUT_ANCESTOR}"),
            ));
        }
        if is_cycle(chain, &target) {
            return Ok(LinkPlan::Skip(SKIP_CYCLE));
        }
        let (dir, file) = match resolve(&self.store_root, &target)? {
            Resolved::Dir => (target.clone(), None),
            // pfcon names the expansion after the file's parent directory.
            Resolved::File => match target.parent() {
                Some(parent) if !parent.is_root() => (parent, Some(target.file_name().to_owned())),
                _ => return Ok(LinkPlan::Skip(SKIP_TOP_FILE)),
            },
            Resolved::Missing => return Ok(LinkPlan::Skip(SKIP_MISSING)),
            Resolved::ThroughSymlink => return Ok(LinkPlan::Skip(SKIP_SYMLINK)),
            Resolved::Special => return Ok(LinkPlan::Skip(SKIP_SPECIAL)),
        };
        let name = expansion_name(&dir);
        if name.len() > MAX_COMPONENT_BYTES {
            return Err(invalid_link(
                &link,
                format!(
                    "the directory it expands to, `{name}`, is longer than \
                     {MAX_COMPONENT_BYTES} bytes"
                ),
            ));
        }
        Ok(LinkPlan::Expand {
            name,
            dir,
            file,
            target,
        })
    }

    fn next_item(&mut self) -> Option<Result<Walked>> {
        if self.failed {
            return None;
        }
        loop {
            let items = self.stack.last_mut()?;
            let Some(planned) = items.next() else {
                self.stack.pop();
                continue;
            };
            return Some(match planned {
                Planned::Emit(walked) => {
                    if let Walked::Entry(TreeEntry {
                        kind: EntryKind::File { .. },
                        ..
                    }) = &walked
                    {
                        InputCounts::bump(&self.counts.0.files);
                    }
                    Ok(walked)
                }
                // The children are planned before the directory is sent, so a bad link inside
                // fails the walk rather than leaving a directory that silently lacks it.
                Planned::Descend { entry, layers } => match self.plan_dir(&entry.path, &layers) {
                    Ok(children) => {
                        self.stack.push(children.into_iter());
                        Ok(Walked::Entry(entry))
                    }
                    Err(error) => {
                        self.failed = true;
                        Err(error)
                    }
                },
            });
        }
    }
}

impl Iterator for InputWalk {
    type Item = Result<Walked>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_item()
    }
}

/// What pfcon's `process_chrislink_files` did to one `incoming/` dir, so a caller can report
/// pfcon's `nfiles` (entries unpacked minus `links_removed`) and how the data was placed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpandSummary {
    /// Link files deleted: every regular `*.chrislink` file found (pfcon's `nlinks`).
    pub links_removed: u64,
    /// Link files that materialised a new directory.
    pub links_expanded: u64,
    /// Files placed in expansions as hard links (no data copied).
    pub files_linked: u64,
    /// Files copied because a hard link failed (e.g. `EXDEV`, `EMLINK`).
    pub files_copied: u64,
}

/// Expands the links of an unpacked zipfile-mode `incoming/` in place, as pfcon does after
/// unzipping: CUBE's zip carries linked data at its full storage path, which each link is
/// replaced by, after which the top-level folders present only for that purpose are removed.
///
/// Targets are relative to `incoming`; an absolute, `..` or empty target fails with
/// [`Error::InvalidLink`]. Expansions hard-link files (copying when that fails); symlinks are
/// never followed nor recreated, and nothing is written outside `incoming`. Links that lead
/// nowhere (missing target, through a symlink, a cycle, a name already taken) are removed
/// without expanding, as pfcon removes them.
pub fn expand_in_place(incoming: &Path) -> Result<ExpandSummary> {
    let meta =
        fs::symlink_metadata(incoming).map_err(|e| Error::io("read", incoming.display(), e))?;
    if !meta.is_dir() {
        return Err(Error::invalid(
            "incoming",
            format!("`{}` is not a directory", incoming.display()),
        ));
    }
    let mut expander = Expander {
        incoming,
        summary: ExpandSummary::default(),
        linked: BTreeSet::new(),
        copied: Vec::new(),
    };
    // A work list rather than recursion: directory depth is bounded only by PATH_MAX.
    let mut pending = vec![Pending {
        dir: StorePath::root(),
        chain: Arc::new(Vec::new()),
    }];
    while let Some(work) = pending.pop() {
        let next = expander.expand_dir(&work)?;
        pending.extend(next.into_iter().rev());
    }
    expander.remove_linked_top_folders()?;
    Ok(expander.summary)
}

/// A directory (relative to `incoming`) whose links are still to be expanded.
struct Pending {
    dir: StorePath,
    /// Link targets whose copies this directory lies in, for cycle protection.
    chain: Arc<Vec<StorePath>>,
}

struct Expander<'a> {
    incoming: &'a Path,
    summary: ExpandSummary,
    /// Every target named by a followed link (after a file target is turned into its parent).
    linked: BTreeSet<StorePath>,
    /// Targets already copied somewhere: links inside them are only deleted, as in pfcon,
    /// since those trees are the full-path copies that are removed at the end.
    copied: Vec<StorePath>,
}

impl Expander<'_> {
    /// Expands the links directly in `work.dir` and returns, in order, the expansions and
    /// then the subdirectories to visit next (pfcon recurses into each expansion first).
    fn expand_dir(&mut self, work: &Pending) -> Result<Vec<Pending>> {
        let abs = work.dir.under(self.incoming);
        let read = match fs::read_dir(&abs) {
            Ok(read) => read,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("list", abs.display(), e)),
        };
        // A snapshot taken before expanding, so expansions made here are visited only as
        // expansions (with their chain), never again as plain subdirectories.
        let mut entries = Vec::new();
        for item in read {
            let item = item.map_err(|e| Error::io("list", abs.display(), e))?;
            let file_type = item
                .file_type()
                .map_err(|e| Error::io("read", abs.display(), e))?;
            let name = item.file_name().into_string().map_err(|raw| {
                Error::refused(abs.join(raw).display(), "the name is not valid UTF-8")
            })?;
            entries.push((name, file_type));
        }
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));

        let inside_copied = self
            .copied
            .iter()
            .any(|source| work.dir.starts_with(source));
        let mut next = Vec::new();
        let mut subdirs = Vec::new();
        for (name, file_type) in entries {
            let path = work
                .dir
                .child(&name)
                .map_err(|e| Error::refused(abs.join(&name).display(), e.to_string()))?;
            if file_type.is_dir() {
                subdirs.push(Pending {
                    dir: path,
                    chain: work.chain.clone(),
                });
                continue;
            }
            if !(file_type.is_file() && name.ends_with(CHRISLINK_SUFFIX)) {
                continue;
            }
            if !inside_copied
                && let Some(expansion) = self.expand_link(&work.dir, &path, &work.chain)?
            {
                next.push(expansion);
            }
            let link_file = path.under(self.incoming);
            fs::remove_file(&link_file).map_err(|e| Error::io("remove", link_file.display(), e))?;
            self.summary.links_removed += 1;
        }
        next.extend(subdirs);
        Ok(next)
    }

    /// Follows the link at `link` (in `dir`); returns the new expansion to visit, if any.
    fn expand_link(
        &mut self,
        dir: &StorePath,
        link: &StorePath,
        chain: &Arc<Vec<StorePath>>,
    ) -> Result<Option<Pending>> {
        let link_name = link.to_string();
        let text = read_link_target(&link.under(self.incoming), &link_name)?;
        if text.starts_with('/') {
            return Err(invalid_link(
                &link_name,
                format!("target `{text}` is absolute; it must be relative to the inputs"),
            ));
        }
        let mut target = StorePath::from_api(&text).map_err(|e| {
            invalid_link(
                &link_name,
                format!("target `{text}` is not a valid path: {e}"),
            )
        })?;
        if target.is_root() {
            return Err(invalid_link(
                &link_name,
                "the target is empty: it names all the inputs",
            ));
        }
        match resolve(self.incoming, &target)? {
            Resolved::Dir => {}
            Resolved::File => match target.parent() {
                Some(parent) if !parent.is_root() => target = parent,
                // Its parent would be `incoming` itself, which pfcon leaves alone.
                _ => return Ok(None),
            },
            // pfcon still counts the path as linked (so its top folder is cleaned up).
            Resolved::Missing | Resolved::ThroughSymlink | Resolved::Special => {
                self.linked.insert(target);
                return Ok(None);
            }
        }
        self.linked.insert(target.clone());
        // A target above the link would be copied into itself.
        if dir.starts_with(&target) || is_cycle(chain, &target) {
            tracing::warn!(link = %link, target = %target, "link cycle, not expanding it");
            return Ok(None);
        }
        let name = expansion_name(&target);
        let dst = dir.child(&name).map_err(|e| {
            invalid_link(
                &link_name,
                format!("the directory it expands to, `{name}`: {e}"),
            )
        })?;
        let dst_abs = dst.under(self.incoming);
        match fs::symlink_metadata(&dst_abs) {
            // pfcon: "only copy once to a dest path".
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("read", dst_abs.display(), e)),
        }
        self.link_tree(&target.under(self.incoming), &dst_abs)?;
        self.summary.links_expanded += 1;
        self.copied.push(target.clone());
        let mut chain = chain.as_ref().clone();
        chain.push(target);
        Ok(Some(Pending {
            dir: dst,
            chain: Arc::new(chain),
        }))
    }

    /// Recreates the directory tree `src` at `dst` (which must not exist), hard-linking its
    /// regular files. Symlinks and special files are left behind.
    fn link_tree(&mut self, src: &Path, dst: &Path) -> Result<()> {
        let mut pending = vec![(src.to_path_buf(), dst.to_path_buf())];
        let mut modes = Vec::new();
        while let Some((from, to)) = pending.pop() {
            let meta =
                fs::symlink_metadata(&from).map_err(|e| Error::io("read", from.display(), e))?;
            fs::create_dir(&to).map_err(|e| Error::io("create directory", to.display(), e))?;
            // Kept writable by the owner: nested links are expanded and deleted inside it.
            modes.push((to.clone(), (meta.permissions().mode() & 0o777) | 0o700));
            let read = fs::read_dir(&from).map_err(|e| Error::io("list", from.display(), e))?;
            for item in read {
                let item = item.map_err(|e| Error::io("list", from.display(), e))?;
                let file_type = item
                    .file_type()
                    .map_err(|e| Error::io("read", item.path().display(), e))?;
                let target = to.join(item.file_name());
                if file_type.is_dir() {
                    pending.push((item.path(), target));
                } else if file_type.is_file() {
                    self.link_or_copy(&item.path(), &target)?;
                }
            }
        }
        for (dir, mode) in modes {
            fs::set_permissions(&dir, fs::Permissions::from_mode(mode))
                .map_err(|e| Error::io("set permissions", dir.display(), e))?;
        }
        Ok(())
    }

    fn link_or_copy(&mut self, src: &Path, dst: &Path) -> Result<()> {
        match fs::hard_link(src, dst) {
            Ok(()) => self.summary.files_linked += 1,
            Err(link_error) => {
                tracing::debug!(
                    src = %src.display(),
                    error = %link_error,
                    "hard link failed, copying"
                );
                fs::copy(src, dst).map_err(|e| Error::io("copy", src.display(), e))?;
                self.summary.files_copied += 1;
            }
        }
        Ok(())
    }

    /// pfcon removes each linked path's top-level folder unless that folder is itself a
    /// linked path: it was in the zip only to carry linked data.
    fn remove_linked_top_folders(&self) -> Result<()> {
        let tops: BTreeSet<StorePath> = self
            .linked
            .iter()
            .filter_map(|path| path.components().next())
            .filter_map(|top| StorePath::root().child(top).ok())
            .collect();
        for top in tops.into_iter().filter(|top| !self.linked.contains(top)) {
            let abs = top.under(self.incoming);
            let removed = match fs::symlink_metadata(&abs) {
                // remove_dir_all never follows symlinks inside the tree.
                Ok(meta) if meta.is_dir() => fs::remove_dir_all(&abs),
                Ok(_) => fs::remove_file(&abs),
                Err(e) => Err(e),
            };
            match removed {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("remove", abs.display(), e)),
            }
        }
        Ok(())
    }
}

/// What a store path leads to when walked one component at a time without following links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolved {
    Dir,
    File,
    Missing,
    ThroughSymlink,
    Special,
}

/// Looks `target` up below `root` component by component, so that a symlink anywhere on the
/// way is noticed rather than followed (`root` itself is trusted).
fn resolve(root: &Path, target: &StorePath) -> Result<Resolved> {
    let mut path = root.to_path_buf();
    let mut resolved = Resolved::Dir;
    for component in target.components() {
        if resolved != Resolved::Dir {
            return Ok(Resolved::Missing);
        }
        path.push(component);
        resolved = match fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => return Ok(Resolved::ThroughSymlink),
            Ok(meta) if meta.is_dir() => Resolved::Dir,
            Ok(meta) if meta.is_file() => Resolved::File,
            Ok(_) => Resolved::Special,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Resolved::Missing),
            Err(e) => return Err(Error::io("read", path.display(), e)),
        };
    }
    Ok(resolved)
}

/// True if expanding `target` could reach a link on `chain` again: it is one of the targets
/// (or inputs) this link was reached through, lies inside one, or contains one. pfcon only
/// tests "inside", by string prefix; containing is refused too, since such an expansion would
/// hold a copy of itself.
fn is_cycle(chain: &[StorePath], target: &StorePath) -> bool {
    chain
        .iter()
        .any(|seen| target.starts_with(seen) || seen.starts_with(target))
}

fn is_real_dir(path: &Path) -> Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(meta) => Ok(meta.is_dir()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io("read", path.display(), e)),
    }
}

/// Reads a link file's target, whitespace-trimmed, without following a symlink put in its
/// place and without reading more than a path's worth.
fn read_link_target(source: &Path, link: &str) -> Result<String> {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(source)
        .map_err(|e| Error::io("open", source.display(), e))?;
    let mut bytes = Vec::new();
    file.take(MAX_LINK_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io("read", source.display(), e))?;
    if bytes.len() as u64 > MAX_LINK_FILE_BYTES {
        return Err(invalid_link(
            link,
            format!(
                "the file is larger than {MAX_LINK_FILE_BYTES} bytes, too large to hold a path"
            ),
        ));
    }
    let text =
        String::from_utf8(bytes).map_err(|_| invalid_link(link, "the file is not UTF-8 text"))?;
    Ok(text.trim().to_owned())
}

/// pfcon's name for the directory a link expands to: the target path with `/` turned into `_`.
fn expansion_name(target: &StorePath) -> String {
    target.as_str().replace('/', "_")
}

fn invalid_link(link: &str, reason: impl Into<String>) -> Error {
    Error::InvalidLink {
        link: link.to_owned(),
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, symlink};

    fn sp(raw: &str) -> StorePath {
        StorePath::from_api(raw).unwrap()
    }

    fn write(root: &Path, rel: &str, content: &str) {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
    }

    fn paths(walk: TreeWalk) -> Vec<String> {
        walk.map(|w| match w.unwrap() {
            Walked::Entry(e) => e.path.as_str().to_owned(),
            Walked::Skipped { path, .. } => format!("skip:{}", path.as_str()),
        })
        .collect()
    }

    fn entry(walk: TreeWalk, path: &str) -> TreeEntry {
        walk.map(Result::unwrap)
            .find_map(|w| match w {
                Walked::Entry(e) if e.path.as_str() == path => Some(e),
                _ => None,
            })
            .unwrap()
    }

    /// The layout of pfcon's `test_copy_with_chris_links` (tests/test_resources_fslink.py).
    fn pfcon_store(root: &Path) {
        write(root, "home/foo/feed/input/test.txt", "Test file");
        fs::create_dir_all(root.join("home/foo/feed/output")).unwrap();
        write(root, "PIPELINES/bob/pipeline.yml", "Test pipeline");
        write(root, "home/bob/PIPELINES_bob.chrislink", "PIPELINES/bob");
        write(root, "home/foo/feed/input/home_bob.chrislink", "home/bob");
    }

    const INPUT: &str = "home/foo/feed/input";
    const OUTPUT: &str = "home/foo/feed/output";

    #[test]
    fn pfcon_two_level_links() {
        let store = tempfile::tempdir().unwrap();
        let root = store.path();
        pfcon_store(root);
        let (walk, counts) = walk_job_inputs_with_counts(root, &[sp(INPUT)], &sp(OUTPUT)).unwrap();
        assert_eq!(
            paths(walk),
            [
                "home_bob",
                "home_bob/PIPELINES_bob",
                "home_bob/PIPELINES_bob/pipeline.yml",
                "test.txt"
            ]
        );
        assert_eq!(
            (
                counts.files(),
                counts.links_expanded(),
                counts.links_skipped()
            ),
            (2, 2, 0)
        );
        let yml = entry(
            walk_job_inputs(root, &[sp(INPUT)], &sp(OUTPUT)).unwrap(),
            "home_bob/PIPELINES_bob/pipeline.yml",
        );
        assert_eq!(yml.source, root.join("PIPELINES/bob/pipeline.yml"));
        assert_eq!(yml.kind, EntryKind::File { size: 13 });
        let dir = entry(
            walk_job_inputs(root, &[sp(INPUT)], &sp(OUTPUT)).unwrap(),
            "home_bob",
        );
        assert_eq!(
            (dir.kind, dir.source),
            (EntryKind::Directory, root.join("home/bob"))
        );
    }

    #[test]
    fn link_cycle_terminates() {
        let store = tempfile::tempdir().unwrap();
        let root = store.path();
        write(root, "in/to_a.chrislink", "data/a");
        write(root, "data/a/f1", "1");
        write(root, "data/a/to_b.chrislink", "data/ab");
        write(root, "data/ab/f2", "2");
        write(root, "data/ab/to_a.chrislink", "data/a\n");
        write(root, "data/ab/up.chrislink", "data");
        // `data/ab` is not inside `data/a`: a string-prefix check (pfcon's) would drop it.
        let walked = paths(walk_job_inputs(root, &[sp("in")], &sp("out")).unwrap());
        assert_eq!(
            walked,
            [
                "data_a",
                "data_a/data_ab",
                "data_a/data_ab/f2",
                "skip:data_a/data_ab/to_a.chrislink",
                "skip:data_a/data_ab/up.chrislink",
                "data_a/f1"
            ]
        );
        // A link back into its own input is not expanded again.
        write(root, "self/sub/back.chrislink", "self");
        let walked = paths(walk_job_inputs(root, &[sp("self")], &sp("out")).unwrap());
        assert_eq!(walked, ["sub", "skip:sub/back.chrislink"]);
    }

    #[test]
    fn links_to_output_or_its_ancestors_are_refused() {
        for target in [
            OUTPUT,
            "home/foo/feed/output/",
            "home/foo/feed",
            "home",
            "",
            "/",
        ] {
            let store = tempfile::tempdir().unwrap();
            let root = store.path();
            pfcon_store(root);
            write(root, "home/foo/feed/input/bad.chrislink", target);
            let Err(Error::InvalidLink { link, reason }) =
                walk_job_inputs(root, &[sp(INPUT)], &sp(OUTPUT))
            else {
                panic!("link to `{target}` was accepted");
            };
            assert_eq!(link, "home/foo/feed/input/bad.chrislink");
            assert!(reason.contains(OUTPUT_ANCESTOR), "{reason}");
        }
        // Met deep inside an expansion, the error ends the walk.
        let store = tempfile::tempdir().unwrap();
        let root = store.path();
        pfcon_store(root);
        write(root, "PIPELINES/bob/sneaky.chrislink", "home/foo");
        let items: Vec<_> = walk_job_inputs(root, &[sp(INPUT)], &sp(OUTPUT))
            .unwrap()
            .collect();
        assert_eq!(items.len(), 2);
        assert!(matches!(items[0], Ok(Walked::Entry(ref e)) if e.path.as_str() == "home_bob"));
        assert!(matches!(
            &items[1],
            Err(Error::InvalidLink { link, .. }) if link == "PIPELINES/bob/sneaky.chrislink"
        ));
        // A sibling whose name merely starts like the output is fine.
        let store = tempfile::tempdir().unwrap();
        let root = store.path();
        pfcon_store(root);
        write(root, "home/foo/feed/out/x", "x");
        write(root, "home/foo/feed/input/l.chrislink", "home/foo/feed/out");
        let walked = paths(walk_job_inputs(root, &[sp(INPUT)], &sp("home/foo/feed/outx")).unwrap());
        assert!(walked.contains(&"home_foo_feed_out/x".to_owned()));
    }

    #[test]
    fn missing_target_is_skipped() {
        let store = tempfile::tempdir().unwrap();
        let root = store.path();
        write(root, "in/sub/gone.chrislink", "nowhere/x");
        write(root, "in/sub/kept", "k");
        let (walk, counts) = walk_job_inputs_with_counts(root, &[sp("in")], &sp("out")).unwrap();
        let items: Vec<_> = walk.map(Result::unwrap).collect();
        assert_eq!(
            items[1],
            Walked::Skipped {
                path: sp("sub/gone.chrislink"),
                reason: "link target does not exist"
            }
        );
        assert_eq!(items.len(), 3);
        assert_eq!((counts.files(), counts.links_skipped()), (1, 1));
    }

    #[test]
    fn file_link_uses_parent_dir_and_only_that_file() {
        let store = tempfile::tempdir().unwrap();
        let root = store.path();
        write(root, "data/dir/file.txt", "f");
        write(root, "data/dir/other.txt", "secret sibling");
        write(root, "data/dir/more.txt", "m");
        write(root, "in/a.chrislink", "data/dir/file.txt");
        write(root, "in/b.chrislink", "data/dir/more.txt");
        let walked = paths(walk_job_inputs(root, &[sp("in")], &sp("out")).unwrap());
        assert_eq!(
            walked,
            ["data_dir", "data_dir/file.txt", "data_dir/more.txt"]
        );
    }

    #[test]
    fn input_dirs_merge_first_wins() {
        let store = tempfile::tempdir().unwrap();
        let root = store.path();
        write(root, "in1/common.txt", "1");
        write(root, "in1/d/a", "a");
        write(root, "in1/clash", "file wins");
        write(root, "in2/common.txt", "2");
        write(root, "in2/d/b", "b");
        write(root, "in2/clash/hidden", "under a dir that lost");
        write(root, "in2/only2", "o");
        write(root, "in2/home_bob/real", "real");
        write(root, "in2/l.chrislink", "home/bob");
        write(root, "home/bob/linked", "l");
        write(root, "single/file.txt", "f");
        let inputs = [sp("in1"), sp("in2"), sp("single/file.txt"), sp("absent")];
        let walked = paths(walk_job_inputs(root, &inputs, &sp("out")).unwrap());
        assert_eq!(
            walked,
            [
                "clash",
                "common.txt",
                "d",
                "d/a",
                "d/b",
                "file.txt",
                "home_bob",
                "home_bob/real",
                "skip:l.chrislink",
                "only2"
            ]
        );
        let common = entry(
            walk_job_inputs(root, &inputs, &sp("out")).unwrap(),
            "common.txt",
        );
        assert_eq!(common.source, root.join("in1/common.txt"));
    }

    #[test]
    fn walks_are_deterministic() {
        let store = tempfile::tempdir().unwrap();
        let root = store.path();
        pfcon_store(root);
        for name in ["z", "b", "m", "a", "é", "B"] {
            write(root, &format!("home/foo/feed/input/{name}/f"), name);
            write(root, &format!("PIPELINES/bob/{name}"), name);
        }
        let first: Vec<_> = walk_job_inputs(root, &[sp(INPUT)], &sp(OUTPUT))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let second: Vec<_> = walk_job_inputs(root, &[sp(INPUT)], &sp(OUTPUT))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(first, second);
        // Every directory precedes its children.
        let mut seen = BTreeSet::new();
        for item in &first {
            if let Walked::Entry(e) = item {
                if let Some(parent) = e.path.parent() {
                    assert!(parent.is_root() || seen.contains(&parent), "{:?}", e.path);
                }
                seen.insert(e.path.clone());
            }
        }
    }

    #[test]
    fn symlinks_are_never_followed() {
        let store = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        write(outside.path(), "secret", "s");
        let root = store.path();
        write(root, "in/plain", "p");
        symlink(outside.path(), root.join("in/escape")).unwrap();
        write(root, "real/data/x", "x");
        symlink(root.join("real"), root.join("alias")).unwrap();
        write(root, "in/via_alias.chrislink", "alias/data");
        write(root, "elsewhere/pointer", "real/data");
        symlink(
            root.join("elsewhere/pointer"),
            root.join("in/sym.chrislink"),
        )
        .unwrap();
        let (walk, counts) = walk_job_inputs_with_counts(root, &[sp("in")], &sp("out")).unwrap();
        let items: Vec<_> = walk.map(Result::unwrap).collect();
        assert_eq!(
            items
                .iter()
                .map(|w| format!("{w:?}"))
                .filter(|d| d.contains("secret"))
                .count(),
            0
        );
        let skipped: Vec<_> = items
            .iter()
            .filter_map(|w| match w {
                Walked::Skipped { path, reason } => Some((path.as_str(), *reason)),
                Walked::Entry(_) => None,
            })
            .collect();
        assert_eq!(
            skipped,
            [
                ("escape", "symlinks are not sent"),
                ("sym.chrislink", "symlinks are not sent"),
                ("via_alias.chrislink", SKIP_SYMLINK)
            ]
        );
        assert_eq!(counts.files(), 1);
        // An input dir reached through a symlink is refused outright.
        assert!(matches!(
            walk_job_inputs(root, &[sp("alias/data")], &sp("out")),
            Err(Error::InvalidArgument { .. })
        ));
    }

    #[test]
    fn dot_dot_targets_are_refused() {
        let store = tempfile::tempdir().unwrap();
        let root = store.path();
        write(root, "in/up.chrislink", "../etc");
        let result = walk_job_inputs(root, &[sp("in")], &sp("out"));
        assert!(
            matches!(result, Err(Error::InvalidLink { ref link, .. }) if link == "in/up.chrislink")
        );

        for target in ["../x", "a/../../x", "/etc", ""] {
            let incoming = tempfile::tempdir().unwrap();
            write(incoming.path(), "x/f", "f");
            write(incoming.path(), "sub/up.chrislink", target);
            let result = expand_in_place(incoming.path());
            let refused = matches!(
                result,
                Err(Error::InvalidLink { ref link, .. }) if link == "sub/up.chrislink"
            );
            assert!(refused, "{target}: {result:?}");
        }
    }

    fn tree_of(root: &Path) -> Vec<String> {
        let walk = crate::tree::walk_dir(root, StorePath::root(), WalkOptions::default()).unwrap();
        paths(walk)
    }

    #[test]
    fn expand_in_place_zipfile_tree() {
        let incoming = tempfile::tempdir().unwrap();
        let root = incoming.path();
        // What CUBE zips: the input's files at the root, linked data at its full path.
        write(root, "test.txt", "Test file");
        write(root, "home_bob.chrislink", "home/bob\n");
        write(root, "home/bob/PIPELINES_bob.chrislink", "PIPELINES/bob");
        write(root, "PIPELINES/bob/pipeline.yml", "Test pipeline");
        let summary = expand_in_place(root).unwrap();
        assert_eq!(
            tree_of(root),
            [
                "home_bob",
                "home_bob/PIPELINES_bob",
                "home_bob/PIPELINES_bob/pipeline.yml",
                "test.txt"
            ]
        );
        assert_eq!((summary.links_removed, summary.links_expanded), (3, 2));
        assert_eq!(summary.files_linked + summary.files_copied, 2);
        let yml = fs::metadata(root.join("home_bob/PIPELINES_bob/pipeline.yml")).unwrap();
        assert_eq!(yml.nlink(), 1, "the full-path copy was removed");
    }

    #[test]
    fn expand_in_place_cycles_and_symlinks() {
        let incoming = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        write(outside.path(), "secret", "s");
        let root = incoming.path();
        write(root, "start.chrislink", "data/a");
        write(root, "data/a/f1", "1");
        write(root, "data/a/to_b.chrislink", "data/b");
        write(root, "data/b/f2", "2");
        write(root, "data/b/to_a.chrislink", "data/a");
        symlink(outside.path(), root.join("data/b/escape")).unwrap();
        symlink(outside.path(), root.join("data/c")).unwrap();
        write(root, "via.chrislink", "data/c");
        let summary = expand_in_place(root).unwrap();
        assert_eq!(
            tree_of(root),
            ["data_a", "data_a/data_b", "data_a/data_b/f2", "data_a/f1"]
        );
        assert!(fs::read_dir(outside.path()).unwrap().count() == 1);
        assert_eq!(summary.links_expanded, 2);
    }
}
