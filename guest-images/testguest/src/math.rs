//! `ln`, `exp` and `powf` for `no_std` (core has no libm): enough accuracy (~1e-14 relative) for
//! the zipf sampler, checked against std in the tests.

const LN2: f64 = core::f64::consts::LN_2;

/// Natural logarithm of `x > 0` (returns -inf for 0, NaN for negatives).
pub fn ln(x: f64) -> f64 {
    if x.is_nan() || x < 0.0 {
        return f64::NAN;
    }
    if x == 0.0 {
        return f64::NEG_INFINITY;
    }
    if x.is_infinite() {
        return x;
    }
    // x = m * 2^e with m in [sqrt(1/2), sqrt(2)).
    let (mut x, mut e) = (x, 0i32);
    if x < f64::MIN_POSITIVE {
        x *= (1u64 << 54) as f64;
        e -= 54;
    }
    let bits = x.to_bits();
    e += ((bits >> 52) & 0x7ff) as i32 - 1023;
    let mut m = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1023u64 << 52));
    if m > core::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    // ln m = 2 atanh(s), s = (m-1)/(m+1), |s| < 0.172.
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut term = s;
    let mut sum = 0.0;
    let mut k = 1.0;
    while k < 40.0 {
        sum += term / k;
        term *= s2;
        k += 2.0;
    }
    2.0 * sum + e as f64 * LN2
}

/// e^x.
pub fn exp(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x > 709.0 {
        return f64::INFINITY;
    }
    if x < -745.0 {
        return 0.0;
    }
    let k = (x / LN2 + if x < 0.0 { -0.5 } else { 0.5 }) as i32;
    let r = x - k as f64 * LN2;
    let mut term = 1.0;
    let mut sum = 1.0;
    for i in 1..20 {
        term *= r / i as f64;
        sum += term;
    }
    // Multiply by 2^k in two steps so that 2^k itself never over- or underflows.
    let (k1, k2) = (k / 2, k - k / 2);
    sum * pow2(k1) * pow2(k2)
}

fn pow2(k: i32) -> f64 {
    f64::from_bits(((k + 1023) as u64) << 52)
}

/// x^y for `x > 0`.
pub fn powf(x: f64, y: f64) -> f64 {
    if x == 0.0 {
        return 0.0;
    }
    exp(y * ln(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-13 * b.abs().max(1e-300)
    }

    #[test]
    fn matches_std() {
        for &x in &[
            1e-300, 1e-10, 0.001, 0.5, 0.7072, 1.0, 1.5, 2.0, 10.0, 12345.678, 1e300,
        ] {
            assert!(
                close(ln(x), x.ln()) || (ln(x) - x.ln()).abs() < 1e-15,
                "ln {x}"
            );
        }
        for &x in &[-700.0, -20.0, -1.0, -0.3, 0.0, 0.3, 1.0, 5.5, 100.0, 700.0] {
            assert!(close(exp(x), x.exp()), "exp {x}: {} {}", exp(x), x.exp());
        }
        for &(x, y) in &[
            (2.0, 0.01),
            (0.5, 100.0),
            (0.999, 100.0),
            (1e6, -0.99),
            (3.0, 2.0),
        ] {
            assert!(
                close(powf(x, y), x.powf(y))
                    || (powf(x, y) - x.powf(y)).abs() < 1e-12 * x.powf(y).abs(),
                "pow {x} {y}"
            );
        }
    }
}
