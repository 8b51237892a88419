//! Backend selection, pure: every input (weights, cursor, random numbers, availability) is
//! passed in, so the tests are exact.

/// A smooth weighted round-robin schedule (nginx's algorithm) precomputed once per pool:
/// backends interleave in proportion to their weights instead of arriving in runs.
/// Weights are reduced by their gcd and the schedule is capped at 4096 slots.
pub fn wrr_schedule(weights: &[u32]) -> Vec<usize> {
    if weights.is_empty() {
        return Vec::new();
    }
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let mut w: Vec<u64> = weights.iter().map(|w| (*w / g).max(1) as u64).collect();
    let total: u64 = w.iter().sum();
    const CAP: u64 = 4096;
    if total > CAP {
        for x in w.iter_mut() {
            *x = (*x * CAP / total).max(1);
        }
    }
    let total: i64 = w.iter().sum::<u64>() as i64;
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, wi) in current.iter_mut().zip(&w) {
            *c += *wi as i64;
        }
        let best = (0..w.len())
            .max_by_key(|&i| (current[i], std::cmp::Reverse(i)))
            .unwrap_or(0);
        current[best] -= total;
        out.push(best);
    }
    out
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Round robin over `schedule` starting at `cursor`: the first available backend.
pub fn pick_round_robin(
    schedule: &[usize],
    cursor: usize,
    available: impl Fn(usize) -> bool,
) -> Option<usize> {
    let n = schedule.len();
    (0..n)
        .map(|i| schedule[(cursor.wrapping_add(i)) % n])
        .find(|&b| available(b))
}

/// Power of two choices: two distinct available backends drawn at random in proportion to
/// weight; the one with fewer in-flight requests per unit of weight wins.
/// `r1`, `r2` are uniform random numbers.
pub fn pick_p2c(
    weights: &[u32],
    inflight: impl Fn(usize) -> u64,
    available: impl Fn(usize) -> bool,
    r1: u64,
    r2: u64,
) -> Option<usize> {
    let candidates: Vec<usize> = (0..weights.len()).filter(|&i| available(i)).collect();
    match candidates.len() {
        0 => return None,
        1 => return Some(candidates[0]),
        _ => {}
    }
    let draw = |r: u64, skip: Option<usize>| -> usize {
        let total: u64 = candidates
            .iter()
            .filter(|&&c| Some(c) != skip)
            .map(|&c| weights[c] as u64)
            .sum();
        let mut x = r % total.max(1);
        for &c in candidates.iter().filter(|&&c| Some(c) != skip) {
            let w = weights[c] as u64;
            if x < w {
                return c;
            }
            x -= w;
        }
        candidates[0]
    };
    let a = draw(r1, None);
    let b = draw(r2, Some(a));
    // Compare (inflight + 1) / weight without division.
    let load = |i: usize| (inflight(i) + 1) as u128 * weights_product_other(weights, a, b, i);
    Some(if load(b) < load(a) { b } else { a })
}

/// The weight of the *other* candidate, so that la/wa < lb/wb ⇔ la*wb < lb*wa.
fn weights_product_other(weights: &[u32], a: usize, b: usize, i: usize) -> u128 {
    if i == a {
        weights[b] as u128
    } else {
        weights[a] as u128
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_honours_weights_and_interleaves() {
        let s = wrr_schedule(&[5, 1, 1]);
        assert_eq!(s, vec![0, 0, 1, 0, 2, 0, 0]);
        let s = wrr_schedule(&[300, 100]);
        assert_eq!(s, vec![0, 0, 1, 0]);
        assert_eq!(wrr_schedule(&[1, 1, 1]), vec![0, 1, 2]);
        assert!(wrr_schedule(&[]).is_empty());
    }

    #[test]
    fn schedule_is_capped_but_keeps_every_backend() {
        let mut w = vec![1000u32; 10];
        w.push(1);
        let s = wrr_schedule(&w);
        assert!(s.len() <= 4096 + 11);
        assert!(s.contains(&10));
    }

    #[test]
    fn round_robin_skips_unavailable() {
        let s = [0, 1, 2];
        assert_eq!(pick_round_robin(&s, 0, |_| true), Some(0));
        assert_eq!(pick_round_robin(&s, 4, |_| true), Some(1));
        assert_eq!(pick_round_robin(&s, 0, |b| b != 0), Some(1));
        assert_eq!(pick_round_robin(&s, 2, |b| b == 0), Some(0));
        assert_eq!(pick_round_robin(&s, 0, |_| false), None);
    }

    #[test]
    fn p2c_prefers_the_less_loaded_per_weight() {
        let w = [1, 1];
        let load = [10u64, 2];
        for r in 0..20 {
            assert_eq!(pick_p2c(&w, |i| load[i], |_| true, r, r + 7), Some(1));
        }
        // Weight 4 with 8 in flight (9/4) beats weight 1 with 3 in flight (4/1).
        let w = [4, 1];
        let load = [8u64, 3];
        assert_eq!(pick_p2c(&w, |i| load[i], |_| true, 0, 0), Some(0));
        assert_eq!(pick_p2c(&w, |_| 0, |i| i == 1, 0, 1), Some(1));
        assert_eq!(pick_p2c(&w, |_| 0, |_| false, 0, 1), None);
    }
}
