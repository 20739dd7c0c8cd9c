//! The fixed 64-bit hashes placement is built on.
//!
//! Placement must give the same answer on every router, across restarts and releases, so
//! nothing here is seeded per process (unlike `std`'s `RandomState`). The functions are
//! well known and small:
//!
//! - [`fnv1a64`]: FNV-1a over the bytes of a key (offset basis `0xcbf29ce484222325`,
//!   prime `0x100000001b3`). Fast on short keys, but its low bits mix poorly, so it is
//!   never used on its own.
//! - [`mix64`]: the splitmix64 finalizer (Steele, Lea and Flood, 2014; the constants of
//!   Stafford's "Mix13"). A bijection on `u64` with full avalanche.
//! - [`key_hash`] = `mix64(fnv1a64(key))`, [`node_hash`] = `mix64(id + golden ratio)`, and
//!   the rendezvous draw [`pair_hash`] = `mix64(key_hash ^ node_hash)`. Because `mix64` is a
//!   bijection, two distinct nodes never draw the same value for one key.
//!
//! Changing any of these functions re-places every session in a fleet: treat them as a wire
//! format.

use std::hash::{BuildHasher, Hasher};

use crate::node::NodeId;

/// FNV-1a 64-bit offset basis.
pub const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64-bit prime.
pub const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
/// 2^64 / golden ratio, the splitmix64 increment.
pub const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// FNV-1a over `bytes`.
#[inline]
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash = FNV_OFFSET_BASIS;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// The splitmix64 finalizer: a bijective 64-bit mixer.
#[inline]
pub fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The hash of a placement key (a session key or a model name).
#[inline]
pub fn key_hash(key: &str) -> u64 {
    mix64(fnv1a64(key.as_bytes()))
}

/// The hash a node contributes to every rendezvous draw.
#[inline]
pub fn node_hash(id: NodeId) -> u64 {
    mix64(id.0.wrapping_add(GOLDEN_GAMMA))
}

/// The rendezvous draw of one node for one key.
#[inline]
pub fn pair_hash(key_hash: u64, node_hash: u64) -> u64 {
    mix64(key_hash ^ node_hash)
}

/// Maps a draw to a uniform value in the open interval (0, 1): the top 52 bits, centred in
/// their cell so neither 0 nor 1 occurs. Exact: `cell + 0.5` needs 53 bits, which an `f64`
/// mantissa holds (with 53 bits of cell it would round up to 1.0).
#[inline]
pub fn unit_interval(draw: u64) -> f64 {
    const SCALE: f64 = 1.0 / (1u64 << 52) as f64;
    ((draw >> 12) as f64 + 0.5) * SCALE
}

/// A `Hasher` with fixed output (FNV-1a then [`mix64`]) for the crate's maps, so that
/// iteration order depends only on what was inserted, never on a per-process seed.
#[derive(Debug, Clone, Copy)]
pub struct FixedHasher(u64);

impl Default for FixedHasher {
    fn default() -> Self {
        Self(FNV_OFFSET_BASIS)
    }
}

impl Hasher for FixedHasher {
    #[inline]
    fn finish(&self) -> u64 {
        mix64(self.0)
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 ^= u64::from(byte);
            self.0 = self.0.wrapping_mul(FNV_PRIME);
        }
    }

    #[inline]
    fn write_u64(&mut self, value: u64) {
        // One multiply per word instead of eight: `finish` does the mixing.
        self.0 = (self.0 ^ value).wrapping_mul(FNV_PRIME);
    }
}

/// Builds [`FixedHasher`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct FixedState;

impl BuildHasher for FixedState {
    type Hasher = FixedHasher;

    #[inline]
    fn build_hasher(&self) -> FixedHasher {
        FixedHasher::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_the_published_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn mix64_is_the_splitmix64_finalizer() {
        // The first three outputs of splitmix64 seeded with 0.
        assert_eq!(mix64(GOLDEN_GAMMA), 0xe220_a839_7b1d_cdaf);
        assert_eq!(mix64(GOLDEN_GAMMA.wrapping_mul(2)), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(mix64(GOLDEN_GAMMA.wrapping_mul(3)), 0x06c4_5d18_8009_454f);
    }

    #[test]
    fn draws_for_one_key_differ_per_node() {
        let key = key_hash("session-1");
        let mut draws: Vec<u64> = (0..1000)
            .map(|id| pair_hash(key, node_hash(NodeId(id))))
            .collect();
        draws.sort_unstable();
        draws.dedup();
        assert_eq!(draws.len(), 1000);
    }

    #[test]
    fn unit_interval_stays_open() {
        assert!(unit_interval(0) > 0.0);
        assert!(unit_interval(u64::MAX) < 1.0);
        assert_eq!(unit_interval(u64::MAX), 1.0 - 0.5 / (1u64 << 52) as f64);
        assert!(unit_interval(1 << 12) > unit_interval(0));
    }
}
