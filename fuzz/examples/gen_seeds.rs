//! Writes the seed corpus under `fuzz/seeds/`: small tar archives built with the `tar`
//! crate (well-formed ones, and a few hostile ones libFuzzer would take long to find), in
//! the input formats of each fuzz target.
//!
//! Run with `cargo run --manifest-path fuzz/Cargo.toml --example gen_seeds` (the seeds are
//! committed; rerun only to change them). Output is deterministic.

use std::fs;
use std::io::Write;
use std::path::Path;

fn header(kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(if kind == tar::EntryType::Directory {
        0o755
    } else {
        0o644
    });
    h.set_mtime(1_700_000_000);
    h
}

fn archive(build: impl FnOnce(&mut tar::Builder<&mut Vec<u8>>)) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut b = tar::Builder::new(&mut out);
        build(&mut b);
        b.finish().expect("finish the archive");
    }
    out
}

fn file(b: &mut tar::Builder<&mut Vec<u8>>, name: &str, data: &[u8]) {
    b.append_data(
        &mut header(tar::EntryType::Regular, data.len() as u64),
        name,
        data,
    )
    .expect("append a file");
}

fn link(b: &mut tar::Builder<&mut Vec<u8>>, kind: tar::EntryType, name: &str, target: &str) {
    b.append_link(&mut header(kind, 0), name, target)
        .expect("append a link");
}

/// An entry whose name and link name are written as raw bytes, bypassing the `tar` crate's
/// own refusal of `..` and absolute names.
fn raw(b: &mut tar::Builder<&mut Vec<u8>>, kind: tar::EntryType, name: &[u8], target: &[u8]) {
    let mut h = header(kind, 0);
    let old = h.as_old_mut();
    old.name[..name.len()].copy_from_slice(name);
    old.linkname[..target.len()].copy_from_slice(target);
    h.set_cksum();
    b.append(&h, &b""[..]).expect("append a raw entry");
}

fn pax(b: &mut tar::Builder<&mut Vec<u8>>, records: &[(&str, &str)]) {
    let mut body = String::new();
    for (key, value) in records {
        let record = format!(" {key}={value}\n");
        // The length counts its own digits.
        let mut len = record.len() + 1;
        while format!("{len}").len() + record.len() != len {
            len += 1;
        }
        body.push_str(&format!("{len}{record}"));
    }
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::XHeader);
    h.set_size(body.len() as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, "PaxHeaders/entry", body.as_bytes())
        .expect("append a PAX header");
}

fn archives() -> Vec<(&'static str, Vec<u8>)> {
    let long_name = format!("dir/{}/file.txt", "n".repeat(180));
    let long_target = format!("sub/{}", "t".repeat(150));
    vec![
        ("file", archive(|b| file(b, "a.txt", b"hello\n"))),
        (
            "dir",
            archive(|b| {
                b.append_data(&mut header(tar::EntryType::Directory, 0), "d/", &b""[..])
                    .expect("append a directory");
                file(b, "d/f", b"in d");
            }),
        ),
        ("gnu_long_name", archive(|b| file(b, &long_name, b"long"))),
        (
            "pax",
            archive(|b| {
                pax(
                    b,
                    &[("path", &format!("p/{}", "x".repeat(120))), ("size", "3")],
                );
                file(b, "short", b"pax");
            }),
        ),
        (
            "symlink",
            archive(|b| {
                file(b, "sub/target", b"t");
                link(b, tar::EntryType::Symlink, "alias", "sub/target");
                link(b, tar::EntryType::Symlink, "long_alias", &long_target);
            }),
        ),
        (
            "hardlink",
            archive(|b| {
                file(b, "a.txt", b"shared");
                link(b, tar::EntryType::Link, "b.txt", "a.txt");
            }),
        ),
        (
            "hostile_names",
            archive(|b| {
                raw(b, tar::EntryType::Regular, b"../escape", b"");
                raw(b, tar::EntryType::Regular, b"/abs", b"");
            }),
        ),
        // One refusal each: the decoder stops at the first.
        (
            "symlink_up",
            archive(|b| raw(b, tar::EntryType::Symlink, b"up", b"../..")),
        ),
        (
            "symlink_absolute",
            archive(|b| raw(b, tar::EntryType::Symlink, b"abs", b"/etc")),
        ),
        (
            "hardlink_up",
            archive(|b| {
                file(b, "real", b"r");
                raw(b, tar::EntryType::Link, b"hard", b"../real");
            }),
        ),
        (
            "write_through_symlink",
            archive(|b| {
                b.append_data(&mut header(tar::EntryType::Directory, 0), "sub/", &b""[..])
                    .expect("append a directory");
                link(b, tar::EntryType::Symlink, "dirlink", "sub");
                file(b, "dirlink/through", b"x");
            }),
        ),
    ]
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::create_dir_all(dir).expect("create a seed directory");
    let mut f = fs::File::create(dir.join(name)).expect("create a seed");
    f.write_all(bytes).expect("write a seed");
}

fn main() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let archives = archives();

    // tar_decode: two control bytes, then the stream. Vary the cut across seeds.
    let controls: [[u8; 2]; 4] = [[0, 0], [8 | 1, 3], [2, 40], [8 | 4 | 2, 128]];
    for (i, (name, tar)) in archives.iter().enumerate() {
        let mut input = controls[i % controls.len()].to_vec();
        input.extend_from_slice(tar);
        write(&seeds.join("tar_decode"), &format!("{name}.bin"), &input);
    }

    // receiver_chunk: flags, declared length, offset, body.
    let chunk = |flags: u8, declared: u32, body: &[u8]| {
        let mut input = vec![flags];
        input.extend_from_slice(&declared.to_le_bytes());
        input.extend_from_slice(&0u64.to_le_bytes());
        input.extend_from_slice(body);
        input
    };
    let gzip = |bytes: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).expect("compress");
        e.finish().expect("compress")
    };
    let out = seeds.join("receiver_chunk");
    for (name, tar) in archives
        .iter()
        .filter(|(n, _)| ["file", "symlink", "hardlink"].contains(n))
    {
        let len = tar.len() as u32;
        // Hostile mode, one gzip chunk of 4096 bytes, honest checksum.
        write(
            &out,
            &format!("gzip_{name}.bin"),
            &chunk(1 << 2, len, &gzip(tar)),
        );
        // Honest sender, 512-byte gzip chunks, reopened between chunks.
        write(
            &out,
            &format!("honest_{name}.bin"),
            &chunk(0x80 | 0x20 | 1, 0, tar),
        );
    }
    // Honest sender, uncompressed, one chunk tampered with.
    write(
        &out,
        "honest_tampered.bin",
        &chunk(1 | 2 | 0x10, 0x0000_0301, &archives[0].1),
    );

    // Regressions: inputs that crashed a target, kept so a fix can be checked with
    // `scripts/fuzz.sh TARGET 0 -- FILE`. Not part of the fuzzing corpus while they crash.
    let regressions = seeds.join("regressions");
    // An mtime past what `SystemTime` holds (base-256 field): `UNIX_EPOCH + Duration`
    // panics, for a file in `TarDecoder::finish_file`, for a directory in `set_dir_times`.
    let far_future = |kind: tar::EntryType, name: &str| {
        let mut h = header(kind, 0);
        h.set_mtime(u64::MAX);
        archive(|b| b.append_data(&mut h, name, &b""[..]).expect("append"))
    };
    let file_mtime = far_future(tar::EntryType::Regular, "f");
    let dir_mtime = far_future(tar::EntryType::Directory, "d/");
    // A link whose header declares u64::MAX bytes of data to skip: rounding the size up to
    // whole blocks in `TarDecoder::skip_data` overflows (a panic with overflow checks, a
    // skip of 0 bytes without them).
    let huge_skip = archive(|b| {
        let mut h = header(tar::EntryType::Symlink, 0);
        h.set_size(u64::MAX);
        h.set_link_name("t").expect("link name");
        h.set_path("l").expect("path");
        h.set_cksum();
        b.append(&h, &b""[..]).expect("append");
    });
    for (name, tar) in [
        ("mtime_overflow", &file_mtime),
        ("dir_mtime_overflow", &dir_mtime),
        ("skip_size_overflow", &huge_skip),
    ] {
        let mut input = vec![0, 0];
        input.extend_from_slice(tar);
        write(
            &regressions.join("tar_decode"),
            &format!("{name}.bin"),
            &input,
        );
        // The same stream through the receiver, as an honest sender would send it.
        write(
            &regressions.join("receiver_chunk"),
            &format!("{name}.bin"),
            &chunk(1, 0, tar),
        );
    }

    // store_path: names.
    let out = seeds.join("store_path");
    for (i, name) in [
        &b"a/b/c"[..],
        b"./a//b/./c/",
        b"../x",
        b"/etc/passwd",
        b"a\0b",
        b"\xffname",
        b".",
        "é/ü".as_bytes(),
    ]
    .iter()
    .enumerate()
    {
        write(&out, &format!("name_{i}.bin"), name);
    }
}
