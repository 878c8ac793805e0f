//! The fuzz targets' bodies (`fuzz/fuzz_targets/bodies.rs`) on stable, in
//! `make test`: each runs on seeded random inputs, on mutations of valid
//! encodings, and on every input kept in `fuzz/regressions/<target>/` (the
//! crashers `make fuzz` found, kept as regression tests). A panic fails.

use std::path::Path;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use soma_chain::{ChainBuilder, ChainConfig};

#[path = "../fuzz/fuzz_targets/bodies.rs"]
mod bodies;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 5] = [
    ("decode_block", bodies::decode_block),
    ("decode_commit", bodies::decode_commit),
    ("node_infos", bodies::node_infos),
    ("proto_conversions", bodies::proto_conversions),
    ("commit_batch", bodies::commit_batch),
];

/// A chain signed with the keys of the bodies' committee, so that what it
/// holds verifies there.
fn chain() -> soma_chain::Chain {
    // The chain takes (network, protocol) pairs.
    let keys = (0..4u8)
        .map(|i| {
            let (protocol, network) = bodies::keys(i);
            (network, protocol)
        })
        .collect();
    let chain = ChainBuilder::new(ChainConfig {
        keys: Some(Arc::new(keys)),
        ..ChainConfig::validators(4)
    })
    .build(12);
    assert_eq!(chain.genesis(), &bodies::committee());
    chain
}

/// Valid inputs of each target, made from [`chain`]: a block, a commit,
/// two signed node infos, a certified batch of commits (its first byte the
/// number of commits), and a FetchCommits answer. These are the seeds kept
/// in `fuzz/regressions/<target>/seed-*`.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let chain = chain();
    let last = (1..=12)
        .rev()
        .find(|&i| !chain.certificate(i).is_empty())
        .expect("a certified commit");
    let commits: Vec<Vec<u8>> = (1..=last)
        .map(|i| chain.commit(i).serialized().to_vec())
        .collect();
    let certifiers: Vec<Vec<u8>> = chain
        .certificate(last)
        .iter()
        .map(|b| b.serialized().to_vec())
        .collect();
    let mut batch = vec![u8::try_from(commits.len()).unwrap()];
    let parts: Vec<&[u8]> = commits
        .iter()
        .chain(&certifiers)
        .map(Vec::as_slice)
        .collect();
    batch.extend(bodies::join(&parts));
    let infos: Vec<Vec<u8>> = (0..2u8)
        .map(|i| {
            let info = soma_types::NodeInfo {
                peer_id: soma_types::PeerId::from(bodies::keys(i).1.public()),
                addresses: vec![format!("198.51.100.{}:7000", i + 1)],
                timestamp_ms: bodies::NOW_MS,
                access: soma_types::Access::Public,
            };
            let signed = soma_types::SignedNodeInfo::sign(info, &bodies::keys(i).1);
            soma_types::codec::encode(&signed)
        })
        .collect();
    let info_parts: Vec<&[u8]> = infos.iter().map(Vec::as_slice).collect();
    let answer = soma_wire::proto::FetchCommitsResponse {
        commits: commits
            .iter()
            .map(|c| bytes::Bytes::from(c.clone()))
            .collect(),
        certifier_blocks: certifiers
            .iter()
            .map(|c| bytes::Bytes::from(c.clone()))
            .collect(),
    };
    vec![
        ("decode_block", chain.blocks_of(1)[0].serialized().to_vec()),
        ("decode_commit", commits[0].clone()),
        ("node_infos", bodies::join(&info_parts)),
        ("commit_batch", batch),
        ("proto_conversions", prost::Message::encode_to_vec(&answer)),
    ]
}

#[test]
fn fuzz_bodies_survive_random_and_mutated_inputs() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let seeds = seeds();
    for (name, target) in TARGETS {
        for _ in 0..1_000 {
            let len = rng.random_range(0..1_024);
            let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            target(&data);
        }
        for (_, seed) in seeds.iter().filter(|(n, _)| *n == name) {
            target(seed);
            for _ in 0..200 {
                let mut data = seed.clone();
                for _ in 0..rng.random_range(1..4) {
                    let i = rng.random_range(0..data.len());
                    data[i] = rng.random();
                }
                let cut = rng.random_range(0..=data.len());
                target(&data[..cut]);
                target(&data);
            }
        }
    }
}

/// The offset of the last byte of part `k` of a body [`bodies::join`]
/// made.
fn end_of_part(joined: &[u8], k: usize) -> usize {
    let mut at = 0;
    for _ in 0..=k {
        at += 2 + usize::from(u16::from_le_bytes([joined[at], joined[at + 1]]));
    }
    at - 1
}

/// The seeds reach the verification code: as made they verify, and a
/// byte changed in a signature is caught by the rule it breaks, not lost
/// in a decoder.
#[test]
fn the_seeds_reach_verification() {
    let seeds = seeds();
    let seed = |name: &str| seeds.iter().find(|(n, _)| *n == name).unwrap().1.clone();
    let batch = seed("commit_batch");
    assert_eq!(bodies::commit_batch_checked(&batch), Some(Ok(())));
    // A part's last byte is inside its signature. The certifiers are all
    // four authorities' votes, of which a minimal quorum (the first three,
    // of equal stakes) is checked: the fourth's signature is never read,
    // the first's is caught.
    let commits = usize::from(batch[0]);
    let mut forged = batch.clone();
    *forged.last_mut().unwrap() ^= 1;
    assert_eq!(bodies::commit_batch_checked(&forged), Some(Ok(())));
    let mut forged = batch.clone();
    forged[1 + end_of_part(&batch[1..], commits)] ^= 1;
    let verdict = bodies::commit_batch_checked(&forged);
    assert!(
        matches!(verdict, Some(Err(soma_types::Error::BadSignature(_)))),
        "{verdict:?}"
    );
    let infos = seed("node_infos");
    assert_eq!(bodies::node_infos_checked(&infos), vec![Ok(()), Ok(())]);
    let mut forged = infos.clone();
    *forged.last_mut().unwrap() ^= 1;
    let verdicts = bodies::node_infos_checked(&forged);
    assert_eq!(verdicts.len(), 2);
    assert!(verdicts[0].is_ok() && verdicts[1].is_err(), "{verdicts:?}");
}

/// Writes the seeds into `fuzz/regressions/<target>/seed-0`; run it after
/// changing the codec or the bodies:
/// `cargo test -p soma-tests --test fuzz_corpus -- --ignored write_the_seeds`.
#[test]
#[ignore]
fn write_the_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions");
    for (name, seed) in seeds() {
        std::fs::write(root.join(name).join("seed-0"), seed).unwrap();
    }
}

/// Every input kept in `fuzz/regressions/`: the seeds, exactly as
/// [`seeds`] makes them (so each is reproducible), and the crashers
/// `make fuzz` found, none of which may crash again.
#[test]
fn kept_inputs_are_replayed_and_the_seeds_are_reproducible() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions");
    let seeds = seeds();
    let mut replayed = Vec::new();
    for (name, target) in TARGETS {
        let dir = root.join(name);
        assert!(dir.is_dir(), "{} is missing", dir.display());
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for path in files {
            let data = std::fs::read(&path).unwrap();
            let file = path.file_name().unwrap().to_string_lossy().to_string();
            if file == "seed-0" {
                let made = &seeds.iter().find(|(n, _)| *n == name).unwrap().1;
                assert_eq!(
                    &data,
                    made,
                    "{}: rewrite it with write_the_seeds",
                    path.display()
                );
            }
            target(&data);
            replayed.push(format!("{name}/{file}"));
        }
    }
    // One seed per target, and no crasher kept yet.
    let expected: Vec<String> = TARGETS.iter().map(|(n, _)| format!("{n}/seed-0")).collect();
    assert_eq!(replayed, expected);
}
