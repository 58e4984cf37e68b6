//! Arbitrary bytes as an archive entry name (`StorePath::from_archive`), and, when they are
//! UTF-8, as an API path (`StorePath::from_api`).
//!
//! Must hold: no panic; an accepted path is not absolute, has no empty, `.` or `..`
//! component, no trailing `/`, no NUL, fits `MAX_PATH_BYTES`, stays under any base it is
//! joined to, parses again to itself, and its parents are its prefixes down to the root.

#![no_main]

use std::path::Path;

use dispatch_broker::StorePath;
use dispatch_broker::path::MAX_PATH_BYTES;
use libfuzzer_sys::fuzz_target;

fn check(p: &StorePath, raw: &[u8]) {
    let s = p.as_str();
    assert!(!s.starts_with('/'), "{raw:?} gave absolute {s:?}");
    assert!(!s.ends_with('/'), "{raw:?} gave {s:?} with a trailing /");
    assert!(!s.contains('\0'), "{raw:?} gave {s:?} with a NUL");
    assert!(s.len() <= MAX_PATH_BYTES, "{raw:?} gave {} bytes", s.len());
    assert_eq!(p.is_root(), s.is_empty());
    if !s.is_empty() {
        for c in s.split('/') {
            assert!(
                !c.is_empty() && c != "." && c != "..",
                "{raw:?} gave {s:?} with component {c:?}"
            );
        }
    }
    let base = Path::new("/base");
    let joined = p.under(base);
    assert!(
        joined.starts_with(base),
        "{s:?} leaves its base: {joined:?}"
    );
    assert_eq!(
        joined.components().count(),
        base.components().count() + p.components().count(),
        "{s:?} joined to a base is not one component per store component"
    );
    let again = StorePath::from_archive(s.as_bytes()).expect("a normalised path parses again");
    assert_eq!(&again, p, "normalising {raw:?} is not idempotent");

    let mut at = p.clone();
    let mut steps = 0;
    while let Some(parent) = at.parent() {
        assert!(
            at.starts_with(&parent),
            "{at:?} is not below its parent {parent:?}"
        );
        assert!(parent.as_str().len() < at.as_str().len());
        at = parent;
        steps += 1;
        assert!(
            steps <= MAX_PATH_BYTES,
            "parent chain of {s:?} does not end"
        );
    }
    assert!(at.is_root());
}

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = StorePath::from_archive(data) {
        assert!(
            !data.starts_with(b"/"),
            "absolute {data:?} accepted from an archive"
        );
        check(&p, data);
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(p) = StorePath::from_api(text)
    {
        check(&p, data);
    }
});
