//! Job ids and labels as names Kubernetes accepts.
//!
//! A job id (up to 128 characters of `[A-Za-z0-9_.-]`) is not always a DNS-1123 label,
//! which a Job's name must be (63 characters at most, since the name goes in its pods'
//! `job-name` label), and a JobRequest's labels are not always valid label keys and
//! values. Each is mapped to a valid one, with a hash of the original when the mapping
//! changed it, so two ids never share a name; the exact originals are kept in
//! annotations ([`ANNOTATION_JOB_ID`], [`ANNOTATION_LABELS`]).

use sha2::{Digest, Sha256};

/// Annotation holding the exact job id.
pub const ANNOTATION_JOB_ID: &str = "org.chrisproject.dispatch/job-id";
/// Annotation holding every label of the JobRequest, exactly, as a JSON object.
pub const ANNOTATION_LABELS: &str = "org.chrisproject.dispatch/labels";
/// Annotation set by `kill`: when the manager stopped the job.
pub const ANNOTATION_KILLED_AT: &str = "org.chrisproject.dispatch/killed-at";
/// Annotation set by `kill`: the job's log as it was when it was stopped (its pods, and
/// so the log Kubernetes keeps, go away with the stop).
pub const ANNOTATION_LOG_SNAPSHOT: &str = "org.chrisproject.dispatch/log-snapshot";

/// Longest DNS-1123 label, and longest label name or value.
const MAX_LABEL: usize = 63;
/// Hex digits of the hash appended to a changed name.
const HASH_DIGITS: usize = 10;

/// Whether `name` is a DNS-1123 label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63.
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_LABEL
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Whether `value` is a valid label value: empty, or at most 63 of
/// `[A-Za-z0-9_.-]`, starting and ending alphanumeric.
pub fn is_label_value(value: &str) -> bool {
    value.is_empty()
        || (value.len() <= MAX_LABEL
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && value.starts_with(|c: char| c.is_ascii_alphanumeric())
            && value.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

/// Whether `key` is a valid label (or annotation) key: `[prefix/]name`, the prefix a
/// DNS-1123 subdomain of at most 253, the name a non-empty label value.
pub fn is_label_key(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| p.len() <= 253 && p.split('.').all(is_dns_label));
    prefix_ok && !name.is_empty() && is_label_value(name)
}

/// A short hash of `text`, to tell apart names that mapping made equal.
fn short_hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()[..HASH_DIGITS]
        .to_owned()
}

/// The Job's name for `job_id`: the id itself when it is a DNS-1123 label, else the id
/// lowercased with other characters as `-`, cut, and a hash of the exact id appended.
pub fn job_name(job_id: &str) -> String {
    if is_dns_label(job_id) {
        return job_id.to_owned();
    }
    let mapped: String = job_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let mut stem: String = mapped.trim_matches('-').to_owned();
    stem.truncate(MAX_LABEL - HASH_DIGITS - 1);
    let stem = stem.trim_end_matches('-');
    let hash = short_hash(job_id);
    if stem.is_empty() {
        format!("j-{hash}")
    } else {
        format!("{stem}-{hash}")
    }
}

/// `value` as a label value: itself when valid, else with other characters as `-`,
/// cut, and a hash of the original appended.
pub fn label_value(value: &str) -> String {
    if is_label_value(value) {
        return value.to_owned();
    }
    let mapped: String = value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut stem: String = mapped
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned();
    stem.truncate(MAX_LABEL - HASH_DIGITS - 1);
    let stem = stem.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    let hash = short_hash(value);
    if stem.is_empty() {
        hash
    } else {
        format!("{stem}-{hash}")
    }
}

/// `key` as a label key: itself when valid, else its name part mapped as a value (no
/// prefix), so `team name` becomes `team-name-<hash>`.
pub fn label_key(key: &str) -> String {
    if is_label_key(key) {
        return key.to_owned();
    }
    let mapped = label_value(key);
    if mapped.is_empty() {
        format!("x-{}", short_hash(key))
    } else {
        mapped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dns_label_id_is_its_own_name() {
        assert_eq!(job_name("chris-jid-42"), "chris-jid-42");
        assert_eq!(job_name("7"), "7");
    }

    #[test]
    fn other_ids_map_to_distinct_valid_names() {
        let ids = [
            "Chris_JID.42",
            "chris-jid-42-", // not a label: ends with `-`
            "chris_jid_42",
            "chris.jid.42",
            "CHRIS-JID-42",
            &"x".repeat(128),
            &format!("{}y", "x".repeat(127)),
            "_.-",
            "a.b",
        ];
        let names: Vec<String> = ids.iter().map(|id| job_name(id)).collect();
        for (id, name) in ids.iter().zip(&names) {
            assert!(is_dns_label(name), "{id} -> {name}");
        }
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "{names:?}");
        assert!(names[0].starts_with("chris-jid-42-"), "{}", names[0]);
    }

    #[test]
    fn label_values_and_keys_are_made_valid() {
        assert_eq!(label_value("site-a"), "site-a");
        assert_eq!(label_value(""), "");
        assert_eq!(label_value("Chris_JID.42"), "Chris_JID.42");
        for bad in [
            "a b",
            "-lead",
            "trail.",
            "ü",
            &"v".repeat(64),
            "with/slash",
            "x=y",
        ] {
            let value = label_value(bad);
            assert!(
                is_label_value(&value) && !value.is_empty(),
                "{bad} -> {value}"
            );
            assert_ne!(value, bad);
        }
        assert_ne!(label_value("a b"), label_value("a-b"));
        for good in [
            "org.chrisproject.dispatch.job-id",
            "example.org/team",
            "app",
        ] {
            assert_eq!(label_key(good), good);
        }
        for bad in [
            "team name",
            "Example.org/team",
            "a/b/c",
            "/x",
            "x/",
            "",
            &"k".repeat(70),
        ] {
            let key = label_key(bad);
            assert!(is_label_key(&key), "{bad:?} -> {key}");
        }
        assert!(label_key("team name").starts_with("team-name-"));
    }
}
