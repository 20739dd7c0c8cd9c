//! Keys of the router's internal records (`$control`, `$affinity`).
//!
//! Compaction keeps the latest record per key, and recovery reads the key back to know what
//! a record is about, so two different things must never share a key and a key must read
//! back as exactly what was written. Names (swarms, leases, agents, nodes, session keys)
//! may contain any byte a client chooses, `/` and `:` included, so every part is
//! length-prefixed:
//!
//! ```text
//! <kind>(:<len>:<part>)*      e.g. lease:7:fleet/a:8:leader/1
//! ```
//!
//! `len` is the part's length in bytes, in decimal. Keys written before this format
//! (`lease/<swarm>/<name>`, `pause/<swarm>`, `stop/<agent>`, `drain/<node>`, a bare session
//! key for pins) are still read at start-up (see [`crate::control::Restored::apply`]).

/// Builds the key of a record of `kind` about `parts`.
pub fn encode(kind: &str, parts: &[&str]) -> String {
    let mut key =
        String::with_capacity(kind.len() + parts.iter().map(|p| p.len() + 6).sum::<usize>());
    key.push_str(kind);
    for part in parts {
        key.push(':');
        key.push_str(&part.len().to_string());
        key.push(':');
        key.push_str(part);
    }
    key
}

/// Reads a key written by [`encode`] back: its kind and parts, or `None` when `key` is not
/// of that form (a legacy key, or a malformed one).
pub fn decode(key: &str) -> Option<(&str, Vec<&str>)> {
    let (kind, mut rest) = key.split_once(':')?;
    if kind.is_empty() || !kind.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
        return None;
    }
    let mut parts = Vec::new();
    loop {
        let (len, tail) = rest.split_once(':')?;
        if len.is_empty() || len.len() > 6 || !len.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let len: usize = len.parse().ok()?;
        let part = tail.get(..len)?;
        parts.push(part);
        rest = &tail[len..];
        match rest.strip_prefix(':') {
            Some(next) => rest = next,
            None if rest.is_empty() => return Some((kind, parts)),
            None => return None,
        }
    }
}

/// Reads a key of `kind` with exactly `N` parts.
pub fn decode_as<'a, const N: usize>(key: &'a str, kind: &str) -> Option<[&'a str; N]> {
    match decode(key) {
        Some((k, parts)) if k == kind => parts.try_into().ok(),
        _ => None,
    }
}

/// The key compaction compares records of internal swarm `swarm` by: a key of the former
/// form is mapped to the key that replaced it (`pause/<swarm>` to `pause:…`, a bare pin
/// key to `pin:…`), so a newer record under the new key supersedes the older one under the
/// old key, and dropping a tombstone can never bring an older record back. Legacy lease
/// keys are ambiguous and kept as they are (their tokens only raise the new ones).
pub fn canonical<'a>(swarm: &str, key: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
    use std::borrow::Cow;
    let Ok(text) = std::str::from_utf8(key) else {
        return Cow::Borrowed(key);
    };
    if swarm == crate::workers::PINS_SWARM {
        if decode_as::<1>(text, "pin").is_none() {
            return Cow::Owned(encode("pin", &[text]).into_bytes());
        }
    } else if swarm == crate::control::CONTROL_SWARM {
        for kind in ["pause", "stop", "drain"] {
            if let Some(name) = text.strip_prefix(kind).and_then(|r| r.strip_prefix('/')) {
                return Cow::Owned(encode(kind, &[name]).into_bytes());
            }
        }
    }
    Cow::Borrowed(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_with_separators_read_back_as_written() {
        let key = encode("lease", &["a/b", "c"]);
        assert_eq!(key, "lease:3:a/b:1:c");
        assert_ne!(key, encode("lease", &["a", "b/c"]));
        assert_eq!(decode_as::<2>(&key, "lease"), Some(["a/b", "c"]));
        assert_eq!(decode_as::<1>(&key, "lease"), None);
        assert_eq!(decode_as::<2>(&key, "pause"), None);
        for bad in [
            "lease",
            "lease:",
            "lease:2:a",
            "lease:1:ab",
            "lease:x:a",
            "Lease:1:a",
            "lease/a/b",
        ] {
            assert_eq!(decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn legacy_keys_compare_as_the_keys_that_replaced_them() {
        assert_eq!(
            &*canonical("$affinity", b"sess"),
            encode("pin", &["sess"]).as_bytes()
        );
        let new = encode("pin", &["sess"]);
        assert_eq!(&*canonical("$affinity", new.as_bytes()), new.as_bytes());
        assert_eq!(
            &*canonical("$control", b"pause/a/b"),
            encode("pause", &["a/b"]).as_bytes()
        );
        assert_eq!(&*canonical("$control", b"lease/a/b"), b"lease/a/b");
        assert_eq!(&*canonical("user", b"sess"), b"sess");
    }

    proptest! {
        /// Distinct (kind, parts) never share a key, and every key reads back exactly.
        #[test]
        fn keys_are_unambiguous(
            a in proptest::collection::vec("[a-z/:0-9]{0,12}", 1..4),
            b in proptest::collection::vec("[a-z/:0-9]{0,12}", 1..4),
        ) {
            let (ka, kb) = (
                encode("k", &a.iter().map(String::as_str).collect::<Vec<_>>()),
                encode("k", &b.iter().map(String::as_str).collect::<Vec<_>>()),
            );
            prop_assert_eq!(ka == kb, a == b);
            let (kind, parts) = decode(&ka).unwrap();
            prop_assert_eq!(kind, "k");
            prop_assert_eq!(parts, a.iter().map(String::as_str).collect::<Vec<_>>());
        }
    }
}
