//! Arbitrary bytes as a tar stream into a fresh root.
//!
//! Input: two control bytes (see `dispatch_fuzz::Plan`: how the stream is cut into pieces,
//! whether the decoder is saved and resumed between pieces, whether header checksums are
//! fixed up first), then the stream.
//!
//! Must hold whatever the bytes: no panic; nothing created next to the root; every symlink
//! relative, without `..`, and resolving inside the root; no hard link to a file outside;
//! `feed` consumes every byte it is given; a state saved between pieces resumes. Once the
//! end marker is read, the recorded directory mtimes are applied (`set_dir_times`), as the
//! receiver does.

#![no_main]

use std::fs;

use dispatch_broker::extract::ExtractRoot;
use dispatch_broker::tar_decode::{ArchiveLimits, TarDecoder, set_dir_times};
use dispatch_fuzz::{Plan, assert_confined, assert_only, control_and_stream, fix_checksums};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((control, stream)) = control_and_stream(data) else {
        return;
    };
    let plan = Plan::new(control);
    let mut stream = stream.to_vec();
    if plan.fix_checksums {
        fix_checksums(&mut stream);
    }
    let tmp = tempfile::tempdir().expect("create a scratch directory");
    let root = tmp.path().join("root");
    fs::create_dir(&root).expect("create the root");
    let limits = ArchiveLimits::default();

    let mut decoder = TarDecoder::new(ExtractRoot::new(root.clone()), limits);
    // Directory mtimes are not part of the saved state: collect them before every drop,
    // as the receiver does at each checkpoint.
    let mut dir_times = Vec::new();
    let mut fed = 0u64;
    for piece in plan.pieces(&stream) {
        if decoder.feed(piece).is_err() {
            break;
        }
        fed += piece.len() as u64;
        assert_eq!(
            decoder.state().offset,
            fed,
            "feed did not consume its input"
        );
        if plan.resume_between_pieces {
            let state = decoder.state().clone();
            let finished = decoder.is_finished();
            dir_times.extend(decoder.take_dir_times());
            drop(decoder);
            decoder = match TarDecoder::resume(state, ExtractRoot::new(root.clone()), limits) {
                Ok(decoder) => decoder,
                Err(e) => panic!("a state saved between two feeds does not resume: {e}"),
            };
            assert_eq!(decoder.is_finished(), finished);
        }
    }
    let finished = decoder.is_finished();
    dir_times.extend(decoder.take_dir_times());
    drop(decoder);
    if finished {
        // What the receiver does once the whole tree is in place.
        let _ = set_dir_times(&root, dir_times);
    }

    assert_only(tmp.path(), &["root"]);
    assert_confined(&root);
});
