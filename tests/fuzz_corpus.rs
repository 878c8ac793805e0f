//! The fuzz targets' bodies (`fuzz/fuzz_targets/bodies.rs`) on stable, in
//! `make test`: each runs on seeded random inputs, on mutations of valid
//! encodings, and on every input kept in `fuzz/regressions/<target>/` (the
//! crashers `make fuzz` found, kept as regression tests). A panic fails.

use std::path::Path;

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

/// Valid encodings to mutate: blocks, commits, and length-prefixed runs.
fn seeds() -> Vec<Vec<u8>> {
    let chain = ChainBuilder::new(ChainConfig::validators(4)).build(3);
    let mut out = Vec::new();
    for i in 1..=3 {
        out.push(chain.commit(i).serialized().to_vec());
        for b in chain.blocks_of(i) {
            out.push(b.serialized().to_vec());
        }
    }
    out
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
        for seed in &seeds {
            target(seed);
            for _ in 0..50 {
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
        let _ = name;
    }
}

#[test]
fn kept_crashers_do_not_crash() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions");
    let mut replayed = 0;
    for (name, target) in TARGETS {
        let dir = root.join(name);
        assert!(dir.is_dir(), "{} is missing", dir.display());
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() && path.extension().is_none_or(|e| e != "md") {
                target(&std::fs::read(&path).unwrap());
                replayed += 1;
            }
        }
    }
    println!("replayed {replayed} kept inputs");
}
