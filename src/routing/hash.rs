//! The stable hash and weighted rendezvous (highest random weight) hashing.
//!
//! # Why rendezvous and not Maglev or a hash ring
//!
//! An upstream has tens of backends, so scoring every backend per handshake (O(N), hashing
//! each URL and the key: a few microseconds at most) costs nothing next to a TCP or TLS
//! handshake. In exchange rendezvous
//! needs no lookup table: no memory per upstream, nothing to rebuild when a backend is added,
//! removed or marked unhealthy, and no table size to tune. Removing a backend moves exactly the
//! keys that were on it (every other key keeps its highest score), which Maglev only
//! approximates. Weights use the logarithmic method (`score = -weight / ln(u)`), which gives
//! each backend a share of keys exactly proportional to its weight, where a ring needs many
//! virtual nodes and still only approximates it.
//!
//! # The algorithm (frozen: see "Stability")
//!
//! For a backend with URL `url` (the string exactly as configured, [`Backend::url`]) and a
//! sticky key `key`:
//!
//! 1. `h` = 64-bit FNV-1a (offset basis `0xcbf29ce484222325`, prime `0x100000001b3`, each byte
//!    XORed in then multiplied, wrapping) over the bytes of `url`, then the single byte `0xff`,
//!    then the UTF-8 bytes of `key`. `0xff` never occurs in UTF-8, so no (url, key) pair can
//!    produce the byte stream of another pair.
//! 2. `h` = MurmurHash3's `fmix64` finalizer of `h`: `h ^= h >> 33; h *= 0xff51afd7ed558ccd;
//!    h ^= h >> 33; h *= 0xc4ceb9fe1a85ec53; h ^= h >> 33` (wrapping). FNV-1a alone mixes its
//!    last bytes poorly into the high bits; the finalizer fixes that.
//! 3. `u` = `((h >> 12) + 0.5) / 2^52`, a binary64 strictly inside (0, 1), computed exactly.
//! 4. `score` = `-weight / ln(u)`, with `ln` evaluated in binary64 exactly as follows (not
//!    with `f64::ln`): write `u = m * 2^e` with `m` in [1, 2) (from the bits); if
//!    `m > SQRT_2` then `m /= 2; e += 1`; `s = (m - 1) / (m + 1)`; `series = 0` then, for `k`
//!    from 11 down to 0, `series = series * (s * s) + 1 / (2k + 1)`; finally
//!    `ln = e * LN_2 + 2 * s * series` (`SQRT_2`, `LN_2`: the `std::f64::consts` values).
//! 5. Backends rank by descending `score`; equal scores (practically never) by descending `h`,
//!    then by ascending URL bytes. Position in the configuration plays no part.
//!
//! The sticky-cookie token of a backend is `fmix64(FNV-1a(url))` (no separator, no key),
//! written as 16 lowercase hex digits.
//!
//! # Stability
//!
//! The ranking decides which backend holds a room on every gateway instance, so instances of
//! different wsgate versions running side by side (a rolling upgrade) must agree, and so must
//! cookies issued before an upgrade. That is why the hash is spelled out here instead of using
//! `std`'s `DefaultHasher` (explicitly unspecified and allowed to change between releases) or a
//! crate, and why `ln` is computed from IEEE-754 basic operations (`+ - * /`, which are
//! correctly rounded and therefore bit-identical on every target with native binary64
//! arithmetic, which includes every tier-1 target; Rust never fuses them)
//! instead of the platform's libm, whose last bit may differ between targets. The pinned
//! mapping tests must never be "fixed" by updating their expected values.

use std::cmp::Ordering;

use crate::config::Backend;

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
/// Cannot occur in UTF-8, so it unambiguously ends the URL.
const KEY_SEPARATOR: u8 = 0xff;

fn fnv1a(mut state: u64, bytes: &[u8]) -> u64 {
    for &byte in bytes {
        state ^= u64::from(byte);
        state = state.wrapping_mul(FNV_PRIME);
    }
    state
}

/// MurmurHash3's 64-bit finalizer.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

/// The stable 64-bit hash of `(backend_url, key)`, steps 1 and 2 of the module docs.
pub fn key_hash(backend_url: &str, key: &str) -> u64 {
    let state = fnv1a(FNV_OFFSET_BASIS, backend_url.as_bytes());
    let state = fnv1a(state, &[KEY_SEPARATOR]);
    fmix64(fnv1a(state, key.as_bytes()))
}

/// The stable 64-bit identity of a backend, used for sticky cookies: it names the backend
/// across gateway instances and restarts without revealing its address.
pub fn backend_token(backend_url: &str) -> u64 {
    fmix64(fnv1a(FNV_OFFSET_BASIS, backend_url.as_bytes()))
}

/// Natural logarithm for `x` in (0, 1), from basic IEEE-754 operations only, so that it is
/// bit-identical everywhere (see "Stability"). Accurate to about one ulp, which is all the
/// ranking needs; what matters is that every gateway computes the same bits.
fn stable_ln(x: f64) -> f64 {
    const SERIES_TERMS: u32 = 12;
    debug_assert!(x > 0.0 && x < 1.0 && x.is_normal());
    // x = m * 2^e with m in [1, 2), read straight from the bits (x is normal).
    let bits = x.to_bits();
    let biased_exponent = ((bits >> 52) & 0x7ff) as i32;
    let mut exponent = biased_exponent - 1023;
    let mut mantissa = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    // Centre m on 1 so the series below converges fast: m in (sqrt(2)/2, sqrt(2)].
    if mantissa > std::f64::consts::SQRT_2 {
        mantissa /= 2.0;
        exponent += 1;
    }
    // ln(m) = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...), with |s| <= 0.1716, so s^2 <= 0.0295
    // and twelve terms are far below one ulp.
    let s = (mantissa - 1.0) / (mantissa + 1.0);
    let s_squared = s * s;
    let mut series = 0.0;
    for k in (0..SERIES_TERMS).rev() {
        series = series * s_squared + 1.0 / f64::from(2 * k + 1);
    }
    f64::from(exponent) * std::f64::consts::LN_2 + 2.0 * s * series
}

/// Steps 3 and 4 of the module docs: the weighted rendezvous score of a key hash.
///
/// A weight of 0 scores 0 and so ranks after every weighted backend (validation rejects it;
/// this only keeps the ranking total).
pub fn weighted_score(hash: u64, weight: u32) -> f64 {
    // 52 bits plus one half: the numerator needs at most 53 significant bits, so `u` is exact
    // and lies in [2^-53, 1 - 2^-53]; ln(u) is then finite and strictly negative.
    let unit = ((hash >> 12) as f64 + 0.5) * (1.0 / (1u64 << 52) as f64);
    -f64::from(weight) / stable_ln(unit)
}

/// One backend's standing for one key.
#[derive(Debug, Clone, Copy)]
struct Standing<'a> {
    score: f64,
    hash: u64,
    url: &'a str,
}

impl<'a> Standing<'a> {
    fn of(backend: &'a Backend, weight: u32, key: &str) -> Self {
        let hash = key_hash(&backend.url, key);
        Standing {
            score: weighted_score(hash, weight),
            hash,
            url: &backend.url,
        }
    }

    /// `Less` means `self` ranks first (step 5 of the module docs).
    fn rank_order(&self, other: &Self) -> Ordering {
        other
            .score
            .total_cmp(&self.score)
            .then_with(|| other.hash.cmp(&self.hash))
            .then_with(|| self.url.as_bytes().cmp(other.url.as_bytes()))
    }
}

/// The highest-ranked backend for `key` among those `is_available` accepts, in one pass and
/// without allocating. This is what a handshake needs: the first choice, or the next one that
/// is up.
pub fn pick(
    backends: &[Backend],
    key: &str,
    is_available: impl FnMut(usize) -> bool,
) -> Option<usize> {
    pick_weighted(backends, |index| backends[index].weight, key, is_available)
}

/// [`pick`] with each backend's weight given by `weight_of` (an operator may change it at
/// run time) instead of its configured one.
pub fn pick_weighted(
    backends: &[Backend],
    weight_of: impl Fn(usize) -> u32,
    key: &str,
    mut is_available: impl FnMut(usize) -> bool,
) -> Option<usize> {
    let mut best: Option<(usize, Standing<'_>)> = None;
    for (index, backend) in backends.iter().enumerate() {
        if !is_available(index) {
            continue;
        }
        let standing = Standing::of(backend, weight_of(index), key);
        let better = match &best {
            None => true,
            Some((_, leader)) => standing.rank_order(leader) == Ordering::Less,
        };
        if better {
            best = Some((index, standing));
        }
    }
    best.map(|(index, _)| index)
}

/// Every backend index, first choice for `key` first, then the fallbacks in order. For tests
/// and for explaining a routing decision; the request path uses [`pick`].
pub fn rank(backends: &[Backend], key: &str) -> Vec<usize> {
    let mut standings: Vec<(usize, Standing<'_>)> = backends
        .iter()
        .enumerate()
        .map(|(index, backend)| (index, Standing::of(backend, backend.weight, key)))
        .collect();
    standings.sort_by(|(_, a), (_, b)| a.rank_order(b));
    standings.into_iter().map(|(index, _)| index).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(url: &str, weight: u32) -> Backend {
        Backend {
            url: url.to_owned(),
            secure: false,
            host: "unused".to_owned(),
            port: 0,
            base_path: String::new(),
            weight,
        }
    }

    fn five_backends() -> Vec<Backend> {
        (1..=5)
            .map(|n| backend(&format!("ws://10.0.0.{n}:9000"), 1))
            .collect()
    }

    fn url_of(backends: &[Backend], index: Option<usize>) -> Option<&str> {
        index.map(|i| backends[i].url.as_str())
    }

    #[test]
    fn fnv1a_and_fmix64_match_their_published_definitions() {
        // FNV-1a 64 test vectors from the reference implementation (isthe.com/chongo).
        assert_eq!(fnv1a(FNV_OFFSET_BASIS, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET_BASIS, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV_OFFSET_BASIS, b"foobar"), 0x8594_4171_f739_67e8);
        // fmix64 is a bijection that fixes 0.
        assert_eq!(fmix64(0), 0);
        assert_ne!(fmix64(1), 1);
    }

    #[test]
    fn stable_ln_agrees_with_libm_to_an_ulp_or_two() {
        let mut h = 0x1234_5678_9abc_def0_u64;
        for _ in 0..100_000 {
            h = fmix64(h.wrapping_add(1));
            let x = ((h >> 12) as f64 + 0.5) * (1.0 / (1u64 << 52) as f64);
            let ours = stable_ln(x);
            let libm = x.ln();
            assert!(
                (ours - libm).abs() <= 4.0 * f64::EPSILON * libm.abs(),
                "ln({x}): {ours} vs {libm}"
            );
        }
        for x in [
            f64::MIN_POSITIVE,
            2f64.powi(-53),
            0.5,
            1.0 - f64::EPSILON / 2.0,
        ] {
            assert!((stable_ln(x) - x.ln()).abs() <= 4.0 * f64::EPSILON * x.ln().abs());
        }
    }

    #[test]
    fn scores_are_finite_and_positive_at_the_extremes() {
        for hash in [0, 1, u64::MAX, u64::MAX >> 1, 1 << 63] {
            for weight in [1, 3, u32::MAX] {
                let score = weighted_score(hash, weight);
                assert!(
                    score.is_finite() && score > 0.0,
                    "{hash:x} {weight}: {score}"
                );
            }
        }
        assert_eq!(weighted_score(u64::MAX, 0), 0.0);
    }

    #[test]
    fn rank_is_a_permutation_led_by_pick() {
        let backends = five_backends();
        for n in 0..200 {
            let key = format!("room-{n}");
            let order = rank(&backends, &key);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
            assert_eq!(pick(&backends, &key, |_| true), Some(order[0]));
            // Skipping the first choice yields the second: the fallback order is the ranking.
            assert_eq!(pick(&backends, &key, |i| i != order[0]), Some(order[1]));
        }
        assert_eq!(pick(&backends, "k", |_| false), None);
        assert_eq!(pick(&[], "k", |_| true), None);
        assert!(rank(&[], "k").is_empty());
    }

    #[test]
    fn the_choice_depends_on_urls_not_on_configuration_order() {
        let backends = five_backends();
        let mut reversed = backends.clone();
        reversed.reverse();
        let mut rotated = backends.clone();
        rotated.rotate_left(2);
        for n in 0..2_000 {
            let key = format!("user:{n}");
            let expected = url_of(&backends, pick(&backends, &key, |_| true));
            assert_eq!(url_of(&reversed, pick(&reversed, &key, |_| true)), expected);
            assert_eq!(url_of(&rotated, pick(&rotated, &key, |_| true)), expected);
        }
    }

    #[test]
    fn removing_a_backend_moves_only_its_keys() {
        let backends = five_backends();
        let removed_url = backends[2].url.clone();
        let remaining: Vec<Backend> = backends
            .iter()
            .filter(|b| b.url != removed_url)
            .cloned()
            .collect();
        let keys = 10_000;
        let mut moved = 0;
        for n in 0..keys {
            let key = format!("room-{n}");
            let before = url_of(&backends, pick(&backends, &key, |_| true)).unwrap();
            let after = url_of(&remaining, pick(&remaining, &key, |_| true)).unwrap();
            if before == removed_url {
                moved += 1;
                assert_ne!(after, removed_url);
            } else {
                assert_eq!(after, before, "{key} moved although its backend stayed");
            }
        }
        let share = f64::from(moved) / f64::from(keys);
        // Expected 1/5; the binomial standard deviation is 0.4 %, so 3 % is about 7 sigma.
        assert!((share - 0.2).abs() < 0.03, "moved share {share}");
    }

    #[test]
    fn adding_a_backend_moves_keys_only_onto_it() {
        let backends = five_backends();
        let mut grown = backends.clone();
        grown.insert(1, backend("ws://10.0.0.6:9000", 1));
        let keys = 10_000;
        let mut moved = 0;
        for n in 0..keys {
            let key = format!("room-{n}");
            let before = url_of(&backends, pick(&backends, &key, |_| true)).unwrap();
            let after = url_of(&grown, pick(&grown, &key, |_| true)).unwrap();
            if after != before {
                moved += 1;
                assert_eq!(after, "ws://10.0.0.6:9000");
            }
        }
        let share = f64::from(moved) / f64::from(keys);
        assert!((share - 1.0 / 6.0).abs() < 0.03, "moved share {share}");
    }

    #[test]
    fn weights_set_the_share_of_keys() {
        let backends = vec![
            backend("ws://heavy.internal:9000", 3),
            backend("ws://light.internal:9000", 1),
        ];
        let keys = 100_000;
        let heavy = (0..keys)
            .filter(|n| pick(&backends, &format!("session-{n}"), |_| true) == Some(0))
            .count();
        let share = heavy as f64 / f64::from(keys);
        // Expected 3/4; the standard deviation is 0.14 %, so 1 % is about 7 sigma.
        assert!((share - 0.75).abs() < 0.01, "heavy share {share}");
    }

    #[test]
    fn weights_stay_proportional_with_several_backends() {
        let backends = vec![
            backend("ws://a:1", 1),
            backend("ws://b:1", 2),
            backend("ws://c:1", 3),
            backend("ws://d:1", 4),
        ];
        let keys = 100_000;
        let mut counts = [0u32; 4];
        for n in 0..keys {
            counts[pick(&backends, &n.to_string(), |_| true).unwrap()] += 1;
        }
        for (index, count) in counts.iter().enumerate() {
            let expected = (index as f64 + 1.0) / 10.0;
            let share = f64::from(*count) / f64::from(keys);
            assert!(
                (share - expected).abs() < 0.01,
                "{index}: {share} vs {expected}"
            );
        }
    }
}
